-- Several calls' statuses at once: what an instance whose listener was deaf (PostgreSQL away)
-- reads when it hears again, for the calls its browsers follow (calls/status.py catch_up).
--
-- $1 call_sids text[]
-- Returns one row per call found: call_sid, status, end_reason.
SELECT call_sid, status, end_reason FROM calls WHERE call_sid = ANY ($1::text[])

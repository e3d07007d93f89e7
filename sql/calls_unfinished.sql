-- The calls not over yet, on any instance: what the all-calls monitor is shown when it
-- subscribes (handlers/frontend.py), so an operator opening the page mid-call sees every call.
--
-- $1 max_age_s float8 (a call older than the longest session plus a grace is not live, ended or not)
-- Returns call_sid, status for at most 1000 calls, newest first.
SELECT call_sid, status
  FROM calls
 WHERE ended_at IS NULL AND created_at > now() - make_interval(secs => $1)
 ORDER BY created_at DESC
 LIMIT 1000

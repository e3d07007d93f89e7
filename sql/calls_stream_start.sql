-- A media stream starts: spend its token (single use, on any instance) and mark the call
-- streaming on this instance, once: one CallSid gets one media stream, ever.
--
-- $1 jti text   $2 call_sid text   $3 instance_id text
-- Returns one row: first_use boolean (the token was not spent before), started boolean (the
--   call's row was marked streaming now), known boolean (the call has a row at all: one
--   admitted while PostgreSQL was away may not, yet).
WITH spent AS (
    INSERT INTO stream_tokens_used (jti) VALUES ($1) ON CONFLICT (jti) DO NOTHING RETURNING 1
), started AS (
    UPDATE calls SET streamed_at = now(), instance_id = $3
     WHERE call_sid = $2 AND streamed_at IS NULL AND ended_at IS NULL AND EXISTS (SELECT 1 FROM spent)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM spent) AS first_use, EXISTS (SELECT 1 FROM started) AS started,
       EXISTS (SELECT 1 FROM calls WHERE call_sid = $2) AS known

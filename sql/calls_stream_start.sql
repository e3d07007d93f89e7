-- A media stream starts: spend its token (single use, on any instance) and mark the call
-- streaming on this instance, once: one CallSid gets one media stream, ever. The call is
-- connected from then on: its status moves to $5 (of rank $4) in the same statement, as
-- sql/calls_status.sql would (forward only), so set-up makes one statement less.
--
-- $1 jti text   $2 call_sid text   $3 instance_id text   $4 rank integer   $5 status text
-- Returns one row: first_use boolean (the token was not spent before), started boolean (the
--   call's row was marked streaming now), known boolean (the call has a row at all: one
--   admitted while PostgreSQL was away may not, yet), moved boolean (started, and its status
--   moved forward to $5: news for its followers).
WITH spent AS (
    INSERT INTO stream_tokens_used (jti) VALUES ($1) ON CONFLICT (jti) DO NOTHING RETURNING 1
), before AS (
    SELECT status_rank FROM calls WHERE call_sid = $2
), started AS (
    UPDATE calls SET streamed_at = now(), instance_id = $3,
                     status = CASE WHEN status_rank < $4::integer THEN $5 ELSE status END,
                     status_rank = greatest(status_rank, $4::integer),
                     connected_at = coalesce(connected_at, now())
     WHERE call_sid = $2 AND streamed_at IS NULL AND ended_at IS NULL AND EXISTS (SELECT 1 FROM spent)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM spent) AS first_use, EXISTS (SELECT 1 FROM started) AS started,
       EXISTS (SELECT 1 FROM before) AS known,
       EXISTS (SELECT 1 FROM started) AND (SELECT status_rank FROM before) < $4::integer AS moved

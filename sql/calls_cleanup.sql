-- Forget what is no longer needed, in one batch each: spent stream tokens and unanswered
-- call requests after a day, call records after their retention.
--
-- $1 retention_days int  $2 batch int
-- Returns one row: tokens bigint, requests bigint, calls bigint (how many were deleted).
WITH tokens AS (
    DELETE FROM stream_tokens_used WHERE jti IN (
        SELECT jti FROM stream_tokens_used WHERE used_at < now() - interval '1 day' LIMIT $2)
    RETURNING 1
), requests AS (
    DELETE FROM call_requests WHERE reservation_id IN (
        SELECT reservation_id FROM call_requests WHERE created_at < now() - interval '1 day' LIMIT $2)
    RETURNING 1
), old_calls AS (
    DELETE FROM calls WHERE call_sid IN (
        SELECT call_sid FROM calls WHERE created_at < now() - make_interval(days => $1) LIMIT $2)
    RETURNING 1
)
SELECT (SELECT count(*) FROM tokens) AS tokens, (SELECT count(*) FROM requests) AS requests,
       (SELECT count(*) FROM old_calls) AS calls

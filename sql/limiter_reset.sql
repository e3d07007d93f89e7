-- Forget a number's log (admin `reset`): its charges no longer count.
--
-- $1 keys bytea[]   the number's HMAC under the current and every previous key
-- Returns one row: rows bigint (how many log rows were deleted).
WITH gone AS (
    DELETE FROM phone_limits WHERE key = ANY ($1::bytea[]) RETURNING 1
), forgotten AS (
    DELETE FROM limiter_charges WHERE key = ANY ($1::bytea[])
)
SELECT count(*) AS rows FROM gone

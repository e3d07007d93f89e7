-- Give a charge's slot back. Idempotent: a second refund, or one for an unknown id, changes nothing.
-- The charge record stays, marked refunded, so a replayed webhook still charges nothing.
--
-- $1 charge_id text
-- Returns one row: key bytea (the log row the charge was recorded under; NULL when the id is
--                  unknown or already refunded), removed boolean (its entry left the live log).
--
-- Lock order as in limiter_hit.sql, the log row first, then the charge record, so a refund
-- racing a replayed charge cannot deadlock: `tombstoned` reads `removed`, which makes it run after.
WITH target AS (
    SELECT key FROM limiter_charges WHERE charge_id = $1 AND refunded_at IS NULL
), removed AS (
    UPDATE phone_limits AS p
       SET (times, charges) = (SELECT * FROM callgate_log_without(p.times, p.charges, $1))
      FROM target
     WHERE p.key = target.key AND $1 = ANY (p.charges)
    RETURNING p.key
), tombstoned AS (
    UPDATE limiter_charges
       SET refunded_at = callgate_now_ms(NULL)
     WHERE charge_id = $1 AND refunded_at IS NULL AND (SELECT count(*) FROM removed) >= 0
    RETURNING key
)
SELECT (SELECT key FROM tombstoned) AS key, EXISTS (SELECT 1 FROM removed) AS removed

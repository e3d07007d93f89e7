-- Delete, in one batch, rows whose every charge has left the window, and charge records (and
-- refund tombstones) kept past their retention. Safe beside a concurrent decision: DELETE re-checks its condition on
-- the row's latest version, so a row that just took a charge is kept.
--
-- $1 window_ms bigint   $2 retention_ms bigint (how long charge ids stay idempotent)
-- $3 batch int          $4 now_ms bigint (NULL: the database clock)
-- $5 budget_window_ms bigint: rows of other budgets (region 'budget', e.g. a client address's
--    call.starts) have windows of their own; they are kept this long, the longest of those
-- Returns one row: rows bigint, charges bigint (how many of each were deleted).
WITH clock AS (
    SELECT callgate_now_ms($4) AS now_ms
), stale_rows AS (
    DELETE FROM phone_limits
     WHERE key IN (SELECT p.key FROM phone_limits AS p, clock
                    WHERE coalesce(p.times[cardinality(p.times)], 0)
                          <= clock.now_ms - CASE WHEN p.region = 'budget' THEN $5::bigint ELSE $1::bigint END
                    LIMIT $3)
       AND coalesce(times[cardinality(times)], 0)
           <= (SELECT now_ms FROM clock) - CASE WHEN region = 'budget' THEN $5::bigint ELSE $1::bigint END
    RETURNING 1
), stale_charges AS (
    DELETE FROM limiter_charges
     WHERE charge_id IN (SELECT c.charge_id FROM limiter_charges AS c, clock
                          WHERE c.charged_at <= clock.now_ms - $2
                          ORDER BY c.charged_at LIMIT $3)
    RETURNING 1
)
SELECT (SELECT count(*) FROM stale_rows) AS rows, (SELECT count(*) FROM stale_charges) AS charges

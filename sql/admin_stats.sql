-- Limiter analytics for operators. Holds no number, only counts. Rows of other budgets (a
-- client address's call.starts, region 'budget') are not numbers and are left out.
--
-- $1 max_calls int   $2 window_ms bigint   $3 now_ms bigint (NULL: the database clock)
-- Returns one row per region (region '' for rows without one), ordered by region:
--   region text, rows bigint (log rows kept), calls_in_window bigint,
--   numbers_at_limit bigint (rows whose live log is full)
WITH clock AS (
    SELECT callgate_now_ms($3) AS now_ms
), per_row AS (
    SELECT p.region,
           (SELECT count(*) FROM unnest(p.times) AS t WHERE t > clock.now_ms - $2) AS live
      FROM phone_limits AS p, clock
     WHERE p.region <> 'budget'
)
SELECT region, count(*) AS rows, coalesce(sum(live), 0)::bigint AS calls_in_window,
       count(*) FILTER (WHERE live >= $1) AS numbers_at_limit
  FROM per_row
 GROUP BY region
 ORDER BY region

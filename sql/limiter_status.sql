-- A number's live log, without charging, locking or writing anything.
--
-- $1 keys bytea[]     the number's HMAC under the current key and every previous key
-- $2 window_ms bigint
-- $3 now_ms bigint    NULL: the database clock
-- Returns one row: times bigint[] (ascending, live entries of all those rows), now_ms bigint.
WITH clock AS (
    SELECT callgate_now_ms($3) AS now_ms
)
SELECT coalesce((SELECT array_agg(t ORDER BY t)
                   FROM phone_limits AS p, unnest(p.times) AS t
                  WHERE p.key = ANY ($1::bytea[]) AND t > clock.now_ms - $2), '{}') AS times,
       clock.now_ms
  FROM clock

-- Key rotation: move a number's rows made under previous keys to its current key, merging
-- their logs. Run before a decision while PHONE_ENCRYPTION_PREVIOUS_KEYS is set.
--
-- $1 key bytea        the number's HMAC under the current key
-- $2 old_keys bytea[] its HMACs under the previous keys
-- Returns one row: charges text[] (the charge ids moved; pass them to limiter_rekey_charges.sql
-- in the same transaction). Race-free: DELETE locks the old rows and returns their latest
-- versions, so a concurrent move waits and then finds them gone; the merge into the current
-- row happens on that row's lock.
WITH moved AS (
    DELETE FROM phone_limits WHERE key = ANY ($2::bytea[]) RETURNING region, times, charges
), merged AS (
    SELECT max(region) AS region,
           array_agg(u.t ORDER BY u.t, u.c) AS times, array_agg(u.c ORDER BY u.t, u.c) AS charges
      FROM moved, unnest(moved.times, moved.charges) AS u(t, c)
), merged_in AS (
    INSERT INTO phone_limits AS p (key, region, times, charges)
    SELECT $1, coalesce(region, ''), times, charges FROM merged WHERE times IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET (times, charges) = (
        SELECT coalesce(array_agg(t ORDER BY t, c), '{}'), coalesce(array_agg(c ORDER BY t, c), '{}')
          FROM (SELECT DISTINCT ON (c) t, c
                  FROM unnest(p.times || excluded.times, p.charges || excluded.charges) AS u(t, c)
                 ORDER BY c, t) AS entries)
    RETURNING 1
)
SELECT coalesce((SELECT charges FROM merged), '{}') AS charges
  FROM (SELECT count(*) FROM merged_in) AS done

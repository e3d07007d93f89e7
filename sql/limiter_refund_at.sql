-- Second step of a refund whose row was moved by a key rotation while the refund ran
-- (limiter_refund.sql's update could not see the moved row in its snapshot).
--
-- $1 charge_id text   $2 key bytea (as returned by limiter_refund.sql)
-- Returns one row per row changed: key bytea.
UPDATE phone_limits AS p
   SET (times, charges) = (
       SELECT coalesce(array_agg(t ORDER BY t, c), '{}'), coalesce(array_agg(c ORDER BY t, c), '{}')
         FROM unnest(p.times, p.charges) AS u(t, c) WHERE c <> $1)
 WHERE p.key = $2 AND $1 = ANY (p.charges)
RETURNING p.key

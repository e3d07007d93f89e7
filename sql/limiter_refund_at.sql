-- Second step of a refund whose log row was not where its charge record pointed when the
-- refund's snapshot was taken (a key rotation moved it meanwhile): look again, in a fresh
-- snapshot, under the key the charge record holds now.
--
-- $1 charge_id text   $2 key bytea (as returned by limiter_refund.sql)
-- Returns one row per row changed: key bytea.
UPDATE phone_limits AS p
   SET (times, charges) = (SELECT * FROM callgate_log_without(p.times, p.charges, $1))
 WHERE p.key = $2 AND $1 = ANY (p.charges)
RETURNING p.key

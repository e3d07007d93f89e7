-- Give a charge's slot back. Idempotent: a second refund, or one for an unknown id, changes nothing.
--
-- $1 charge_id text
-- Returns one row: key bytea (the row the charge was recorded under, NULL when unknown),
--                  removed boolean (its entry left the live log).
WITH gone AS (
    DELETE FROM limiter_charges WHERE charge_id = $1 RETURNING key
), removed AS (
    UPDATE phone_limits AS p
       SET (times, charges) = (
           SELECT coalesce(array_agg(t ORDER BY t, c), '{}'), coalesce(array_agg(c ORDER BY t, c), '{}')
             FROM unnest(p.times, p.charges) AS u(t, c) WHERE c <> $1)
      FROM gone
     WHERE p.key = gone.key AND $1 = ANY (p.charges)
    RETURNING p.key
)
SELECT (SELECT key FROM gone) AS key, EXISTS (SELECT 1 FROM removed) AS removed

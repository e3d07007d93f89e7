-- This instance is alive; and how many are (for the per-instance share of the cap while
-- PostgreSQL is away).
--
-- $1 instance_id text   $2 dead_after_s float8 (an instance not seen this long is dead)
-- Returns one row: alive bigint (instances seen within dead_after_s, this one included).
WITH seen AS (
    INSERT INTO instances AS i (instance_id) VALUES ($1)
    ON CONFLICT (instance_id) DO UPDATE SET seen_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM instances WHERE seen_at > now() - make_interval(secs => $2)
          AND instance_id <> $1) + (SELECT count(*) FROM seen) AS alive

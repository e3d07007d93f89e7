-- Admit a call under the global cap on live calls, and record it. Runs in a transaction right
-- after `SELECT pg_advisory_xact_lock(...)` (db/calls.py), so this statement's snapshot holds
-- every admission committed before ours: instances cannot both take the last place.
--
-- $1 call_sid text  $2 charge_id text  $3 direction text  $4 region text  $5 scenario_id text
-- $6 max_live int   $7 stale_after_s float8 (an unended call older than this no longer counts:
--                   its instance died without recording the end)
-- Returns one row: admitted boolean, created boolean (false for a call recorded before, e.g.
--                  a retried webhook, which is always admitted again).
WITH live AS (
    SELECT count(*) AS n FROM calls
     WHERE ended_at IS NULL AND call_sid <> $1
       AND created_at > now() - make_interval(secs => $7)
), known AS (
    SELECT EXISTS (SELECT 1 FROM calls WHERE call_sid = $1) AS yes
), recorded AS (
    INSERT INTO calls AS c (call_sid, charge_id, direction, region, scenario_id, status, status_rank)
    SELECT $1, $2, $3, $4, $5, 'queued', 0
      FROM live, known
     WHERE known.yes OR live.n < $6
    ON CONFLICT (call_sid) DO UPDATE SET charge_id = coalesce(c.charge_id, excluded.charge_id)
    RETURNING (xmax = 0) AS created
)
SELECT EXISTS (SELECT 1 FROM recorded) AS admitted,
       coalesce((SELECT created FROM recorded), false) AS created

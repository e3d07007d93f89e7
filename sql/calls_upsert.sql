-- Record a call the voice webhook admitted (or see it again on a retried webhook).
--
-- $1 call_sid text  $2 charge_id text  $3 direction text  $4 region text  $5 scenario_id text
-- Returns one row: created boolean (false when the call was already recorded).
INSERT INTO calls AS c (call_sid, charge_id, direction, region, scenario_id, status, status_rank)
VALUES ($1, $2, $3, $4, $5, 'queued', 0)
ON CONFLICT (call_sid) DO UPDATE SET charge_id = coalesce(c.charge_id, excluded.charge_id)
RETURNING (xmax = 0) AS created

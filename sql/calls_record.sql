-- Record a call: one placed by this deployment (call.start), before Twilio reports on it, so
-- its status callbacks find the charge to refund; or one admitted while PostgreSQL was away,
-- written back now (admitted true), so it counts under the cap and its end can be recorded.
--
-- $1 call_sid text  $2 charge_id text  $3 direction text  $4 region text  $5 scenario_id text
-- $6 admitted boolean  $7 number_masked text (the other party's number as the logs show it)
-- Returns nothing.
INSERT INTO calls AS c (call_sid, charge_id, direction, region, scenario_id, status, status_rank, admitted_at,
                        number_masked)
VALUES ($1, $2, $3, $4, $5, 'queued', 0, CASE WHEN $6 THEN now() END, $7)
ON CONFLICT (call_sid) DO UPDATE
   SET charge_id = coalesce(c.charge_id, excluded.charge_id),
       direction = CASE WHEN c.direction = 'unknown' THEN excluded.direction ELSE c.direction END,
       region = CASE WHEN c.region = '' THEN excluded.region ELSE c.region END,
       scenario_id = coalesce(c.scenario_id, excluded.scenario_id),
       admitted_at = coalesce(c.admitted_at, excluded.admitted_at),
       number_masked = coalesce(c.number_masked, excluded.number_masked)

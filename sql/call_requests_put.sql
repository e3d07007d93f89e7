-- Remember what an outbound call is for, before it is placed.
--
-- $1 reservation_id text  $2 scenario_id text  $3 config jsonb (as text)  $4 voice text
-- Returns nothing.
INSERT INTO call_requests (reservation_id, scenario_id, config, voice) VALUES ($1, $2, $3::jsonb, $4)

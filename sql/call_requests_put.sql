-- Remember what a call is for: an outbound call's, before it is placed; a ringing call's
-- scenario config too long to travel in the stream's parameters. A second put under the
-- same id (a retried webhook) keeps the first.
--
-- $1 reservation_id text  $2 scenario_id text  $3 config jsonb (as text)  $4 voice text
-- Returns nothing.
INSERT INTO call_requests (reservation_id, scenario_id, config, voice) VALUES ($1, $2, $3::jsonb, $4)
ON CONFLICT (reservation_id) DO NOTHING

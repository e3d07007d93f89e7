-- What an outbound call is for (the voice webhook asks, by reservation id).
--
-- $1 reservation_id text
-- Returns zero or one row: scenario_id text, config text (JSON), voice text.
SELECT scenario_id, config::text AS config, voice FROM call_requests WHERE reservation_id = $1

-- This instance stops (a clean shutdown, after its calls ended): it is no longer alive.
--
-- $1 instance_id text
-- Returns nothing.
DELETE FROM instances WHERE instance_id = $1

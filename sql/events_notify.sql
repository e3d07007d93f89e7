-- Send call events to every instance (bridge/fanout.py): each one LISTENs on the channel.
--
-- $1 channel text   $2 payload text (JSON, under 8000 bytes)
-- Returns one row.
SELECT pg_notify($1, $2)

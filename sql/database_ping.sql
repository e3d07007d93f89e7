-- Is PostgreSQL there? The cheapest statement that needs the server to answer (health checks,
-- the limiter noticing the database is back, the fan-out's listening connection).
--
-- No parameters. Returns one row: ok integer (1).
SELECT 1 AS ok

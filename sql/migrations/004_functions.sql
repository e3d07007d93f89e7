-- Pieces that several statements in sql/ share, as functions, so each is written once.
--
-- Functions are versioned with the schema: like every migration, this file never changes once
-- applied anywhere. A change to a function is a new migration that replaces it (CREATE OR
-- REPLACE FUNCTION), so schema_migrations says which version of a rule a database runs. The
-- sliding-log admission rule itself, callgate_limiter_admit, is 001's.

-- "Now" in epoch ms: the time a test passes (`given`), else the database's clock at the start
-- of the statement. statement_timestamp() is the same for every row of one statement and, being
-- the database's, the same for every instance, whatever their own clocks say.
CREATE FUNCTION callgate_now_ms(given bigint) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(given, floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint)
$$;

-- A sliding log without one charge: the parallel arrays (times, charge ids) rebuilt in order
-- with `charge`'s entry left out. What a refund does to the row it finds.
CREATE FUNCTION callgate_log_without(log_times bigint[], log_charges text[], charge text,
    OUT times bigint[], OUT charges text[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(t ORDER BY t, c), '{}'), coalesce(array_agg(c ORDER BY t, c), '{}')
      FROM unnest(log_times, log_charges) AS u(t, c) WHERE c <> charge
$$;

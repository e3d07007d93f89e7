-- Group commit for the limiter: several decisions in one statement, one transaction, one
-- commit. A decision was one statement of its own (sql/limiter_hit.sql), so each paid a
-- round trip, a transaction and a commit: PostgreSQL spent ten times a `SELECT 1` on each
-- (bench/limiter_bench.py, per PostgreSQL CPU-second). limiter/batch.py now sends the
-- decisions that wait at the same moment together, through sql/limiter_hit.sql.
--
-- callgate_limiter_charge is that one decision, unchanged: the statement sql/limiter_hit.sql
-- held until now, with the same $1..$9. Called once per decision from one statement, it is
-- VOLATILE, so each call runs with a fresh snapshot and sees the decisions before it in the
-- batch; and it takes its phone_limits row's lock like before (ON CONFLICT DO UPDATE), held
-- now to the batch's commit. Batches lock rows in key order (the client sorts them), so two
-- batches never wait for each other in a cycle.
--
-- $1 key bytea        HMAC of the number under the current key
-- $2 charge_id text   CallSid or reservation id; charging is idempotent per id
-- $3 max_calls int    $4 window_ms bigint    $5 cooldown_ms bigint
-- $6 now_ms bigint    NULL: the database clock (all instances agree); tests pass a time
-- $7 at_ms bigint     NULL: now; else when the charge was made (replays from memory mode)
-- $8 force boolean    record even over the limit (a charge that already happened)
-- $9 region text      ISO region, for analytics
-- Returns one row: times bigint[], charges text[] (the live log after the decision),
--                  now_ms bigint, admitted boolean (true also for a charge id already charged).
--
-- Why one decision is exact under concurrency: ON CONFLICT DO UPDATE locks the conflicting row
-- and evaluates SET against that locked, latest version, so concurrent decisions on one number
-- run one after another. Nothing here reads phone_limits through the statement's snapshot.
-- Lock order, the same in every statement here: the phone_limits row, then limiter_charges.
CREATE FUNCTION callgate_limiter_charge(bytea, text, integer, bigint, bigint, bigint, bigint, boolean, text)
RETURNS TABLE (times bigint[], charges text[], now_ms bigint, admitted boolean)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH clock AS (
        SELECT callgate_now_ms($6) AS now_ms
    ), known AS (
        -- Snapshot read, but only for charges old enough to have left the log, or refunded;
        -- recent duplicates are caught inside the locked row.
        SELECT EXISTS (SELECT 1 FROM limiter_charges WHERE charge_id = $2) AS seen
    ), decided AS (
        INSERT INTO phone_limits AS p (key, region, times, charges)
        SELECT $1, $9, d.times, d.charges
          FROM clock, known,
               callgate_limiter_admit('{}', '{}', $2, coalesce($7, clock.now_ms), clock.now_ms,
                                      $3, $4, $5, $8, known.seen) AS d
        ON CONFLICT (key) DO UPDATE SET (times, charges) = (
            SELECT d.times, d.charges
              FROM clock, known,
                   callgate_limiter_admit(p.times, p.charges, $2, coalesce($7, clock.now_ms), clock.now_ms,
                                          $3, $4, $5, $8, known.seen) AS d)
        RETURNING p.times, p.charges
    ), recorded AS (
        INSERT INTO limiter_charges (charge_id, key, charged_at)
        SELECT $2, $1, coalesce($7, clock.now_ms) FROM decided, clock
         WHERE $2 = ANY (decided.charges) OR $8  -- a write-back older than the window: keep its id
        ON CONFLICT (charge_id) DO NOTHING
    )
    SELECT decided.times, decided.charges, clock.now_ms, ($2 = ANY (decided.charges) OR known.seen) AS admitted
      FROM decided, clock, known;
END
$fn$;

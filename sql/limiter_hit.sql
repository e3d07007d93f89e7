-- Charge one call to a number, or refuse it: the whole decision in one statement.
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
-- Why this is exact under concurrency: ON CONFLICT DO UPDATE locks the conflicting row and
-- evaluates SET against that locked, latest version, so concurrent decisions on one number
-- run one after another. Nothing here reads phone_limits through the statement's snapshot.
-- Lock order, the same in every statement here: the phone_limits row, then limiter_charges.
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
  FROM decided, clock, known

-- Charge calls to numbers, or refuse them: a batch of decisions in one statement, so they share
-- one transaction and one commit (group commit: limiter/batch.py gathers them). Each decision
-- is callgate_limiter_charge (sql/migrations/007_limiter_group_commit.sql: why it is exact), in
-- the order given; the client gives them sorted by key, so batches lock rows in one order.
--
-- $1..$9 arrays of one length, element i for decision i:
-- $1 key bytea[]        HMAC of the number under the current key
-- $2 charge_id text[]   CallSid or reservation id; charging is idempotent per id
-- $3 max_calls int[]    $4 window_ms bigint[]    $5 cooldown_ms bigint[]
-- $6 now_ms bigint[]    NULL: the database clock (all instances agree); tests pass a time
-- $7 at_ms bigint[]     NULL: now; else when the charge was made (replays from memory mode)
-- $8 force boolean[]    record even over the limit (a charge that already happened)
-- $9 region text[]      ISO region, for analytics
-- Returns one row per decision, in order: i (1-based), times bigint[], charges text[] (the live
-- log after the decision), now_ms bigint, admitted boolean (true also for a charge id already
-- charged).
SELECT u.i, d.times, d.charges, d.now_ms, d.admitted
  FROM unnest($1::bytea[], $2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[],
              $8::boolean[], $9::text[])
       WITH ORDINALITY AS u(key, charge_id, max_calls, window_ms, cooldown_ms, now_ms, at_ms, force, region, i)
 CROSS JOIN LATERAL callgate_limiter_charge(u.key, u.charge_id, u.max_calls, u.window_ms, u.cooldown_ms,
                                            u.now_ms, u.at_ms, u.force, u.region) AS d
 ORDER BY u.i

-- The sliding-log rule (001's callgate_limiter_admit) as a PL/pgSQL loop over the row's log,
-- with the same meaning: every limiter decision runs it once or twice, and as a SQL function
-- (a query of CTEs, an unnest, an aggregate and a sort) it cost ~15 µs a call against ~7-10 µs
-- as a loop, on PostgreSQL 18, out of ~57 µs of PostgreSQL's time per decision
-- (bench/limiter_bench.py: operations per PostgreSQL CPU-second).
--
-- The loop relies on what the function always returns: a log ascending by (time, charge id),
-- with no NULL entry. Any other log (none is written, but a row edited by hand could hold one)
-- goes to 001's function, kept as callgate_limiter_admit_sorting, which sorts whatever it is
-- given; tests/test_limiter_rule.py checks the two agree.
ALTER FUNCTION callgate_limiter_admit(bigint[], text[], text, bigint, bigint, integer, bigint, bigint, boolean, boolean)
    RENAME TO callgate_limiter_admit_sorting;

CREATE FUNCTION callgate_limiter_admit(
    log_times bigint[], log_charges text[], charge text, at_ms bigint, now_ms bigint,
    max_calls integer, window_ms bigint, cooldown_ms bigint, force boolean, seen boolean,
    OUT times bigint[], OUT charges text[])
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
    since bigint := now_ms - window_ms;
    n integer := coalesce(cardinality(log_times), 0);
    live integer := 0;
    latest bigint;       -- the newest live charge's time (the log is ascending: the last one)
    already boolean := false;
    pos integer;
BEGIN
    IF n <> coalesce(cardinality(log_charges), 0) OR array_position(log_times, NULL) IS NOT NULL
       OR array_position(log_charges, NULL) IS NOT NULL THEN
        SELECT s.times, s.charges INTO times, charges
          FROM callgate_limiter_admit_sorting(log_times, log_charges, charge, at_ms, now_ms, max_calls,
                                              window_ms, cooldown_ms, force, seen) AS s;
        RETURN;
    END IF;
    times := '{}';
    charges := '{}';
    FOR i IN 1 .. n LOOP
        IF i > 1 AND (log_times[i - 1] > log_times[i]
                      OR (log_times[i - 1] = log_times[i] AND log_charges[i - 1] > log_charges[i])) THEN
            SELECT s.times, s.charges INTO times, charges  -- not ascending: sort it as 001 does
              FROM callgate_limiter_admit_sorting(log_times, log_charges, charge, at_ms, now_ms, max_calls,
                                                  window_ms, cooldown_ms, force, seen) AS s;
            RETURN;
        END IF;
        IF log_times[i] > since THEN
            times := times || log_times[i];
            charges := charges || log_charges[i];
            live := live + 1;
            latest := log_times[i];
            IF log_charges[i] = charge THEN
                already := true;
            END IF;
        END IF;
    END LOOP;
    IF NOT seen AND at_ms > since AND NOT already
       AND (force OR (live < max_calls AND (cooldown_ms <= 0 OR coalesce(now_ms - latest >= cooldown_ms, true)))) THEN
        -- In its place by (time, charge id): a write-back's charge can be older than the newest.
        pos := live + 1;
        WHILE pos > 1 AND (times[pos - 1] > at_ms OR (times[pos - 1] = at_ms AND charges[pos - 1] > charge)) LOOP
            pos := pos - 1;
        END LOOP;
        times := times[1:pos - 1] || at_ms || times[pos:live];
        charges := charges[1:pos - 1] || charge || charges[pos:live];
    END IF;
END
$fn$;

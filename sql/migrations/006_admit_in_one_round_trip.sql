-- The webhook's admission in one round trip. It ran as BEGIN, the admission lock, the
-- admission, COMMIT: four round trips per call, with the lock held across two of them, so a
-- busy instance (its event loop late to send the COMMIT) held every instance's admissions up.
-- A VOLATILE PL/pgSQL function takes the lock, then runs the admission with a snapshot taken
-- after it (each statement of a VOLATILE function gets a fresh one under READ COMMITTED): the
-- same guarantee (every admission committed before ours is counted), one round trip, and the
-- lock released at the statement's own commit.
--
-- Parameters as sql/calls_admit.sql's $1..$10, then $11 the lock (db/calls.py's ADMISSION_LOCK).
CREATE FUNCTION callgate_admit(text, text, text, text, text, int, float8, float8, float8, jsonb, bigint)
RETURNS TABLE (state text, admitted boolean, stream_params jsonb)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock($11);
    RETURN QUERY
    WITH existing AS (
        SELECT * FROM calls WHERE call_sid = $1
    ), state AS (
        SELECT CASE WHEN e.call_sid IS NULL OR (e.admitted_at IS NULL AND e.ended_at IS NULL) THEN 'new'
                    WHEN e.ended_at IS NOT NULL THEN 'ended'
                    WHEN e.streamed_at IS NOT NULL THEN 'streaming'
                    WHEN e.admitted_at > now() - make_interval(secs => $8) THEN 'pending'
                    ELSE 'ended' END AS name
          FROM (SELECT 1) AS one LEFT JOIN existing AS e ON true
    ), decided AS (
        SELECT state.name,
               state.name = 'new' AND (
                   EXISTS (SELECT 1 FROM cap_holds WHERE reservation_id = $2 AND released_at IS NULL
                              AND created_at > now() - make_interval(secs => $9))
                   OR callgate_live_calls($1, $2, $7, $8, $9) < $6) AS take
          FROM state
    ), recorded AS (
        INSERT INTO calls AS c (call_sid, charge_id, direction, region, scenario_id, status, status_rank,
                                admitted_at, stream_params)
        SELECT $1, $2, $3, $4, $5, 'queued', 0, now(), $10 FROM decided WHERE take
        ON CONFLICT (call_sid) DO UPDATE
           SET charge_id = coalesce(c.charge_id, excluded.charge_id),
               direction = CASE WHEN c.direction = 'unknown' THEN excluded.direction ELSE c.direction END,
               region = CASE WHEN c.region = '' THEN excluded.region ELSE c.region END,
               scenario_id = coalesce(c.scenario_id, excluded.scenario_id),
               admitted_at = excluded.admitted_at,
               stream_params = excluded.stream_params
        RETURNING 1
    ), released AS (
        -- The call is here: its hold becomes the call's own place.
        UPDATE cap_holds SET released_at = now()
         WHERE reservation_id = $2 AND released_at IS NULL AND (SELECT take FROM decided)
        RETURNING 1
    )
    SELECT decided.name AS state,
           decided.take OR decided.name = 'pending' AS admitted,
           CASE WHEN decided.name = 'pending' THEN (SELECT stream_params FROM existing) ELSE $10 END AS stream_params
      FROM decided;
END
$fn$;

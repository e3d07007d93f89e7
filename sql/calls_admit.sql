-- The voice webhook's admission: the call's state, and whether it is taken under the global
-- cap. Runs in a transaction right after calls_admit_lock.sql, so this statement's snapshot
-- holds every admission committed before ours: instances cannot both take the last place.
--
-- $1 call_sid text  $2 charge_id text  $3 direction text  $4 region text  $5 scenario_id text
-- $6 max_live int   $7 session_s float8 (a streaming call counts this long at most: the
--   session limit plus a grace; after that its instance died without saying so)
-- $8 setup_s float8 (an admitted call counts this long before its stream starts)
-- $9 hold_s float8 (an outbound call's hold counts this long: its ring timeout plus a grace)
-- $10 stream_params jsonb (the <Parameter>s a new admission answers with)
-- Returns one row:
--   state text: new (never admitted: decided now), pending (admitted, no stream yet: a retried
--     webhook, answered as before), streaming (it has its stream), ended (a final status, or
--     admitted too long ago without a stream: a replay)
--   admitted boolean: new and taken (its hold was its place, or the cap had room), or pending
--   stream_params jsonb: what to answer with (pending: the earlier answer)
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
  FROM decided

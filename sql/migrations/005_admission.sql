-- The global cap on live calls, replays, and instances that die.
--
-- A call counts under RATE_LIMIT_MAX_CONCURRENT_CALLS from its admission (the voice webhook
-- took it) to its end: while it streams, for at most the session limit plus a grace; admitted
-- but not streaming yet, for at most a short setup window. An outbound call holds a place from
-- before it is placed (cap_holds) until it is answered, fails, or its ring timeout passes.
ALTER TABLE calls
    ADD COLUMN admitted_at   timestamptz,   -- the voice webhook admitted it (NULL: only recorded)
    ADD COLUMN streamed_at   timestamptz,   -- its one media stream started
    ADD COLUMN instance_id   text,          -- the instance that streams it
    ADD COLUMN stream_params jsonb;         -- the <Parameter>s its webhook answered with: a
                                            -- retried webhook gets the same ones
CREATE INDEX calls_streaming ON calls (instance_id) WHERE ended_at IS NULL AND streamed_at IS NOT NULL;
DROP INDEX calls_live;
CREATE INDEX calls_live ON calls (admitted_at) WHERE ended_at IS NULL AND admitted_at IS NOT NULL;

-- A place under the cap held for an outbound call while it rings, by its reservation id.
CREATE TABLE cap_holds (
    reservation_id text        PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    released_at    timestamptz
);

-- Every running instance says it is alive here; one that stops saying so is dead, and any
-- other ends its calls.
CREATE TABLE instances (
    instance_id text        PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- The calls that count under the cap right now, the admission rule's one definition (used by
-- calls_admit.sql and calls_hold.sql, under the admission lock). Versioned like every function
-- here: a change to the rule is a new migration replacing this one.
CREATE FUNCTION callgate_live_calls(except_call text, except_hold text, session_s float8,
                                    setup_s float8, hold_s float8) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM calls
             WHERE ended_at IS NULL AND admitted_at IS NOT NULL AND call_sid IS DISTINCT FROM except_call
               AND CASE WHEN streamed_at IS NOT NULL THEN streamed_at > now() - make_interval(secs => session_s)
                        ELSE admitted_at > now() - make_interval(secs => setup_s) END)
         + (SELECT count(*) FROM cap_holds
             WHERE released_at IS NULL AND reservation_id IS DISTINCT FROM except_hold
               AND created_at > now() - make_interval(secs => hold_s))
$$;

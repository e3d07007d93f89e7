-- Calls: one row per Twilio call this deployment handled, whichever instance handled it.
-- Holds no phone number: the limited number is only ever known by its limiter key.
CREATE TABLE calls (
    call_sid     text        PRIMARY KEY,
    charge_id    text,                       -- the limiter charge for this call (refunded on no-answer...)
    direction    text        NOT NULL,       -- inbound | outbound-api | ...
    region       text        NOT NULL DEFAULT '',
    scenario_id  text,
    status       text        NOT NULL,       -- the latest status (SPEC §6 names)
    status_rank  integer     NOT NULL,       -- statuses only move forward: a late "ringing" never undoes "ended"
    end_reason   text,
    refunded     boolean     NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    connected_at timestamptz,
    ended_at     timestamptz
);
CREATE INDEX calls_live ON calls (connected_at) WHERE ended_at IS NULL;

-- Per-call stream tokens already used: a token opens one media stream, once, on any instance.
CREATE TABLE stream_tokens_used (
    jti     text        PRIMARY KEY,
    used_at timestamptz NOT NULL DEFAULT now()
);

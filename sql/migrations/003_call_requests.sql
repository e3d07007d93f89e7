-- Outbound calls asked for by a frontend (call.start): what the agent should do on the call,
-- kept until Twilio fetches the call's TwiML. Keyed by the reservation id the call was charged
-- under, which the webhook URL carries. Holds no phone number.
CREATE TABLE call_requests (
    reservation_id text        PRIMARY KEY,
    scenario_id    text        NOT NULL,
    config         jsonb       NOT NULL,
    voice          text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The per-phone-number limiter: one row per number (keyed by an HMAC of its E.164 form),
-- holding the sliding log of its charged calls in this window.
--
-- phone_limits.times / .charges are parallel arrays, ascending by time: the epoch-ms time of
-- each live charge and the charge id (CallSid or reservation id) that made it. Keeping the
-- charge ids inside the row lets one locked row decide both "is there room" and "was this
-- charge already made", so concurrent duplicates cannot both be admitted.
-- Only the primary key is indexed and it is never updated, and the fill factor leaves room on
-- each page, so every decision is a HOT update.
CREATE TABLE phone_limits (
    key     bytea    PRIMARY KEY CHECK (octet_length(key) = 32),
    region  text     NOT NULL DEFAULT '',      -- ISO region of the number, for analytics only
    times   bigint[] NOT NULL DEFAULT '{}',
    charges text[]   NOT NULL DEFAULT '{}'
) WITH (fillfactor = 70);

-- Every admitted charge, kept past its window: refund(charge_id) finds its row through it,
-- and a webhook replayed after the charge left the log, or after a refund, charges nothing.
-- A refund leaves a tombstone (refunded_at) rather than deleting, for that reason.
CREATE TABLE limiter_charges (
    charge_id   text   PRIMARY KEY,
    key         bytea  NOT NULL,
    charged_at  bigint NOT NULL,               -- epoch ms
    refunded_at bigint                         -- epoch ms, when refunded
);
CREATE INDEX limiter_charges_key ON limiter_charges (key);
CREATE INDEX limiter_charges_charged_at ON limiter_charges (charged_at);

-- The sliding-log rule, applied to one row's log. Pure: the caller supplies the row (locked)
-- and "now". Returns the live log after the decision: the entries still inside the window,
-- plus (charge, at) when the charge is admitted. The charge is admitted when it is not
-- already in the log or known from earlier (`seen`), its time is still inside the window, and
-- either `force` is set (a charge made while the database was away, written back now) or
-- there is room and the cooldown since the newest charge has passed.
CREATE FUNCTION callgate_limiter_admit(
    log_times bigint[], log_charges text[], charge text, at_ms bigint, now_ms bigint,
    max_calls integer, window_ms bigint, cooldown_ms bigint, force boolean, seen boolean,
    OUT times bigint[], OUT charges text[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    WITH live AS (
        SELECT t, c FROM unnest(log_times, log_charges) AS u(t, c) WHERE t > now_ms - window_ms
    ), admit AS (
        SELECT NOT seen
           AND at_ms > now_ms - window_ms
           AND NOT EXISTS (SELECT 1 FROM live WHERE c = charge)
           AND (force OR (
                    (SELECT count(*) FROM live) < max_calls
                AND (cooldown_ms <= 0 OR coalesce(now_ms - (SELECT max(t) FROM live) >= cooldown_ms, true))
           )) AS ok
    )
    SELECT coalesce(array_agg(t ORDER BY t, c), '{}'), coalesce(array_agg(c ORDER BY t, c), '{}')
      FROM (SELECT t, c FROM live UNION ALL SELECT at_ms, charge FROM admit WHERE ok) AS entries
$$;

-- Give an outbound call's place under the cap back: Twilio refused to place it, or it ended
-- without being answered (busy, no-answer, failed, canceled). Idempotent.
--
-- $1 reservation_id text
-- Returns nothing.
UPDATE cap_holds SET released_at = now() WHERE reservation_id = $1 AND released_at IS NULL

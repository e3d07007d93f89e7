-- Mark a call's charge refunded, once.
--
-- $1 call_sid text
-- Returns one row when this call marked it (so exactly one caller refunds): charge_id text.
UPDATE calls SET refunded = true
 WHERE call_sid = $1 AND NOT refunded AND charge_id IS NOT NULL
RETURNING charge_id

-- Say why a call ended when its final status was recorded without a reason (Twilio's
-- "completed" callback can land before the bridge finishes the call).
--
-- $1 call_sid text  $2 end_reason text
-- Returns one row when the reason was filled in: call_sid text.
UPDATE calls SET end_reason = $2 WHERE call_sid = $1 AND end_reason IS NULL
RETURNING call_sid

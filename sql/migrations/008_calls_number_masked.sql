-- The other party's number, masked as in the logs (+1415•••0100: the caller of an inbound call,
-- the number called of an outbound one), so an operator's page can tell calls apart. Masked,
-- never whole: the table still holds no phone number (the limiter keys numbers by HMAC).
ALTER TABLE calls ADD COLUMN number_masked text;

-- The webhook's admission with the masked number: callgate_admit (006) unchanged, then the
-- number written on the row it took, in the same statement, so still one round trip. A
-- statement of a VOLATILE function sees what the one before it wrote.
--
-- Parameters: callgate_admit's $1..$11, then $12 the masked number.
CREATE FUNCTION callgate_admit_numbered(text, text, text, text, text, int, float8, float8, float8, jsonb, bigint,
                                        text)
RETURNS TABLE (state text, admitted boolean, stream_params jsonb)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    decided record;
BEGIN
    SELECT * INTO decided FROM callgate_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);
    IF decided.state = 'new' AND decided.admitted THEN
        UPDATE calls SET number_masked = $12 WHERE call_sid = $1 AND number_masked IS NULL;
    END IF;
    RETURN QUERY SELECT decided.state, decided.admitted, decided.stream_params;
END
$fn$;

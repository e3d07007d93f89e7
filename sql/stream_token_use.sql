-- Spend a stream token: true the first time, on any instance; false ever after.
--
-- $1 jti text
-- Returns one row: first boolean.
WITH spent AS (
    INSERT INTO stream_tokens_used (jti) VALUES ($1) ON CONFLICT (jti) DO NOTHING RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM spent) AS first

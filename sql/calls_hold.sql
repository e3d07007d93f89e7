-- Hold a place under the global cap for an outbound call before it is placed (call.start).
-- Runs in a transaction right after calls_admit_lock.sql, like calls_admit.sql.
--
-- $1 reservation_id text  $2 max_live int  $3 session_s float8  $4 setup_s float8  $5 hold_s float8
--   (as in calls_admit.sql)
-- Returns one row: held boolean.
WITH held AS (
    INSERT INTO cap_holds (reservation_id)
    SELECT $1 WHERE callgate_live_calls(NULL, $1, $3, $4, $5) < $2
    ON CONFLICT (reservation_id) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM held) AS held

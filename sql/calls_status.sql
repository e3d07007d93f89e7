-- Move a call to a status, never backwards: a duplicate or late callback changes nothing.
--
-- $1 call_sid text  $2 status text  $3 rank integer  $4 reason text (or NULL)
-- $5 charge_id text (or NULL): the charge a status callback's signed URL names, so a call
--    whose callback beats the recording of the call (call.start) can still be refunded
-- $6 final_rank integer: statuses of this rank and above end the call (calls/status.py)
-- Returns one row when the status changed: charge_id text, refunded boolean, direction text.
-- A call not recorded yet is recorded here.
INSERT INTO calls AS c (call_sid, charge_id, direction, status, status_rank, end_reason,
                        connected_at, ended_at)
VALUES ($1, $5, 'unknown', $2, $3, $4,
        CASE WHEN $2 IN ('connected', 'in-progress') THEN now() END,
        CASE WHEN $3::integer >= $6::integer THEN now() END)
ON CONFLICT (call_sid) DO UPDATE
   SET status = excluded.status,
       status_rank = excluded.status_rank,
       charge_id = coalesce(c.charge_id, excluded.charge_id),
       end_reason = coalesce(c.end_reason, excluded.end_reason),
       connected_at = coalesce(c.connected_at, excluded.connected_at),
       ended_at = coalesce(c.ended_at, excluded.ended_at)
 WHERE c.status_rank < excluded.status_rank
RETURNING c.charge_id, c.refunded, c.direction

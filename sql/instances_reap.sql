-- End the calls of instances that died (SIGKILL, a lost machine): forget every instance not
-- seen for dead_after_s, and end the calls they were streaming, with the reason
-- instance_lost. Any instance may run it at any time; two at once end each call once (the
-- UPDATE re-checks ended_at on the row's latest version).
--
-- $1 dead_after_s float8   $2 final_rank integer (calls/status.py)
-- Returns one row per call ended now: call_sid text.
WITH dead AS (
    DELETE FROM instances WHERE seen_at <= now() - make_interval(secs => $1) RETURNING instance_id
)
UPDATE calls SET status = 'ended', status_rank = $2, end_reason = coalesce(end_reason, 'instance_lost'),
                 ended_at = now()
 WHERE ended_at IS NULL AND streamed_at IS NOT NULL
   AND (instance_id IN (SELECT instance_id FROM dead)
        OR instance_id NOT IN (SELECT instance_id FROM instances))
RETURNING call_sid

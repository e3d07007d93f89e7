-- The calls not over yet, on any instance: what the all-calls monitor is shown when it
-- subscribes (handlers/frontend.py), so an operator opening the page mid-call sees every call.
--
-- $1 max_age_s float8 (a call older than the longest session plus a grace is not live, ended or not)
-- Returns, for at most 1000 calls, newest first, the columns of sql/calls_get.sql (the monitor
-- shows each call's record at once, not one more read per call).
SELECT call_sid, charge_id, direction, region, scenario_id, status, end_reason, refunded,
       created_at, connected_at, ended_at, admitted_at, streamed_at, instance_id, number_masked
  FROM calls
 WHERE ended_at IS NULL AND created_at > now() - make_interval(secs => $1)
 ORDER BY created_at DESC
 LIMIT 1000

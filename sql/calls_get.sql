-- One call's record.
--
-- $1 call_sid text
-- Returns zero or one row: call_sid, charge_id, direction, region, scenario_id, status,
--   end_reason, refunded, created_at, connected_at, ended_at, admitted_at, streamed_at,
--   instance_id (the instance streaming it), number_masked (the other party's, masked; NULL
--   when the record came from a status callback alone).
SELECT call_sid, charge_id, direction, region, scenario_id, status, end_reason, refunded,
       created_at, connected_at, ended_at, admitted_at, streamed_at, instance_id, number_masked
  FROM calls WHERE call_sid = $1

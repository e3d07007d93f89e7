-- One call's record.
--
-- $1 call_sid text
-- Returns zero or one row: call_sid, charge_id, direction, region, scenario_id, status,
--   end_reason, refunded, created_at, connected_at, ended_at.
SELECT call_sid, charge_id, direction, region, scenario_id, status, end_reason, refunded,
       created_at, connected_at, ended_at
  FROM calls WHERE call_sid = $1

-- The admission rule's lock, taken first in the transaction that runs calls_admit.sql: every
-- instance admits calls one at a time, so calls_admit.sql's snapshot holds every admission
-- committed before ours, and two instances cannot both take the last place under the cap.
-- Released at the transaction's end.
--
-- $1 lock bigint (db/calls.py's ADMISSION_LOCK)
-- Returns one row.
SELECT pg_advisory_xact_lock($1)

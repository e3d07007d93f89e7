-- Second statement of a key rotation's move, in the same transaction as limiter_rekey.sql:
-- point the moved charges' records at the current key. A statement of its own so that its
-- snapshot sees records committed while the move waited for the old rows' locks.
--
-- $1 key bytea   $2 charge_ids text[] (as returned by limiter_rekey.sql)
-- Returns nothing.
UPDATE limiter_charges SET key = $1 WHERE charge_id = ANY ($2::text[]) AND key <> $1

"""Warming a new pool connection before it is lent: the statements of a call's set-up are run
once on it, with throwaway arguments, in a transaction rolled back.

The first time a PostgreSQL backend runs one of them it parses and plans it, loads the catalog
entries it touches and compiles the PL/pgSQL functions it calls: ~10 ms for ``limiter_hit``,
~2 ms for ``calls_admit``, against ~1 ms once warm (a fresh connection, PostgreSQL 15). asyncpg
prepares each statement once per connection as well. Cold, the pool made the first decisions
of a burst wait tens of ms each, and those behind them longer (limiter p99 57 ms in the first
200 ms of a 150 calls/s burst, bench/calls.py); warmed when the connection opens, that cost is
paid while no call waits (DatabaseGate opens the whole pool once PostgreSQL answers).

Rolled back, the statements change nothing: no charge, no call, no token, no notification
(NOTIFY is delivered at commit only). The admission takes an advisory lock of the
connection's own, not the admission lock: no admission, and no other warm-up, waits for it.
"""

from __future__ import annotations

import asyncpg

from db.sql import Queries

# Per connection (its backend's pid), so connections warming together do not wait on each
# other's rows: a CallSid, charge id and token id no real one is (Twilio's are CA + 32 hex),
# and a number's key no real one's HMAC-SHA256 is (28 zero bytes first).
WARM_ID = "warm-up-{}"
WARM_LOCK = 0x4347_5741_524D_0000  # "CGWARM" and the backend's pid: an advisory lock nobody else takes


async def warm_up(conn: asyncpg.Connection, q: Queries) -> None:
    """Run the hot statements on ``conn``, then roll them back (see the module's doc)."""
    pid = conn.get_server_pid()
    key, ident = bytes(28) + pid.to_bytes(4, "big"), WARM_ID.format(pid)
    transaction = conn.transaction()
    await transaction.start()
    try:
        # $n as each file's header names them.
        await conn.fetch(q.limiter_hit, [key], [ident], [1], [1000], [0], [None], [None], [False], ["ZZ"])
        # Not the admission lock, so no admission waits for this; one of its own per connection,
        # so warm-ups (of every instance) do not wait for each other either.
        await conn.fetchrow(q.calls_admit, ident, ident, "inbound", "ZZ", "default", 1, 1.0, 1.0, 1.0, "{}",
                            WARM_LOCK + pid, "")
        await conn.fetchrow(q.calls_stream_start, ident, ident, ident, 30, "connected")
        await conn.fetchrow(q.calls_status, ident, "ended", 100, "warm-up", None, 100)
        await conn.fetchrow(q.calls_end_reason, ident, "warm-up")
        await conn.fetchrow(q.limiter_refund, ident)
        await conn.fetchrow(q.calls_mark_refunded, ident)
        await conn.execute(q.events_notify, "callgate_warm_up", "{}")
    finally:
        await transaction.rollback()

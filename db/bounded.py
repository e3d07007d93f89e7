"""One statement (or a short transaction) on a pooled connection, bounded in time, whatever
PostgreSQL does: the limiter, the call store and the fan-out all go through here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from db.errors import AWAY


class DatabaseAway(Exception):
    """PostgreSQL could not be reached or did not answer in time (the cause is chained).
    ``sent``: a connection was in hand, so the work may have reached the server."""

    def __init__(self, cause: BaseException, *, sent: bool) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.sent = sent


async def run_bounded(pool: asyncpg.Pool, work: Callable[[asyncpg.Connection], Awaitable[Any]],
                      seconds: float) -> Any:
    """``work(conn)`` within ``seconds``: pool acquire, the work and the release. Raises
    DatabaseAway for an outage; any other asyncpg error (a bug) as it came."""
    conn = None
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        if seconds <= 0:
            raise TimeoutError
        async with asyncio.timeout_at(deadline):
            conn = await pool.acquire()
            result = await work(conn)
        # Within what is left of the time: asyncpg ends the connection itself when its reset
        # takes longer. The answer is in hand; a failure here only costs the connection.
        held, conn = conn, None
        with contextlib.suppress(*AWAY, asyncpg.PostgresError):
            await pool.release(held, timeout=max(deadline - asyncio.get_running_loop().time(), 0.05))
        return result
    except AWAY as exc:
        raise DatabaseAway(exc, sent=conn is not None) from exc
    finally:
        if conn is not None:
            # Its state is unknown (a statement may still run on it): never lend it again.
            # Releasing it would wait for a reset, unbounded on a stalled server; a
            # connection the server dropped is back in the pool already (InterfaceError).
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
                await pool.release(conn)

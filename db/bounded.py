"""One statement (or a short transaction) on a pooled connection, bounded in time, whatever
PostgreSQL does; and the gate that knows whether PostgreSQL is there at all. The limiter, the
call store and the fan-out all go through here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from db.errors import AWAY

log = logging.getLogger("callgate.db")

PROBE_EVERY_S = 2.0         # while PostgreSQL answers: how fresh `up` is
PROBE_MAX_BACKOFF_S = 10.0  # while it is away: the longest wait between two probes


class DatabaseAway(Exception):
    """PostgreSQL could not be reached or did not answer in time (the cause is chained).
    ``sent``: a connection was in hand, so the work may have reached the server."""

    def __init__(self, cause: BaseException, *, sent: bool) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}" if str(cause) else
                         f"{type(cause).__name__}: no answer in time")
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


class DatabaseGate:
    """Whether PostgreSQL answers, as every user of the pool sees it, and the one way to use it.

    ``run`` is ``run_bounded``, with one difference: once PostgreSQL is known to be away, calls
    fail at once (DatabaseAway, ``sent`` False) instead of each waiting out its timeout, until
    ``watch``'s next probe finds it back. So during an outage a request pays at most the one
    timeout that discovered it, and ``up`` answers health checks without touching the network.

    ``watch`` also brings the schema up: a server can start while PostgreSQL is away; the first
    probe that reaches it migrates, then the gate opens.
    """

    def __init__(self, pool: asyncpg.Pool, probe_sql: str, migrate: Callable[[asyncpg.Connection], Awaitable[Any]],
                 timeout: float, warm_up: Callable[[asyncpg.Connection], Awaitable[Any]] | None = None) -> None:
        """``warm_up``: run on each connection the pool opens once the schema is migrated (and on
        the one that migrated it), before it is lent (db/warmup.py); the pool calls
        ``on_connect``."""
        self.pool = pool
        self.up = False            # PostgreSQL answered the last call or probe (and is migrated)
        self.migrated = False
        self.applied: list[str] = []  # migrations this process applied
        self._probe_sql = probe_sql
        self._migrate = migrate
        self._warm_up = warm_up
        self._warm_up_failed = 0  # connections PostgreSQL would not let warm (logged)
        self._timeout = timeout
        self.became_up = asyncio.Event()  # set each time it comes (back) up; for write-backs
        self.up_since = 0.0  # time.monotonic() when it last came (back) up
        self.outages = 0     # times it went away since this process started
        self._warming: asyncio.Task | None = None  # held: the loop keeps only a weak reference

    async def run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]], seconds: float) -> Any:
        if not self.up:
            raise DatabaseAway(ConnectionError("PostgreSQL is away (until the next probe finds it back)"), sent=False)
        try:
            return await run_bounded(self.pool, work, seconds)
        except DatabaseAway as exc:
            self._set(False, exc)
            raise

    async def probe(self) -> bool:
        """Try PostgreSQL now (migrating first if that is still to do); returns ``up``."""
        async def check(conn: asyncpg.Connection) -> None:
            if not self.migrated:
                self.applied = await self._migrate(conn)
                self.migrated = True
                await self.on_connect(conn)  # opened before the schema was there: cold
            await conn.fetchval(self._probe_sql)

        try:
            if not self.migrated:
                # First whether it answers at all, within one timeout (a black hole at start must
                # not keep the server from listening); then the migration, which may wait for
                # another instance's, with longer than one statement.
                await run_bounded(self.pool, lambda conn: conn.fetchval(self._probe_sql), self._timeout)
            await run_bounded(self.pool, check, self._timeout if self.migrated else max(self._timeout, 30.0))
        except DatabaseAway as exc:
            self._set(False, exc)
        else:
            self._set(True)
        return self.up

    async def on_connect(self, conn: asyncpg.Connection) -> None:
        """The pool's ``init``: a new connection, warmed before it is lent (once migrated: before
        that its statements do not exist yet). Warming is an optimisation, never a reason to
        refuse a connection PostgreSQL gave: one it refuses for another reason (a read-only
        database, a permission) is lent cold, with a warning. If the connection breaks, or the
        caller's time runs out meanwhile, it is ended at once, not closed politely: asyncpg
        would otherwise close it with a cancel request, bounded only by the command timeout,
        well past the caller's own bound."""
        if not self.migrated or self._warm_up is None:
            return
        try:
            await self._warm_up(conn)
        except (*AWAY, asyncio.CancelledError):
            conn.terminate()
            raise
        except asyncpg.PostgresError as exc:
            self._warm_up_failed += 1
            if self._warm_up_failed == 1 or self._warm_up_failed % 100 == 0:
                log.warning("a new PostgreSQL connection could not be warmed (%s: %s); it is used cold "
                            "(%d so far)", type(exc).__name__, str(exc)[:200], self._warm_up_failed)

    async def _warm(self) -> None:
        """Open the whole pool now, not during the next burst of calls: each new connection
        costs a PostgreSQL backend and asyncpg's type introspection, tens of ms, which the
        first calls of a burst waited for (set-up p99 of 0.7 s on a fresh server, bench/calls.py)."""
        async def hold(conn: asyncpg.Connection) -> None:
            await conn.fetchval(self._probe_sql)
            await asyncio.sleep(0)  # (several are held at once, so each opens its own)

        size = self.pool.get_max_size()
        # Best effort: a connection that fails to open now is opened when first needed, as before.
        await asyncio.gather(*(run_bounded(self.pool, hold, max(self._timeout, 5.0)) for _ in range(size)),
                             return_exceptions=True)

    async def watch(self) -> None:
        """Background duty until cancelled: probe every PROBE_EVERY_S while up (so ``up`` is
        fresh); while away, with a back-off doubling up to PROBE_MAX_BACKOFF_S."""
        backoff = PROBE_EVERY_S
        while True:
            await asyncio.sleep(PROBE_EVERY_S if self.up else backoff)
            backoff = PROBE_EVERY_S if await self.probe() else min(backoff * 2, PROBE_MAX_BACKOFF_S)

    def _set(self, up: bool, exc: BaseException | None = None) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("PostgreSQL is available")
            self.up_since = time.monotonic()
            self.became_up.set()
            self._warming = asyncio.get_running_loop().create_task(self._warm())
        else:
            self.outages += 1
            log.warning("PostgreSQL is unavailable (%s); decisions fall back until it answers",
                        str(exc)[:200] if exc is not None else "no answer")
            self.became_up.clear()

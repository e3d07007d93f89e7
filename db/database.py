"""The database resource: the embedded server (when no DSN is configured), the asyncpg pool
and the schema, started and ended in one place.

``open_database(settings)`` is an async context manager: on entry the server is running, the
migrations are applied and the pool is open; on exit the pool closes, then the embedded
server (if we started it) stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from config import Settings
from db.bounded import DatabaseGate
from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from db.sql import Queries
from db.warmup import warm_up

log = logging.getLogger("callgate.db")


def server_settings(client_timeout_ms: int) -> dict[str, str]:
    """Server-side bounds, so a stuck statement or lock wait ends on the server too, not only
    in our client timeout. Just under the client's: a statement the client gave up on is
    cancelled by the server soon after, which narrows the window for a ghost write."""
    return {
        "application_name": "callgate",
        "statement_timeout": str(max(client_timeout_ms - 50, 100)),
        "lock_timeout": str(max(client_timeout_ms // 2, 50)),
        "idle_in_transaction_session_timeout": "10000",
    }


@dataclass
class Database:
    pool: asyncpg.Pool
    gate: DatabaseGate  # whether PostgreSQL answers; the one way to use the pool
    queries: Queries
    embedded: EmbeddedPostgres | None
    dsn: str

    @property
    def kind(self) -> str:
        return "embedded" if self.embedded else "external"


async def create_pool(dsn: str, size: int, client_timeout_ms: int,
                      init: Callable[[asyncpg.Connection], Awaitable[Any]] | None = None) -> asyncpg.Pool:
    """A pool that connects when first used (min_size 0): it can be made while PostgreSQL is
    away, and heals by itself when it returns. ``init`` runs on each new connection."""
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=size,
        command_timeout=max(client_timeout_ms / 1000 * 2, 1),
        timeout=5,  # connection establishment
        # Opened connections stay (DatabaseGate opens them all once PostgreSQL answers): one
        # closed after a quiet spell would be paid for again by the first calls of a burst.
        max_inactive_connection_lifetime=0,
        server_settings=server_settings(client_timeout_ms),
        reset=_keep_session,
        init=init,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool runs on a connection handed back, in place of asyncpg's default
    (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``): one more round trip per
    statement, half of them in a call's set-up. Nothing here leaves session state behind:
    statements use transaction-scoped locks only, LISTEN has its own connection
    (bridge/fanout.py), and the migration's session settings and lock are undone by it."""


@contextlib.asynccontextmanager
async def open_database(settings: Settings, *, require: bool = False) -> AsyncIterator[Database]:
    """The database for the server (``require`` False: PostgreSQL may be away at start; the
    gate then says so, and ``DatabaseGate.watch`` migrates and opens it once it answers) or
    for an admin command (``require`` True: away is an error). An embedded PostgreSQL that
    was already running is left running by an admin command: it is most likely a live
    server's (the server itself stops what it adopted: it is its owner then)."""
    embedded = None
    dsn = settings.dsn.value if settings.dsn else None
    if dsn is None:
        embedded = EmbeddedPostgres(settings.data_dir.resolve() / "pg")
        log.info("no DATABASE_URL: starting the embedded PostgreSQL (data in %s)", embedded.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    try:
        queries = Queries.load()  # every sql/*.sql, read once and checked
        # (The pool opens no connection before the gate exists: min_size 0.)
        pool = await create_pool(dsn, settings.pool_size, settings.database_timeout_ms,
                                 init=lambda conn: gate.on_connect(conn))
        try:
            gate = DatabaseGate(pool, queries.database_ping, migrate, settings.database_timeout_ms / 1000,
                                warm_up=functools.partial(warm_up, q=queries))
            if await gate.probe():  # once, bounded: usually PostgreSQL is there at start
                log.info("schema up to date")
            elif require:
                raise ConnectionError("PostgreSQL does not answer (check DATABASE_URL)")
            else:
                log.warning("starting without PostgreSQL: serving degraded, trying again in the background")
            yield Database(pool, gate, queries, embedded, dsn)
        finally:
            # Shielded: the pool must close (and the server stop) even when our task is cancelled.
            await asyncio.shield(pool.close())
    finally:
        if embedded is not None and not (require and embedded.adopted):
            await asyncio.shield(asyncio.to_thread(embedded.stop))

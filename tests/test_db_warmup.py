"""Pool connections are warmed before they are lent (db/warmup.py), and warming changes nothing."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

import asyncpg
import pytest

from db.bounded import DatabaseAway, DatabaseGate
from db.database import create_pool, open_database
from db.migrate import migrate
from db.sql import Queries
from db.warmup import warm_up
from helpers import proxied, settings_for, with_database

# What a call's set-up runs, each of which a cold backend prepares and plans first (and, for the
# limiter and the admission, compiles their PL/pgSQL functions).
HOT = ("limiter_hit", "calls_admit", "calls_stream_start", "calls_status")
TABLES = ("calls", "phone_limits", "limiter_charges", "stream_tokens_used", "call_requests", "cap_holds", "instances")


async def _prepared(conn) -> set[str]:
    """The statements this connection's session has prepared (asyncpg prepares each one it runs)."""
    return {r["statement"] for r in await conn.fetch("SELECT statement FROM pg_prepared_statements")}


async def _counts(conn) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}  # noqa: S608 - fixed names


async def test_warming_prepares_the_hot_statements_and_leaves_nothing_behind(dsn):
    """After a warm-up a connection has the set-up's statements prepared; no row was written in
    any table, and nothing was notified."""
    q = Queries.load()
    conn = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    heard: list[str] = []
    await listener.add_listener("callgate_warm_up", lambda *args: heard.append(args[-1]))
    try:
        before = await _counts(conn)
        assert not {getattr(q, name) for name in HOT} & await _prepared(conn)
        await warm_up(conn, q)
        assert {getattr(q, name) for name in HOT} <= await _prepared(conn)
        assert await _counts(conn) == before
        assert not conn.is_in_transaction()
        await listener.execute("SELECT 1")  # a round trip: a notification committed would be here by now
        assert heard == []
    finally:
        await listener.close()
        await conn.close()


async def test_every_connection_of_a_fresh_database_is_warm_once_the_pool_opens(server_dsn):
    """On a database never migrated, the server's pool migrates through one of its connections
    and opens the rest: every one of them, the migrating one included, is warm when lent."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        settings = settings_for(with_database(server_dsn, name), DATABASE_POOL_SIZE="4")
        async with open_database(settings) as db:
            hot = {getattr(db.queries, n) for n in HOT}
            await db.gate._warming  # the whole pool, opened in the background once PostgreSQL answered
            held = [await db.pool.acquire() for _ in range(4)]  # every connection of the pool at once
            try:
                assert len({c.get_server_pid() for c in held}) == 4
                for conn in held:
                    assert hot <= await _prepared(conn)
            finally:
                await asyncio.gather(*(db.pool.release(c) for c in held))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_database_that_refuses_the_warm_up_is_still_used(dsn, caplog):
    """A database that will not take the warm-up's writes (here: read-only, as a standby is)
    still lends its connections, cold, with a warning: warming never refuses a connection."""
    caplog.set_level(logging.WARNING, logger="callgate.db")
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'ALTER DATABASE "{await admin.fetchval("SELECT current_database()")}" '
                        "SET default_transaction_read_only = on")
    await admin.close()
    q = Queries.load()
    pool = await create_pool(dsn, 2, client_timeout_ms=2000, init=lambda conn: gate.on_connect(conn))
    gate = DatabaseGate(pool, q.database_ping, migrate, 2.0, warm_up=functools.partial(warm_up, q=q))
    gate.migrated = True
    try:
        assert await gate.probe()
        assert await gate.run(lambda conn: conn.fetchval("SELECT 1"), 2.0) == 1
        assert gate.up
        assert "could not be warmed (ReadOnlySQLTransactionError" in caplog.text
    finally:
        pool.terminate()


async def test_a_connection_that_stalls_while_warming_costs_its_caller_only_its_own_bound(dsn):
    """PostgreSQL stops answering in the middle of a new connection's warm-up: the statement
    that asked for the connection fails as an outage within its own time bound, not after
    asyncpg's polite close of the connection (a cancel request, bounded by the 4 s command
    timeout)."""
    q = Queries.load()
    async with proxied(dsn) as proxy:
        async def stalling_warm_up(conn):
            proxy.mute()
            await warm_up(conn, q)

        pool = await create_pool(proxy.dsn, 2, client_timeout_ms=2000, init=lambda conn: gate.on_connect(conn))
        gate = DatabaseGate(pool, q.database_ping, migrate, 2.0, warm_up=stalling_warm_up)
        gate.up = gate.migrated = True
        try:
            started = time.monotonic()
            with pytest.raises(DatabaseAway):
                await gate.run(lambda conn: conn.fetchval("SELECT 1"), 0.5)
            assert time.monotonic() - started < 1.5
        finally:
            pool.terminate()

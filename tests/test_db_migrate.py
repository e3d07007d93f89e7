"""Schema migrations: applied once each, in order, safely from several processes at once."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest

from db.migrate import migrate
from db.sql import SQL_DIR, Queries, SqlFilesError, migrations


async def _schema(conn: asyncpg.Connection) -> list[tuple]:
    return [tuple(r) for r in await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position")]


async def test_running_migrations_again_changes_nothing(dsn):
    """A second run applies nothing and leaves the schema as it was."""
    conn = await asyncpg.connect(dsn)
    try:
        before = await _schema(conn)
        assert await migrate(conn) == []
        assert await _schema(conn) == before
        recorded = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]
        assert recorded == [name for name, _ in migrations()]
    finally:
        await conn.close()


async def test_concurrent_starts_apply_each_migration_once(server_dsn):
    """Several instances migrating one fresh database at once apply every migration exactly once."""
    import uuid

    from helpers import with_database

    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conns = [await asyncpg.connect(with_database(server_dsn, name)) for _ in range(4)]
        try:
            results = await asyncio.gather(*(migrate(c) for c in conns))
        finally:
            for c in conns:
                await c.close()
        applied = [n for result in results for n in result]
        assert sorted(applied) == [n for n, _ in migrations()]
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_every_query_file_prepares_against_the_migrated_schema(pool):
    """Every statement Queries declares names tables, columns and functions the migrations
    created (PostgreSQL parses, resolves and plans each one)."""
    queries = Queries.load()
    async with pool.acquire() as conn:
        for field in dataclasses.fields(Queries):
            await conn.prepare(getattr(queries, field.name))


def test_the_sql_folder_and_the_declared_queries_agree(tmp_path):
    """A file missing from sql/, or one no field declares, fails loading and names the file."""
    for path in SQL_DIR.glob("*.sql"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "calls_get.sql").unlink()
    (tmp_path / "calls_gett.sql").write_text("SELECT 1")
    with pytest.raises(SqlFilesError, match=r"missing sql/calls_get\.sql; not declared in db/sql.py: sql/calls_gett\.sql"):
        Queries.load(tmp_path)


async def test_migrating_through_the_pool_waits_out_another_instance(dsn):
    """A pool connection (with its short lock timeout) waits for another instance's migration
    run instead of failing start-up."""
    from db.database import create_pool
    from db.migrate import MIGRATION_LOCK

    holder = await asyncpg.connect(dsn)
    pool = await create_pool(dsn, 2, client_timeout_ms=200)  # lock_timeout 100 ms on its sessions
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        async with pool.acquire() as conn:
            waiting = asyncio.create_task(migrate(conn))
            done, _ = await asyncio.wait({waiting}, timeout=0.5)  # five lock timeouts
            assert not done
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
            assert await waiting == []
            assert await conn.fetchval("SHOW lock_timeout") == "100ms"  # the pool's setting is back
    finally:
        await holder.close()
        await pool.close()


async def test_calls_cleanup_forgets_only_what_is_old(pool):
    """Spent tokens and call requests go after a day, call records after their retention."""
    from helpers import make_store

    store = make_store(pool)
    await pool.execute("INSERT INTO stream_tokens_used (jti, used_at) VALUES ('old', now() - interval '2 days'), ('new', now())")
    await pool.execute("INSERT INTO call_requests (reservation_id, scenario_id, config, voice, created_at) VALUES "
                       "('RSold', 'x', '{}', 'v', now() - interval '2 days'), ('RSnew', 'x', '{}', 'v', now())")
    await pool.execute("INSERT INTO calls (call_sid, direction, status, status_rank, created_at) VALUES "
                       "('CAold', 'inbound', 'ended', 100, now() - interval '40 days'), ('CAnew', 'inbound', 'ended', 100, now())")
    assert await store.cleanup() == 3
    assert await pool.fetchval("SELECT array_agg(jti) FROM stream_tokens_used") == ["new"]
    assert await pool.fetchval("SELECT array_agg(reservation_id) FROM call_requests") == ["RSnew"]
    assert await pool.fetchval("SELECT array_agg(call_sid) FROM calls") == ["CAnew"]

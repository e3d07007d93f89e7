"""Schema migrations: ``sql/migrations/NNN_name.sql``, applied in name order, each once.

Safe when several instances start together: the whole run holds a PostgreSQL advisory lock,
so the second instance waits, then finds every migration recorded and applies nothing.
Each migration runs in its own transaction with its record, so a failed one leaves no trace.
"""

from __future__ import annotations

import logging

import asyncpg

from db.sql import migrations

log = logging.getLogger("callgate.db")

# Any fixed 64-bit number: the advisory lock every Callgate instance takes to migrate.
MIGRATION_LOCK = 0x43414C4C47415445  # "CALLGATE"


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations not yet applied; returns their names."""
    applied_now: list[str] = []
    # Pool connections carry short lock and statement timeouts for the call path; waiting for
    # another instance's migrations, or a long migration, must not trip them.
    await conn.execute("SET lock_timeout = 0; SET statement_timeout = 0")
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, text in migrations():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(text)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            log.info("applied migration %s", name)
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await conn.execute("RESET lock_timeout; RESET statement_timeout")
    return applied_now

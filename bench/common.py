"""What the benchmarks share: a database for one run.

The embedded PostgreSQL in a temporary folder by default, or a scratch database on the server
named by DATABASE_URL (created for the run and dropped after it, like tests/conftest.py does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from db.embedded import EmbeddedPostgres
from db.migrate import migrate


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def run_database(*, migrated: bool) -> AsyncIterator[tuple[str, str]]:
    """A fresh database for this run: yields (dsn, where it runs). ``migrated``: apply the
    schema here (a benchmark of the limiter alone); otherwise the app does at start."""
    external = os.environ.get("DATABASE_URL")
    if external:
        parts = urlsplit(external)
        async with _scratch(external) as dsn:
            if migrated:
                await _migrate(dsn)
            yield dsn, f"DATABASE_URL server {parts.hostname}:{parts.port or 5432}"
        return
    with tempfile.TemporaryDirectory(prefix="callgate-bench-") as folder:
        embedded = EmbeddedPostgres(Path(folder) / "data")
        dsn = await asyncio.to_thread(embedded.start)
        try:
            if migrated:
                await _migrate(dsn)
            yield dsn, "embedded PostgreSQL (temporary)"
        finally:
            await asyncio.to_thread(embedded.stop)


@contextlib.asynccontextmanager
async def _scratch(server_dsn: str) -> AsyncIterator[str]:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin_dsn = with_database(server_dsn, "postgres")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_dsn, name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()

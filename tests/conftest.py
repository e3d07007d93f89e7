"""Shared fixtures: one real PostgreSQL for the session, a fresh database per test.

Without DATABASE_URL the session starts the embedded PostgreSQL (the project's default) in a
temporary folder; with it, tests create their databases on that server.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from db.database import create_pool  # noqa: E402
from db.embedded import EmbeddedPostgres  # noqa: E402
from db.migrate import migrate  # noqa: E402
from helpers import Clock  # noqa: E402


@pytest.fixture(scope="session")
def server_dsn() -> str:
    """DSN of a PostgreSQL server for the whole session (database part ignored)."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    # A folder of our own, not pytest's tmp_path: pytest prunes old base folders when another
    # session starts, which would delete this server's data under it.
    folder = Path(tempfile.mkdtemp(prefix="callgate-test-pg-"))
    pg = EmbeddedPostgres(folder / "data")
    pg.start()
    try:
        yield pg.dsn
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def dsn(server_dsn: str) -> str:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server_dsn, name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield url
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pool(dsn: str):
    p = await create_pool(dsn, 10, client_timeout_ms=2000)
    yield p
    await p.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()

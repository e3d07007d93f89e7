"""Fixtures: one real PostgreSQL for the session, a fresh database per test.

Without DATABASE_URL the session starts the embedded PostgreSQL (the project's default) in a
temporary folder; with it, tests create their databases on that server. The schema is
migrated once, into a template database; each test's database is a copy of it (CREATE
DATABASE ... TEMPLATE), which takes milliseconds instead of a migration run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import asyncpg
import pytest

import logs_traffic
from db.database import create_pool
from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from helpers import TEST_DB_TIMEOUT_MS, Clock, with_database

TRAFFIC = pytest.StashKey[logs_traffic.Traffic]()


@pytest.fixture(autouse=True)
def logs_traffic_checked(request, monkeypatch) -> logs_traffic.Traffic:
    """Every /logs frame of every test is checked against protocol.py (tests/logs_traffic.py)."""
    traffic = request.node.stash[TRAFFIC] = logs_traffic.Traffic()
    logs_traffic.install(monkeypatch, traffic)
    yield traffic
    assert traffic.problems == [], "/logs traffic that protocol.py does not allow:\n" + "\n".join(traffic.problems)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A /logs message that breaks protocol.py fails the test that produced it."""
    result = yield
    problems = item.stash[TRAFFIC].problems if TRAFFIC in item.stash else []
    if problems:
        reported, problems[:] = list(problems), []  # reported here, not again at teardown
        raise AssertionError("/logs traffic that protocol.py does not allow:\n" + "\n".join(reported))
    return result


def pytest_terminal_summary(terminalreporter) -> None:
    if lines := logs_traffic.summary():
        terminalreporter.write_sep("-", "/logs traffic against protocol.py")
        for line in lines:
            terminalreporter.write_line(line)


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


@pytest.fixture(scope="session")
def template_database(server_dsn: str) -> str:
    """A migrated database, made once per session, that each test's database copies."""
    name = f"t_template_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}"'))
    asyncio.run(_migrate(with_database(server_dsn, name)))
    yield name
    asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(server_dsn: str, statement: str) -> None:
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def _migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


@pytest.fixture
async def dsn(server_dsn: str, template_database: str) -> str:
    """A fresh, migrated database for one test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    await _admin(server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield with_database(server_dsn, name)
    await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pool(dsn: str):
    p = await create_pool(dsn, 10, client_timeout_ms=TEST_DB_TIMEOUT_MS)
    yield p
    await p.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def browser():
    """Headless Chromium for a browser test (tests/browsers.py); mark the test needs_chromium."""
    from browsers import chromium

    async with chromium() as browser:
        yield browser

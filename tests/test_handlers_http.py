"""The HTTP side of the foundation on a real server (port 0): health, metrics, admin, CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from appkeys import LIFECYCLE, LIMITER
from helpers import ROOT, TEST_KEY, proxied, settings_for, wait_until
from server import create_app


@pytest.fixture
async def client(dsn):
    async with TestClient(TestServer(create_app(settings_for(dsn, ADMIN_TOKEN="admin-secret")))) as c:
        yield c


async def test_healthz_reports_database_and_version(client):
    """/healthz answers ok with the database checked and the version."""
    resp = await client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body == {"status": "ok", "database": "ok", "activeCalls": 0, "version": body["version"]}
    assert body["version"]


async def test_health_keeps_phone_screens_shape(client):
    """/health answers the same facts in phone-screen's shape."""
    body = await (await client.get("/health")).json()
    assert body["status"] == "healthy"
    assert {"timestamp", "uptime", "activeSessions", "database"} <= body.keys()


async def test_healthz_degraded_while_database_is_away(dsn):
    """/healthz says degraded (still 200) once the database gate's probe finds PostgreSQL
    gone, without itself waiting for PostgreSQL (a black hole cannot make it time out), and
    ok once the probe finds it back."""
    async with proxied(dsn) as proxy:
        settings = settings_for(proxy.dsn, LIMITER_TIMEOUT_MS="300")
        async with TestClient(TestServer(create_app(settings))) as client:
            async def health() -> dict:
                resp = await client.get("/healthz", timeout=aiohttp.ClientTimeout(total=1))
                assert resp.status == 200
                return await resp.json()

            proxy.stall()  # a black hole: connections open, nothing ever answers
            degraded = await wait_until(lambda: _when(health(), lambda b: b["status"] == "degraded"),
                                        what="/healthz to say degraded")
            assert degraded["database"] == "unavailable"
            proxy.restore()
            await wait_until(lambda: _when(health(), lambda b: b["status"] == "ok"), what="/healthz to say ok")


async def _when(answer, accept):
    """``answer`` (awaited) if ``accept`` takes it, else None: for wait_until."""
    value = await answer
    return value if accept(value) else None


async def test_healthz_is_503_while_draining(client):
    """Once shutdown has begun, /healthz answers 503 draining so the proxy stops sending calls."""
    client.server.app[LIFECYCLE].draining = True
    resp = await client.get("/healthz")
    assert (resp.status, await resp.json()) == (503, {"status": "draining"})


async def test_metrics_expose_limiter_and_pool(client):
    """/metrics is Prometheus text with limiter decisions, latency and pool use, and no number."""
    limiter = client.server.app[LIMITER]
    await limiter.hit("+14155550100", "CA1")
    await limiter.hit("not a number", "CA2")
    text = await (await client.get("/metrics")).text()
    assert 'callgate_limiter_decisions_total{op="hit",result="allowed",source="database"} 1.0' in text
    assert 'result="unparseable",source="validation"' in text
    assert "callgate_limiter_latency_seconds_bucket" in text
    assert "callgate_db_pool_connections" in text
    assert "5550100" not in text


async def test_admin_stats_needs_the_token(client):
    """/admin/stats answers 401 without the bearer token and the counts with it."""
    assert (await client.get("/admin/stats")).status == 401
    assert (await client.get("/admin/stats", headers={"Authorization": "Bearer wrong"})).status == 401
    await client.server.app[LIMITER].hit("+14155550100", "CA1")
    resp = await client.get("/admin/stats", headers={"Authorization": "Bearer admin-secret"})
    assert resp.status == 200
    assert (await resp.json())["callsInWindow"] == 1


async def test_admin_routes_disabled_without_a_token(dsn):
    """Without ADMIN_TOKEN the admin routes are off and say how to turn them on."""
    async with TestClient(TestServer(create_app(settings_for(dsn)))) as client:
        resp = await client.get("/admin/stats", headers={"Authorization": "Bearer x"})
        assert resp.status == 403
        assert "ADMIN_TOKEN" in await resp.text()


async def test_public_url(client):
    """/public-url answers the configured public URL (phone-screen's route)."""
    assert await (await client.get("/public-url")).json() == {"publicUrl": "http://localhost:0"}


def _admin(dsn: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": dsn, "PHONE_ENCRYPTION_KEY": TEST_KEY}
    return subprocess.run([sys.executable, "server.py", "admin", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


async def test_admin_cli(dsn, client):
    """`python server.py admin stats|reset|cleanup|migrate` work against the database."""
    limiter = client.server.app[LIMITER]
    await limiter.hit("+14155550100", "CA1")
    await limiter.hit("+14155550100", "CA2")
    assert not (await limiter.test("+14155550100")).allowed

    stats = await asyncio.to_thread(_admin, dsn, "stats")
    assert stats.returncode == 0, stats.stderr
    assert '"numbersAtLimit": 1' in stats.stdout
    reset = await asyncio.to_thread(_admin, dsn, "reset", "(415) 555-0100")
    assert reset.returncode == 0, reset.stderr
    assert "+1415•••0100" in reset.stdout and "5550100" not in reset.stdout + reset.stderr
    assert (await limiter.test("+14155550100")).allowed
    cleanup = await asyncio.to_thread(_admin, dsn, "cleanup")
    assert cleanup.returncode == 0 and "deleted" in cleanup.stdout
    migrate = await asyncio.to_thread(_admin, dsn, "migrate")
    assert (migrate.returncode, migrate.stdout.strip()) == (0, "applied 0 migration(s)")
    bad = await asyncio.to_thread(_admin, dsn, "reset", "911")
    assert bad.returncode == 1 and "emergency" in bad.stderr


async def test_the_page_is_served_with_the_turnstile_site_key(dsn):
    """GET / serves the page; a configured Turnstile site key is put on <body> for the widget."""
    async with TestClient(TestServer(create_app(settings_for(dsn, TURNSTILE_SITE_KEY='0x4AAA"<x>')))) as client:
        resp = await client.get("/")
        page = await resp.text()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
        assert 'data-turnstile-sitekey="0x4AAA&quot;&lt;x&gt;"' in page
        assert (await client.get("/static/app.js")).status == 200
        assert (await client.get("/static/style.css")).status == 200

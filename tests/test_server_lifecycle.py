"""Shutdown: draining with the listener open (health 503, new calls refused, live calls go on),
ending what is left at the deadline, and a real `python server.py` stopping on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid

import aiohttp
import asyncpg
from aiohttp import web

from appkeys import BUS, LIFECYCLE, TOKEN_SECRET
from bridge import tokens
from db.sql import migrations
from helpers import (
    AUTH_TOKEN,
    PUBLIC_URL,
    ROOT,
    TEST_KEY,
    UNIT,
    callgate,
    collect,
    proxied,
    settings_for,
    wait_until,
    with_database,
)
from server import create_app, drain
from tools.fake_realtime import FakeRealtime
from tools.fake_twilio_api import FakeTwilioApi
from tools.simulate_call import SimulatedCall


@contextlib.asynccontextmanager
async def serving_a_call(dsn: str):
    """The app as serve() runs it (an AppRunner, not the test server, whose handlers are
    cancelled when their peer goes away, unlike production's), with one live call on it.
    Yields (app, url, Twilio API peer, the call, its model session)."""
    async with FakeTwilioApi(auth_token=AUTH_TOKEN) as api, FakeRealtime() as model:
        app = create_app(settings_for(dsn, PUBLIC_URL=PUBLIC_URL, TWILIO_ACCOUNT_SID=api.account_sid,
                                      TWILIO_AUTH_TOKEN=AUTH_TOKEN, TWILIO_API_BASE_URL=api.base_url,
                                      OPENAI_API_KEY="test-key", OPENAI_REALTIME_URL=model.url))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            call = SimulatedCall(url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, audio=b"", speed=4.0,
                                 account_sid=api.account_sid)
            try:
                await call.webhook()
                await call.connect()
                session = await model.wait_for_session()
                yield app, url, api, call, session
            finally:
                await call.close()
        finally:
            await runner.cleanup()


async def test_draining_keeps_live_calls_and_refuses_new_ones(dsn):
    """While draining, /healthz is 503, a new caller hears "try later", and a live call still
    relays both ways until its caller hangs up; then the drain finishes early."""
    async with serving_a_call(dsn) as (app, url, _, live, session):
        await live.wait_for_audio(8000)
        draining = asyncio.create_task(drain(app, timeout=30))
        async with aiohttp.ClientSession() as http:
            async def draining_said() -> aiohttp.ClientResponse | None:
                resp = await http.get(url + "/healthz")
                return resp if resp.status == 503 else None
            resp = await wait_until(draining_said, what="/healthz to say draining")
            assert await resp.json() == {"status": "draining"}
        newcomer = SimulatedCall(url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, audio=b"")
        refused = await newcomer.webhook()
        await newcomer.close()
        assert refused.hangup and refused.stream_url is None

        heard = len(session.audio_in)
        await live.play(bytes([0xFF]) * 1600, tail_silence_ms=0)
        await session.wait_for_audio(heard + 1600)  # still relaying
        await live.stop()
        await asyncio.wait_for(draining, timeout=5)  # done as soon as the last call ended
        assert app[LIFECYCLE].calls == {}


async def test_browsers_following_a_draining_call_see_it_end_then_are_sent_away(dsn):
    """SIGTERM does not cut browsers off: one following a live call keeps its socket through
    the drain, and one that reconnects meanwhile may follow the call still draining here;
    both get the call's end, then a GOING_AWAY close (1001). call.start is refused."""
    async with serving_a_call(dsn) as (app, url, _, live, session), aiohttp.ClientSession() as http:
        token = tokens.subscription_token(app[TOKEN_SECRET], live.call_sid)
        subscribe = {"type": "call.subscribe", "callSid": live.call_sid, "token": token}
        before = await http.ws_connect(url + "/logs")
        await before.send_json(subscribe)
        assert (await before.receive_json(timeout=5))["status"] == "connected"
        draining = asyncio.create_task(drain(app, timeout=30))
        await wait_until(lambda: app[LIFECYCLE].draining, what="the drain to begin")
        during = await http.ws_connect(url + "/logs")  # a browser reconnecting mid-drain
        await during.send_json(subscribe)
        assert (await during.receive_json(timeout=5))["status"] == "connected"
        await during.send_json({"type": "call.start", "phoneNumber": "+14155550123", "scenarioId": "job-interview",
                                "config": {"jobTitle": "Chef", "company": "Bistro"}})
        assert (await during.receive_json(timeout=5))["code"] == "unavailable"
        await live.stop()
        for ws in (before, during):
            while (ended := await ws.receive_json(timeout=5))["type"] != "call.status_changed":
                pass  # the call's transcript, as it happened
            assert (ended["status"], ended["callSid"]) == ("ended", live.call_sid)
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await asyncio.wait_for(draining, timeout=5)


async def test_calls_left_at_the_deadline_are_ended_and_hung_up(dsn):
    """A call still live when the drain deadline passes is ended (reason shutdown) and hung up
    over Twilio REST before shutdown goes on."""
    async with serving_a_call(dsn) as (app, _, api, live, _session):
        with collect(app[BUS], live.call_sid) as sub:
            await drain(app, timeout=0.2)
            ended = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert app[LIFECYCLE].calls == {}
        assert await live.wait_closed() == 1000
        assert ended[-1]["status"] == "ended" and ended[-1]["reason"] == "shutdown"
        assert [r for r in api.requests if r.path.endswith(f"/Calls/{live.call_sid}.json")]


def test_sigterm_stops_the_server_cleanly(dsn):
    """`python server.py` answers /healthz, then on SIGTERM drains and exits with status 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": dsn, "PHONE_ENCRYPTION_KEY": TEST_KEY, "PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "server.py", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        asyncio.run(_wait_healthy(f"http://127.0.0.1:{port}/healthz"))
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "draining" in output and "stopped" in output


async def _wait_healthy(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async def healthy() -> bool:
            try:
                async with http.get(url) as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False  # not listening yet
        await wait_until(healthy, timeout=60, what=f"{url} to answer 200")


async def test_the_server_starts_without_postgresql_and_heals_when_it_comes(server_dsn, monkeypatch):
    """PostgreSQL refuses connections at start: the server still starts and listens, /healthz
    says degraded, a caller is answered as the fail mode says (memory: admitted), call.start
    is refused at once and says why. When PostgreSQL comes, the schema is migrated and the
    server is ok, without a restart."""
    import db.bounded

    monkeypatch.setattr(db.bounded, "PROBE_EVERY_S", UNIT)
    monkeypatch.setattr(db.bounded, "PROBE_MAX_BACKOFF_S", 2 * UNIT)
    name = f"t_empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')  # no schema yet: start must migrate it
    try:
        async with proxied(with_database(server_dsn, name)) as proxy:
            proxy.cut()
            async with callgate(proxy.dsn, TWILIO_PHONE_NUMBER_US="+14155550000",
                                ALLOWED_ORIGINS="https://callgate.test") as h, aiohttp.ClientSession() as http:
                health = await (await http.get(h.url + "/healthz")).json()
                twiml = await h.call(audio=b"").webhook()
                ws = await http.ws_connect(h.url + "/logs", headers={"Origin": "https://callgate.test"})
                await ws.send_json({"type": "call.start", "phoneNumber": "+14155550123", "scenarioId": "job-interview",
                                    "config": {"jobTitle": "Chef", "company": "Bistro"}})
                refused = await ws.receive_json(timeout=5)
                await ws.close()
                proxy.restore()
                await wait_until(lambda: _status(http, h.url), timeout=10, what="/healthz to say ok")
                tables = await asyncpg.connect(with_database(server_dsn, name))
                migrated = await tables.fetchval("SELECT count(*) FROM schema_migrations")
                await tables.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    assert (health["status"], health["database"]) == ("degraded", "unavailable")
    assert twiml.stream_url  # LIMITER_FAIL_MODE=memory: the per-number rule held in memory
    assert (refused["code"], "try again" in refused["message"]) == ("unavailable", True)
    assert migrated == len(migrations())


async def _status(http: aiohttp.ClientSession, url: str) -> bool:
    return (await (await http.get(url + "/healthz")).json())["status"] == "ok"


def test_an_admin_command_beside_a_running_server_leaves_its_embedded_database_running(tmp_path):
    """`admin stats` on the data directory of a live server (no DATABASE_URL) finds its embedded
    PostgreSQL running, uses it, and leaves it running: the server keeps its database."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FLY_DATABASE_URL")}
    env |= {"CALLGATE_DATA_DIR": str(tmp_path), "PHONE_ENCRYPTION_KEY": TEST_KEY, "PORT": str(port)}
    server = subprocess.Popen([sys.executable, "server.py", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        asyncio.run(_wait_healthy(f"http://127.0.0.1:{port}/healthz"))
        admin = subprocess.run([sys.executable, "server.py", "admin", "stats"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
        assert admin.returncode == 0, admin.stderr
        assert _postmaster_alive(tmp_path / "pg"), admin.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert not _postmaster_alive(tmp_path / "pg")  # the server stops what it started


def _postmaster_alive(data_dir) -> bool:
    """PostgreSQL runs on ``data_dir``: its postmaster.pid names a live process."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return False
    return True

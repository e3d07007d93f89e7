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

import aiohttp
from aiohttp import web

from appkeys import BUS, LIFECYCLE
from helpers import AUTH_TOKEN, PUBLIC_URL, ROOT, TEST_KEY, collect, settings_for, wait_until
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

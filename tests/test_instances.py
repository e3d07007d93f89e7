"""Several Callgate instances on one PostgreSQL behave as one: two real ``python server.py``
processes, each on its own loopback port, sharing the test's database, the phone key and the
Twilio auth token, with the loopback peers (tools/) for Twilio REST and the model.

What must hold across them: one number's limit (webhooks and call.starts at once, through both),
the cap on live calls, a browser on one instance following and ending a call streaming on the
other, and a SIGKILLed instance's calls ended and their places freed, when it comes back and
when only another instance is left (the times measured here are in docs/instances.md). And
over a PostgreSQL outage: nobody's live calls ended for a silence that was the database's, and
a browser told of a call that ended on another instance meanwhile (both fail on the code of
2026-12-01: docs/instances.md, "Known gaps").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge import tokens
from bridge.fanout import RECONNECT_MAX_S
from calls.admission import SAY_BUSY
from config import VARIABLES
from db.calls import DEAD_AFTER_S, HEARTBEAT_S
from helpers import (
    AUTH_TOKEN,
    MODEL_KEY,
    PUBLIC_URL,
    ROOT,
    TEST_KEY,
    free_port,
    hangups,
    proxied,
    wait_until,
    with_database,
)
from tools.fake_realtime import FakeRealtime
from tools.fake_twilio_api import FakeTwilioApi
from tools.simulate_call import SimulatedCall, silence

ORIGIN = "https://callgate.test"
CALLER_ID = "+14155550000"
ADMIN_TOKEN = "instances-admin-token-0123456789"
START_TIMEOUT_S = 60.0  # two processes starting at once on a busy 2-core machine
# The longest a dead instance's calls may wait to be ended: it is dead DEAD_AFTER_S after its
# last heartbeat, and another instance notices at its own next heartbeat (every HEARTBEAT_S).
REAP_BOUND_S = DEAD_AFTER_S + HEARTBEAT_S + 2.0



def number(i: int) -> str:
    """The i-th made-up caller: valid US numbers."""
    return f"+1415555{i:04d}"


# --- the processes ----------------------------------------------------------------------------


class Instance:
    """One ``python server.py`` on its own port; its JSON log lines (stderr) as they come."""

    def __init__(self, name: str, env: dict[str, str], port: int | None = None) -> None:
        self.name, self.env = name, env
        self.port = port or free_port()
        self.lines: list[dict] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> Instance:
        """Start it and wait until /healthz says ok (listening, database migrated)."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", str(self.port),
            env=self.env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            await wait_until(lambda: self._ok(http), timeout=START_TIMEOUT_S, what=f"{self.name}'s /healthz to say ok")
        return self

    async def _ok(self, http: aiohttp.ClientSession) -> bool:
        if self.process.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode} at start: {self.messages()[-20:]}")
        return (await health(http, self))["status"] == "ok"

    async def _read(self) -> None:
        async for raw in self.process.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            self.lines.append(line if isinstance(line, dict) else {"level": "raw", "msg": raw.decode(errors="replace")})

    def messages(self) -> list[str]:
        return [line.get("msg", "") for line in self.lines]

    def logged(self, needle: str) -> bool:
        return any(needle in message for message in self.messages())

    def errors(self) -> list[str]:
        """ERROR lines and anything not logged as JSON (a traceback): what would wake an operator."""
        return [line.get("msg", "") for line in self.lines if line.get("level") in ("error", "critical", "raw")]

    async def kill(self) -> None:
        """SIGKILL: nothing runs on the way out (no drain, no leave, no last heartbeat)."""
        self.process.kill()
        await self.process.wait()
        await self._reader

    async def stop(self) -> None:
        """SIGTERM (the drain is short here), SIGKILL if it hangs."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def health(http: aiohttp.ClientSession, instance: Instance) -> dict:
    """/healthz's answer ({"status": "down"} when nothing listens yet)."""
    try:
        async with http.get(instance.url + "/healthz") as resp:
            return await resp.json()
    except (aiohttp.ClientConnectionError, TimeoutError, ValueError):
        return {"status": "down"}


class Browser:
    """A /logs client (a browser tab), from its own client address."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.received: list[dict] = []

    async def send(self, message: dict) -> None:
        await self.ws.send_json(message)

    async def recv(self, timeout: float = 15) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        self.received.append(json.loads(msg.data))
        return self.received[-1]

    async def until(self, predicate, timeout: float = 15) -> list[dict]:
        """What arrives, up to and including the first message ``predicate`` accepts."""
        seen = []
        async with asyncio.timeout(timeout):
            while not seen or not predicate(seen[-1]):
                seen.append(await self.recv(timeout))
        return seen

    async def call_start(self, phone_number: str) -> dict:
        """One call.start and its answer: queued (with a token) or a refusal."""
        await self.send({"type": "call.start", "phoneNumber": phone_number, "scenarioId": "job-interview",
                         "config": {"jobTitle": "Chef", "company": "Bistro"}})
        return (await self.until(lambda m: "token" in m or m["type"] in ("error", "rate_limit_exceeded")))[-1]

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


class Cluster:
    """The peers, the instances of one test over one database, and everything they opened."""

    def __init__(self, dsn: str, twilio_api: FakeTwilioApi, model: FakeRealtime | None, env: dict[str, str]) -> None:
        self.dsn, self.twilio_api, self.model = dsn, twilio_api, model
        self.instances: list[Instance] = []
        self.calls: list[SimulatedCall] = []
        self.browsers: list[Browser] = []
        self.talking: list[asyncio.Task] = []
        names = {v.name for v in VARIABLES} | {"FLY_APP_NAME"}
        self.env = {k: v for k, v in os.environ.items() if k not in names} | {
            "DATABASE_URL": dsn, "PHONE_ENCRYPTION_KEY": TEST_KEY, "PUBLIC_URL": PUBLIC_URL,
            "TWILIO_ACCOUNT_SID": twilio_api.account_sid, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_API_BASE_URL": twilio_api.base_url, "TWILIO_PHONE_NUMBER_US": CALLER_ID,
            "ALLOWED_ORIGINS": ORIGIN, "TRUST_FLY_CLIENT_IP": "yes", "ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_FORMAT": "json", "SHUTDOWN_DRAIN_MS": "2000",
        } | ({"OPENAI_API_KEY": MODEL_KEY, "OPENAI_REALTIME_URL": model.url} if model else {}) | env

    async def start(self, *names: str, port: int | None = None) -> list[Instance]:
        """Instances started side by side, each ready."""
        started = [Instance(name, self.env, port) for name in names]
        self.instances += started
        await asyncio.gather(*(i.start() for i in started))
        return started

    def call(self, instance: Instance, **kwargs: Any) -> SimulatedCall:
        """Twilio, for one call, talking to ``instance`` (a silent caller unless told)."""
        kwargs.setdefault("audio", b"")
        kwargs.setdefault("speed", 4.0)
        kwargs.setdefault("to", CALLER_ID)
        call = SimulatedCall(instance.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                             account_sid=self.twilio_api.account_sid, **kwargs)
        self.calls.append(call)
        return call

    async def live_call(self, instance: Instance, caller: str) -> SimulatedCall:
        """A call admitted and streaming on ``instance``, the agent's greeting arriving, its
        caller sending a frame every 20 ms as Twilio does (silence too: a stream with no frame
        for CALLER_IDLE_TIMEOUT_S is dead), until it hangs up."""
        call = self.call(instance, from_=caller, speed=1.0)
        twiml = await call.webhook()
        assert twiml.stream_url, f"{caller} was refused: {twiml.say}"
        await call.connect()
        await call.wait_for_audio(1, timeout=10)
        self.talking.append(asyncio.create_task(call.play(silence(120_000), tail_silence_ms=0), name=call.call_sid))
        return call

    async def hang_up(self, call: SimulatedCall) -> None:
        """The caller hangs up: no more frames, then Twilio's ``stop``."""
        for task in self.talking:
            if task.get_name() == call.call_sid:
                task.cancel()
        await call.stop()

    async def browser(self, instance: Instance, address: str = "203.0.113.1") -> Browser:
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(instance.url + "/logs", headers={"Origin": ORIGIN, "Fly-Client-IP": address})
        except BaseException:
            await http.close()
            raise
        self.browsers.append(Browser(http, ws))
        return self.browsers[-1]

    async def close(self) -> None:
        for task in self.talking:
            task.cancel()
        await asyncio.gather(*self.talking, return_exceptions=True)
        for call in self.calls:
            await call.close()
        for browser in self.browsers:
            await browser.close()
        await asyncio.gather(*(i.stop() for i in self.instances))


@contextlib.asynccontextmanager
async def cluster(dsn: str, *, model: FakeRealtime | None = None, **env: str) -> AsyncIterator[Cluster]:
    async with FakeTwilioApi(auth_token=AUTH_TOKEN) as api:
        c = Cluster(dsn, api, model, env)
        try:
            yield c
        finally:
            await c.close()
            for i in c.instances:  # pytest shows them when the test fails
                print(f"--- {i.name}'s log")
                for line in i.lines:
                    print(line.get("ts", ""), line.get("level", ""), line.get("msg", ""), line.get("exc", ""))
        survivors = [i for i in c.instances if i.process.returncode in (0, None)]
        errors = {i.name: i.errors() for i in survivors if i.errors()}
        assert not errors, f"ERROR lines or tracebacks in the logs: {errors}"


async def ended_calls(conn: asyncpg.Connection, call_sids: list[str], reason: str) -> bool:
    n = await conn.fetchval("SELECT count(*) FROM calls WHERE call_sid = ANY($1::text[]) AND status = 'ended' "
                            "AND end_reason = $2", call_sids, reason)
    return n == len(call_sids)


# --- 1. one number's limit ----------------------------------------------------------------------


async def test_one_numbers_limit_holds_across_instances(dsn):
    """24 attempts on one number at once, half webhooks and half call.starts, half through each
    instance: exactly RATE_LIMIT_PHONE_MAX_CALLS (3) get through; the rest are told it is the
    limit; only admitted call.starts place a call; the number is in no log line."""
    limit = 3
    async with cluster(dsn, RATE_LIMIT_PHONE_MAX_CALLS=str(limit), RATE_LIMIT_MAX_CONCURRENT_CALLS="100") as c:
        a, b = await c.start("a", "b")
        spread = [a, b] * 6
        # call.start as people type the number; Twilio's webhook says it in E.164.
        typed = ["+14155550100", "(415) 555-0100", "415-555-0100", "+1 415 555 0100"]
        browsers = [await c.browser(inst, f"198.51.100.{i + 1}") for i, inst in enumerate(spread)]
        callers = [c.call(inst, from_="+14155550100") for inst in spread]
        starts = [br.call_start(typed[i % len(typed)]) for i, br in enumerate(browsers)]
        webhooks = [call.webhook() for call in callers]
        answers = await asyncio.gather(*starts, *webhooks)
        replies, twimls = answers[:len(starts)], answers[len(starts):]

        placed = [r for r in replies if "token" in r]
        connected = [t for t in twimls if t.stream_url]
        assert len(placed) + len(connected) == limit, (replies, [t.say for t in twimls])
        refused_starts = [r for r in replies if r["type"] == "rate_limit_exceeded"]
        refused_calls = [t for t in twimls if not t.stream_url and t.hangup and "call limit" in (t.say or "")]
        assert all(r["reason"] == "limit_reached" for r in refused_starts)
        assert len(refused_starts) + len(refused_calls) == len(answers) - limit
        creates = [r for r in c.twilio_api.requests if r.method == "POST" and r.path.endswith("/Calls.json")]
        assert len(creates) == len(placed)
        conn = await asyncpg.connect(dsn)
        try:
            charges = await conn.fetch("SELECT cardinality(charges) AS n FROM phone_limits WHERE region <> 'budget'")
            kept = await conn.fetchval("SELECT count(*) FROM limiter_charges WHERE refunded_at IS NULL "
                                       "AND charge_id NOT LIKE 'CS%'")  # CS…: per-address budgets
        finally:
            await conn.close()
        assert [r["n"] for r in charges] == [limit] and kept == limit  # one key for every spelling
        for inst in (a, b):  # each decided its share, and said so without the number
            assert any("refused: limit_reached" in m for m in inst.messages()), inst.name
            assert not [m for m in inst.messages() if "5550100" in m]


# --- 2. the cap on live calls -------------------------------------------------------------------


async def test_the_cap_on_live_calls_holds_across_instances(dsn):
    """Cap 4: a call streaming on each instance, then 8 callers at once through both for the 2
    places left: exactly 2 get in. With 4 live, the next caller is refused on either instance;
    when a caller on one hangs up, a caller on the other gets the place."""
    async with cluster(dsn, RATE_LIMIT_MAX_CONCURRENT_CALLS="4") as c, aiohttp.ClientSession() as http:
        a, b = await c.start("a", "b")
        first = [await c.live_call(a, number(1)), await c.live_call(b, number(2))]
        racers = [c.call(inst, from_=number(10 + i)) for i, inst in enumerate([a, b] * 4)]
        twimls = await asyncio.gather(*(r.webhook() for r in racers))
        admitted = [r for r, t in zip(racers, twimls, strict=True) if t.stream_url]
        assert len(admitted) == 2, [t.say for t in twimls]
        assert all(t.say == SAY_BUSY and t.hangup for t in twimls if not t.stream_url)
        for call in admitted:
            await call.connect()
            await call.wait_for_audio(1, timeout=10)
        live = [(await health(http, a))["activeCalls"], (await health(http, b))["activeCalls"]]
        assert sum(live) == 4, live

        for inst in (a, b):
            late = c.call(inst, from_=number(30 + len(c.calls)))
            assert (await late.webhook()).say == SAY_BUSY, inst.name
        await c.hang_up(first[1])  # the caller on b hangs up
        conn = await asyncpg.connect(dsn)
        try:
            await wait_until(lambda: ended_calls(conn, [first[1].call_sid], "caller_hangup"),
                             what="the call on b recorded as ended")
        finally:
            await conn.close()
        assert (await c.call(a, from_=number(40)).webhook()).stream_url  # its place, taken on a


# --- 3. a browser on one instance, the call on the other ----------------------------------------


async def test_a_browser_on_one_instance_follows_and_ends_a_call_on_the_other(dsn):
    """A browser on a places a call; Twilio's webhook and media stream go to b. The browser sees
    the call connect and the agent's words (over LISTEN/NOTIFY), then ends it: b ends the call
    as ended_by_client and hangs it up over Twilio REST."""
    said = "Thanks for calling about the chef job."
    async with FakeRealtime(api_key=MODEL_KEY, reply_text=said) as model, cluster(dsn, model=model) as c:
        a, b = await c.start("a", "b")
        browser = await c.browser(a)
        queued = await browser.call_start("+14155550123")
        sid = queued["callSid"]
        assert (queued["type"], queued["status"]) == ("call.status_changed", "queued"), queued

        webhook_path = c.twilio_api.calls[sid].url.removeprefix(PUBLIC_URL)
        twilio = c.call(b, call_sid=sid, direction="outbound-api", to="+14155550123", from_=CALLER_ID)
        assert (await twilio.webhook(path=webhook_path)).stream_url
        await twilio.connect()
        seen = await browser.until(lambda m: m["type"] == "transcript.done" and m.get("role") == "assistant")
        assert ("call.status_changed", "connected") in [(m["type"], m.get("status")) for m in seen], seen
        assert {m.get("callSid") for m in seen} == {sid}
        assert seen[-1]["text"] == said
        assert b.logged(f"call {sid}: stream") and not a.logged(f"call {sid}: stream")

        await browser.send({"type": "call.end", "callSid": sid})
        ended = (await browser.until(lambda m: m.get("status") == "ended"))[-1]
        assert ended["reason"] == "ended_by_client"
        await twilio.wait_closed(timeout=10)
        await wait_until(lambda: b.logged(f"call {sid} ended: ended_by_client"), what="b to end the call")
        await wait_until(lambda: hangups(c, sid), what="b's REST hang-up")
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT end_reason FROM calls WHERE call_sid = $1", sid) == "ended_by_client"
        finally:
            await conn.close()
    refused = [(e.get("type"), str(p)) for s in model.sessions for e, p in s.refused]
    assert refused == [], f"the model refused client events: {refused}"


# --- 4. a SIGKILLed instance ------------------------------------------------------------------


@pytest.fixture
async def other_dsn(server_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A second fresh database, so two crash scenarios can run side by side."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield with_database(server_dsn, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _crash_and_restart(dsn: str) -> dict[str, float]:
    """One instance, the cap (2) full with its calls; SIGKILL; started again on its port. The
    restarted instance ends the old calls as instance_lost and takes callers again."""
    async with cluster(dsn, RATE_LIMIT_MAX_CONCURRENT_CALLS="2") as c:
        a, = await c.start("a")
        calls = [await c.live_call(a, number(i)) for i in range(2)]
        assert (await c.call(a, from_=number(9)).webhook()).say == SAY_BUSY
        await a.kill()
        killed = time.monotonic()
        again, = await c.start("a-restarted", port=a.port)
        restarted = time.monotonic() - killed
        # Its heartbeats (and so its look at the others) begin when it starts.
        figures = await _reconciled(c, again, calls, killed, bound=restarted + REAP_BOUND_S)
        return figures | {"restart": restarted}


async def _crash_beside_a_survivor(dsn: str) -> dict[str, float]:
    """Two instances, the cap (2) full with a's calls, a browser on b following every call;
    SIGKILL a. b ends a's calls as instance_lost, tells the browser, and takes callers again."""
    async with cluster(dsn, RATE_LIMIT_MAX_CONCURRENT_CALLS="2") as c:
        a, b = await c.start("a", "b")
        operator = await c.browser(b)
        await operator.send({"type": "call.subscribe", "all": True, "adminToken": ADMIN_TOKEN})
        calls = [await c.live_call(a, number(i)) for i in range(2)]
        assert (await c.call(b, from_=number(9)).webhook()).say == SAY_BUSY
        await a.kill()
        killed = time.monotonic()
        figures = await _reconciled(c, b, calls, killed)
        sids = {call.call_sid for call in calls}
        told: dict[str, str] = {}
        async with asyncio.timeout(10):
            while set(told) != sids:
                m = await operator.recv()
                if m["type"] == "call.status_changed" and m["status"] == "ended":
                    told[m["callSid"]] = m["reason"]
        assert told == dict.fromkeys(sids, "instance_lost")
        assert b.logged("its instance stopped answering; ended (instance_lost)")
        return figures


async def _reconciled(c: Cluster, survivor: Instance, calls: list[SimulatedCall], killed: float, *,
                      bound: float = REAP_BOUND_S) -> dict[str, float]:
    """Wait for the dead instance's calls to be ended in PostgreSQL, then show their places are
    free: two new callers through ``survivor`` are taken. Seconds from the kill to each, the
    first within ``bound``."""
    sids = [call.call_sid for call in calls]
    conn = await asyncpg.connect(c.dsn)
    try:
        await wait_until(lambda: ended_calls(conn, sids, "instance_lost"), timeout=bound + 10,
                         what="the dead instance's calls ended as instance_lost")
        ended = time.monotonic() - killed
    finally:
        await conn.close()
    for i in range(len(calls)):
        assert (await c.call(survivor, from_=number(20 + i)).webhook()).stream_url
    freed = time.monotonic() - killed
    # Not before the instance can be dead (a slow instance is not a dead one), nor much after.
    assert DEAD_AFTER_S - HEARTBEAT_S <= ended <= bound, ended
    return {"ended": ended, "freed": freed}


async def test_a_sigkilled_instances_calls_are_ended_and_their_places_freed(dsn, other_dsn):
    """kill -9 an instance with the cap full of its calls, (a) then start it again, (b) with
    another instance running: either way its calls end as instance_lost and their places come
    back, within DEAD_AFTER_S + a heartbeat. The two run side by side, each on its database."""
    restarted, survivor = await asyncio.gather(_crash_and_restart(dsn), _crash_beside_a_survivor(other_dsn))
    print(f"\nSIGKILL → calls ended / cap freed: restarted {restarted['ended']:.1f} s / {restarted['freed']:.1f} s "
          f"(back up after {restarted['restart']:.1f} s); beside a survivor {survivor['ended']:.1f} s / "
          f"{survivor['freed']:.1f} s")


async def test_an_outage_longer_than_dead_after_ends_no_live_call(dsn):
    """PostgreSQL away from both instances for longer than DEAD_AFTER_S, a call streaming on
    each (the cap, 2, full): every heartbeat is then old, but nobody died. When PostgreSQL
    returns, neither instance may end the other's calls: they stay live, still count under the
    cap (the next caller is refused), and end as their callers hang up, not as instance_lost."""
    async with proxied(dsn) as proxy, cluster(proxy.dsn, RATE_LIMIT_MAX_CONCURRENT_CALLS="2") as c, \
            aiohttp.ClientSession() as http:
        a, b = await c.start("a", "b")
        calls = [await c.live_call(a, number(1)), await c.live_call(b, number(2))]
        sids = [call.call_sid for call in calls]
        conn = await asyncpg.connect(dsn)  # around the proxy: what is really recorded
        try:
            proxy.cut()
            await _both(http, (a, b), "degraded")
            # Long enough that each instance's last heartbeat says "dead" to the other.
            await wait_until(lambda: conn.fetchval("SELECT max(seen_at) < now() - make_interval(secs => $1) "
                                                   "FROM instances", DEAD_AFTER_S + 1),
                             timeout=DEAD_AFTER_S + HEARTBEAT_S + 10, what="every heartbeat older than DEAD_AFTER_S")
            back = await conn.fetchval("SELECT now()")
            proxy.restore()
            await _both(http, (a, b), "ok")
            # Each instance has finished a whole round (heartbeat, then ending dead instances'
            # calls) once both have beaten after the later one's first beat since the return.
            first = await wait_until(lambda: _beaten_since(conn, back), timeout=20, what="both instances beating")
            await wait_until(lambda: _beaten_since(conn, first), timeout=20, what="a second round on both")
            ended = await _end_reasons(conn, sids)
            late = await c.call(b, from_=number(9)).webhook()
            assert not any(call.closed for call in calls)
            assert (ended, late.say) == ({}, SAY_BUSY), (
                f"live calls recorded as ended {ended}; a caller past the cap (2 live) was "
                f"{'refused' if late.say == SAY_BUSY else 'admitted'}")
            for call in calls:
                await c.hang_up(call)
            await wait_until(lambda: _all_ended(conn, sids), what="the calls recorded as ended")
            assert await _end_reasons(conn, sids) == dict.fromkeys(sids, "caller_hangup")
        finally:
            await conn.close()


async def test_a_browser_hears_of_a_call_that_ended_elsewhere_during_an_outage(dsn):
    """A browser on a follows a call streaming on b. PostgreSQL goes away, and the caller hangs
    up meanwhile: b ends the call, and records it once PostgreSQL is back. The browser must
    then be told that the call ended; else its page shows a call that is over as live."""
    async with proxied(dsn) as proxy, cluster(proxy.dsn) as c, aiohttp.ClientSession() as http:
        a, b = await c.start("a", "b")
        call = await c.live_call(b, number(1))
        sid = call.call_sid
        browser = await c.browser(a)
        token = tokens.subscription_token(tokens.derive_secret(TEST_KEY), sid)  # as call.start gives it
        await browser.send({"type": "call.subscribe", "callSid": sid, "token": token})
        assert (await browser.recv())["status"] == "connected"
        conn = await asyncpg.connect(dsn)
        try:
            proxy.cut()
            await _both(http, (a, b), "degraded")
            await c.hang_up(call)
            await wait_until(lambda: b.logged(f"call {sid} ended: caller_hangup"), what="b to end the call")
            proxy.restore()
            await _both(http, (a, b), "ok")
            await wait_until(lambda: _all_ended(conn, [sid]), timeout=10, what="b to record the call's end")
        finally:
            await conn.close()
        bound = RECONNECT_MAX_S + HEARTBEAT_S
        try:
            told = (await browser.until(lambda m: m.get("status") == "ended", timeout=bound))[-1]
        except TimeoutError:
            told = None
        assert told is not None, (f"the browser on a was not told within {bound:.0f} s that the call, "
                                  "recorded as ended, had ended")
        assert told["reason"] == "caller_hangup"


async def _both(http: aiohttp.ClientSession, instances: tuple[Instance, ...], status: str) -> None:
    for inst in instances:
        await wait_until(lambda i=inst: _status_is(http, i, status), timeout=20, what=f"{inst.name} {status}")


async def _all_ended(conn: asyncpg.Connection, sids: list[str]) -> bool:
    return len(await _end_reasons(conn, sids)) == len(sids)


async def _end_reasons(conn: asyncpg.Connection, sids: list[str]) -> dict[str, str]:
    rows = await conn.fetch("SELECT call_sid, end_reason FROM calls WHERE call_sid = ANY($1::text[]) "
                            "AND ended_at IS NOT NULL", sids)
    return {r["call_sid"]: r["end_reason"] for r in rows}


async def _status_is(http: aiohttp.ClientSession, instance: Instance, status: str) -> bool:
    return (await health(http, instance))["status"] == status


async def _beaten_since(conn: asyncpg.Connection, since) -> Any:
    """The later of the two instances' heartbeats, once both have beaten after ``since``."""
    row = await conn.fetchrow("SELECT count(*) AS n, max(seen_at) AS last FROM instances WHERE seen_at > $1", since)
    return row["last"] if row["n"] == 2 else None

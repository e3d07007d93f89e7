"""What the tests share, in one place: the running Callgate on loopback (``callgate``), waits
with a bound, Twilio signing, a PostgreSQL behind a proxy that can fail, a scaled time unit,
the settings and limiter the tests start from. Fixtures live in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp.test_utils import TestServer
from twilio.request_validator import RequestValidator

from appkeys import BUS
from bridge.events import Event, EventBus
from config import Settings
from db.bounded import DatabaseGate
from db.calls import CallStore, Cap
from db.migrate import migrate
from db.sql import Queries
from limiter.limiter import Limiter, Regions
from limiter.phone import PhoneKeyer
from limiter.rules import Rules
from server import create_app
from tools.fake_realtime import FakeRealtime
from tools.fake_twilio_api import FakeTwilioApi
from tools.simulate_call import SimulatedCall, quiet
from tools.tcp_proxy import TcpProxy, proxied  # noqa: F401 - part of the tests' toolkit

ROOT = Path(__file__).resolve().parent.parent
UNIT = 0.1  # seconds: waits for "nothing more arrives" are small multiples of it
TEST_KEY = "test-phone-key-0123456789abcdef0123456789"
TEST_DB_TIMEOUT_MS = 2000
PUBLIC_URL = "https://callgate.test"  # what Twilio would call; signatures are made over it
AUTH_TOKEN = "twilio-test-token"
MODEL_KEY = "test-key"


# --- waiting ----------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free now (for a server that must know its port before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "the condition") -> Any:
    """``predicate()``'s first true value (awaited, if it is a coroutine), polled every UNIT / 10
    s; TimeoutError naming ``what`` after ``timeout`` seconds. For state with no event to wait
    on (a counter, a gauge, a database row)."""
    async def value_now() -> Any:
        value = predicate()
        return await value if inspect.isawaitable(value) else value

    try:
        async with asyncio.timeout(timeout):
            while not (value := await value_now()):
                await asyncio.sleep(UNIT / 10)
    except TimeoutError:
        raise TimeoutError(f"{what} did not come true within {timeout} s") from None
    return value


class Collected:
    """Events a bus hands one subscriber, in order, for a test to wait on (``get``)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    async def get(self) -> Event:
        return await self.queue.get()


@contextlib.contextmanager
def collect(bus: EventBus, call_sid: str | None) -> Iterator[Collected]:
    """Follow one call's events (None: every call's) on ``bus`` for the block."""
    got = Collected()
    subscription = bus.subscribe(call_sid, got.queue.put_nowait)
    try:
        yield got
    finally:
        subscription.close()


async def until(sub: Collected, predicate, timeout: float = 10.0) -> list[dict]:
    """The events a subscription gets, up to and including the first that matches."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            seen.append(await sub.get())
            if predicate(seen[-1]):
                return seen


# --- Twilio -----------------------------------------------------------------------------------


def sign(url: str, params: dict, token: str | None = None, algorithm: str = "HMAC_SHA1") -> str:
    """X-Twilio-Signature for ``url`` and ``params``, as Twilio computes it."""
    return RequestValidator(token or AUTH_TOKEN).compute_signature(url, params, algorithm)


# --- PostgreSQL -------------------------------------------------------------------------------


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at another database of the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


class Clock:
    """A settable clock in epoch ms, passed to the limiter (and so to its SQL) as "now"."""

    def __init__(self, now_ms: int = 1_800_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def gate_for(pool) -> DatabaseGate:
    """The database gate over ``pool``, open (the test's database is migrated)."""
    gate = DatabaseGate(pool, Queries.load().database_ping, migrate, TEST_DB_TIMEOUT_MS / 1000)
    gate.up = gate.migrated = True
    return gate


def make_store(pool, *, timeout: float = TEST_DB_TIMEOUT_MS / 1000, max_live: int = 10, fail_mode: str = "memory",
               instance_id: str = "test-instance", live_here: Callable[[], Collection[str]] = tuple) -> CallStore:
    """A call store over ``pool``, with a cap of ``max_live`` (sessions count 420 s, setups and
    holds 60 s)."""
    return CallStore(gate_for(pool), Queries.load(), timeout, Cap(max_live, 420.0, 60.0, 60.0, fail_mode),
                     instance_id, live_here)


def make_limiter(pool, *, max_calls: int = 2, window_ms: int = 3_600_000, cooldown_ms: int = 0,
                 key: str = TEST_KEY, previous: tuple[str, ...] = (), fail_mode: str = "memory",
                 clock=None, timeout: float = 2.0, regions=("US", "AU", "IN")) -> Limiter:
    return Limiter(
        gate_for(pool), Queries.load(), PhoneKeyer(key, previous), Rules(max_calls, window_ms, cooldown_ms),
        Regions("US", frozenset(regions)), fail_mode=fail_mode, timeout=timeout,
        **({"clock": clock} if clock else {}),
    )


def settings_for(dsn: str, **changes) -> Settings:
    env = {"DATABASE_URL": dsn, "PHONE_ENCRYPTION_KEY": TEST_KEY, "PORT": "0"}
    env.update(changes)
    return Settings.from_env(env)


# --- a whole Callgate on loopback -------------------------------------------------------------


@dataclass
class Harness:
    server: TestServer
    twilio_api: FakeTwilioApi
    model: FakeRealtime | None
    calls: list[SimulatedCall] = field(default_factory=list)

    @property
    def app(self):
        return self.server.app

    @property
    def bus(self) -> EventBus:
        return self.app[BUS]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def call(self, **kwargs) -> SimulatedCall:
        kwargs.setdefault("speed", 4.0)
        kwargs.setdefault("tail_silence_ms", 200)
        kwargs.setdefault("auth_token", AUTH_TOKEN)
        call = SimulatedCall(self.url, public_url=PUBLIC_URL, account_sid=self.twilio_api.account_sid, **kwargs)
        self.calls.append(call)
        return call


@contextlib.asynccontextmanager
async def callgate(dsn: str, *, model: FakeRealtime | None = None, port: int = 0, **env: str) -> AsyncIterator[Harness]:
    """Callgate wired to the peers. Without ``model`` calls go to the offline agent. A fixed
    ``port`` makes the server's own origin (http://127.0.0.1:port) an allowed browser origin."""
    async with FakeTwilioApi(auth_token=AUTH_TOKEN) as api:
        settings = {"PUBLIC_URL": PUBLIC_URL, "TWILIO_ACCOUNT_SID": api.account_sid,
                    "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_API_BASE_URL": api.base_url}
        if model is not None:
            settings |= {"OPENAI_API_KEY": MODEL_KEY, "OPENAI_REALTIME_URL": model.url}
        settings["PORT"] = str(port)
        server = TestServer(create_app(settings_for(dsn, **(settings | env))),
                            host="127.0.0.1", port=port)
        await server.start_server()
        harness = Harness(server, api, model)
        try:
            yield harness
        finally:
            for call in harness.calls:
                await call.close()
            await server.close()
        if model is not None:
            # Every call test is also a conformance test: nothing Callgate sent was refused
            # by the SDK's types (the real API would have answered it with an error).
            refused = [(e.get("type"), str(p)) for s in model.sessions for e, p in s.refused]
            assert refused == [], f"the model refused client events: {refused}"
            assert model.invalid_sent == [], f"the fake sent invalid events: {model.invalid_sent}"



async def silent_call(h: Harness, **call_kwargs) -> tuple[SimulatedCall, Any]:
    """A caller who says nothing, its stream open: the call and its model session."""
    call = h.call(audio=b"", **call_kwargs)
    await call.webhook()
    await call.connect()
    return call, await h.model.wait_for_session()


async def silent_call_to_its_end(h: Harness, timeout: float = 10, **call_kwargs) -> tuple[SimulatedCall, Any, list[dict]]:
    """A caller who says nothing, from the webhook to the call's end: the call, its model
    session, and the call's bus events up to its ``ended``."""
    call = h.call(audio=b"", **call_kwargs)
    await call.webhook()
    with collect(h.bus, call.call_sid) as sub:
        await call.connect()
        session = await h.model.wait_for_session()
        events = await until(sub, is_ended, timeout=timeout)
    return call, session, events


def quiet_pattern(seed: int, ms: int) -> bytes:
    """Audio unique to one call, too quiet for any voice detector."""
    return quiet(ms, seed)


def is_ended(event: dict) -> bool:
    return event["type"] == "call.status_changed" and event["status"] == "ended"


def hangups(h, call_sid: str) -> list:
    """The REST requests that hung ``call_sid`` up."""
    return [r for r in h.twilio_api.requests
            if r.method == "POST" and r.path.endswith(f"/Calls/{call_sid}.json") and r.value("Status") == "completed"]

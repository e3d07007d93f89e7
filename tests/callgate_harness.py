"""A whole Callgate on loopback for call-path tests: the real app on port 0, a real PostgreSQL,
the fake Twilio REST API, and (when wanted) the fake Realtime model; plus simulated calls."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp.test_utils import TestServer

from appkeys import BUS
from bridge.events import EventBus
from helpers import settings_for
from server import create_app
from tools.fake_realtime import FakeRealtime
from tools.fake_twilio_api import FakeTwilioApi
from tools.simulate_call import SimulatedCall

PUBLIC_URL = "https://callgate.test"  # what Twilio would call; signatures are made over it
AUTH_TOKEN = "twilio-test-token"
MODEL_KEY = "test-key"


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


# --- what the call tests look for ----------------------------------------------------------


def quiet_pattern(seed: int, ms: int) -> bytes:
    """Audio unique to one call, too quiet for any voice detector (μ-law codes near silence)."""
    rng = random.Random(seed)
    return bytes(rng.choice((0xF8, 0xF9, 0xFA, 0xFB, 0x78, 0x79, 0x7A, 0x7B)) for _ in range(ms * 8))


async def until(sub, predicate, timeout: float = 10.0) -> list[dict]:
    """The events a bus subscription gets, up to and including the first that matches."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            seen.append(await sub.get())
            if predicate(seen[-1]):
                return seen


def is_ended(event: dict) -> bool:
    return event["type"] == "call.status_changed" and event["status"] == "ended"


def hangups(h, call_sid: str) -> list:
    """The REST requests that hung ``call_sid`` up."""
    return [r for r in h.twilio_api.requests
            if r.method == "POST" and r.path.endswith(f"/Calls/{call_sid}.json") and r.value("Status") == "completed"]

"""A whole Callgate on loopback for call-path tests: the real app on port 0, a real PostgreSQL,
the fake Twilio REST API, and (when wanted) the fake Realtime model; plus simulated calls."""

from __future__ import annotations

import contextlib
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

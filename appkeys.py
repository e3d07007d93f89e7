"""Typed keys for what the application shares between handlers (aiohttp ``AppKey``)."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from bridge.call import Call, CallServices
from bridge.events import EventBus
from bridge.fanout import PgFanout
from config import Settings
from db.calls import CallStore
from db.database import Database
from limiter.limiter import Limiter
from logsetup import Throttled
from metrics import Metrics
from twilio_rest import TwilioRest


@dataclass
class Lifecycle:
    """Process-wide facts the health routes report."""

    started_at: float = field(default_factory=time.time)
    draining: bool = False
    active_calls: int = 0
    streams_starting: int = 0
    # Stream tokens spent while PostgreSQL was away (single use on this instance only),
    # with their expiry: an expired token is refused anyway, so it is forgotten.
    spent_tokens: dict[str, float] = field(default_factory=dict)

    def spend_token_locally(self, jti: str, expires: float) -> bool:
        now = time.time()
        for old in [j for j, until in self.spent_tokens.items() if until < now]:
            del self.spent_tokens[old]
        if jti in self.spent_tokens:
            return False
        self.spent_tokens[jti] = expires
        return True


@dataclass
class FrontendState:
    """Who is connected on /logs: open sockets per client IP, every socket (for shutdown),
    work started by clients that outlives them, and recent call.starts per client IP."""

    per_ip: collections.Counter = field(default_factory=collections.Counter)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    background: set = field(default_factory=set)
    call_starts: dict[str, collections.deque] = field(default_factory=dict)

    def take_call_start(self, ip: str, limit: int = 10, window_s: float = 3600.0) -> bool:
        """A sliding log per client address: at most ``limit`` call.starts per window."""
        now = time.monotonic()
        log = self.call_starts.setdefault(ip, collections.deque())
        while log and log[0] <= now - window_s:
            log.popleft()
        if len(log) >= limit:
            return False
        log.append(now)
        if len(self.call_starts) > 10_000:  # bounded: forget the quietest addresses
            for quiet in [k for k, v in self.call_starts.items() if not v][:1000]:
                del self.call_starts[quiet]
        return True


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
DATABASE = web.AppKey("database", Database)
LIMITER = web.AppKey("limiter", Limiter)
CALL_STORE = web.AppKey("call_store", CallStore)
BUS = web.AppKey("bus", EventBus)
CALLS = web.AppKey("calls", dict[str, Call])
CALL_SERVICES = web.AppKey("call_services", CallServices)
TWILIO_REST = web.AppKey("twilio_rest", TwilioRest)
TOKEN_SECRET = web.AppKey("token_secret", bytes)
HTTP = web.AppKey("http", aiohttp.ClientSession)  # outgoing HTTP (Turnstile)
FRONTEND = web.AppKey("frontend", FrontendState)
FANOUT = web.AppKey("fanout", PgFanout)
REFUSALS = web.AppKey("refusals", Throttled)  # log lines for refused requests, throttled per reason

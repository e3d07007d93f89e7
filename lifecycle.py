"""The process's life, as the handlers and the shutdown see it: when it started, whether it is
draining (SIGTERM: finishing its live calls, taking no new ones), the live calls themselves,
by CallSid (the one count of live calls: ``/healthz``, ``/metrics``, the drain), and who is
connected on ``/logs``.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ratelimits import Buckets

if TYPE_CHECKING:
    from bridge.call import Call


@dataclass
class Lifecycle:
    instance_id: str = field(default_factory=lambda: secrets.token_hex(6))  # this process, among instances
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    calls: dict[str, Call] = field(default_factory=dict)  # live calls on this instance
    # /call sockets waiting for their `start`, oldest first, with their peer's address.
    starting: dict[web.WebSocketResponse, str] = field(default_factory=dict)
    closing: set[asyncio.Task] = field(default_factory=set)  # sockets being closed from outside

    @property
    def active_calls(self) -> int:
        return len(self.calls)


HANDSHAKES_PER_S, HANDSHAKE_BURST = 10.0, 20  # /logs upgrades per client address
ADMIN_GUESSES_PER_MIN = 5  # wrong admin tokens per client address


@dataclass
class FrontendState:
    """Who is connected on /logs: open sockets per client address, every socket with its client
    (for the shutdown), and work started by clients that outlives them (placing a call,
    hanging up)."""

    per_ip: collections.Counter = field(default_factory=collections.Counter)
    sockets: dict[web.WebSocketResponse, Any] = field(default_factory=dict)  # → handlers.frontend.Client
    background: set[asyncio.Task] = field(default_factory=set)
    # /logs upgrades per client address and second (a reconnect loop, a flood).
    handshakes: Buckets = field(default_factory=lambda: Buckets(rate=HANDSHAKES_PER_S, burst=HANDSHAKE_BURST))
    # Wrong admin tokens per client address: a few a minute, so guessing gets nowhere.
    admin_failures: Buckets = field(default_factory=lambda: Buckets(rate=ADMIN_GUESSES_PER_MIN / 60,
                                                                     burst=ADMIN_GUESSES_PER_MIN))

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

if TYPE_CHECKING:
    from bridge.call import Call


@dataclass
class Lifecycle:
    instance_id: str = field(default_factory=lambda: secrets.token_hex(6))  # this process, among instances
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    calls: dict[str, Call] = field(default_factory=dict)  # live calls on this instance
    streams_starting: int = 0  # /call sockets waiting for their `start`

    @property
    def active_calls(self) -> int:
        return len(self.calls)


@dataclass
class FrontendState:
    """Who is connected on /logs: open sockets per client address, every socket with its client
    (for the shutdown), and work started by clients that outlives them (placing a call,
    hanging up)."""

    per_ip: collections.Counter = field(default_factory=collections.Counter)
    sockets: dict[web.WebSocketResponse, Any] = field(default_factory=dict)  # → handlers.frontend.Client
    background: set[asyncio.Task] = field(default_factory=set)

"""The process's life, as the handlers and the shutdown see it: when it started, whether it is
draining (SIGTERM: finishing its live calls, taking no new ones), the live calls themselves,
by CallSid (the one count of live calls: ``/healthz``, ``/metrics``, the drain), and who is
connected on ``/logs``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import gc
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
    _trim: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def active_calls(self) -> int:
        return len(self.calls)

    def call_ended(self) -> None:
        """A call left ``calls``. When it was the last, the memory a wave of calls used goes back
        to the system shortly after (nothing then relays audio that a collection could delay)."""
        if not self.calls and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_AFTER_S, self._give_back)

    def _give_back(self) -> None:
        self._trim = None
        if not self.calls:
            give_back_memory()


TRIM_AFTER_S = 2.0  # after the last call ended: its sockets and tasks are gone by then


def give_back_memory() -> None:
    """Collect cycles, then hand the heap's free pages back to the kernel. Without it, RSS after
    a wave of 300 calls stayed a third above idle (bench/calls.py): glibc keeps freed memory
    for reuse, and CPython's arenas are only returned when entirely empty."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc: musl has no malloc_trim
    except OSError:
        return None


_LIBC = _libc()


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

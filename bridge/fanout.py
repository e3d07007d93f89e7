"""Call events between instances, over PostgreSQL LISTEN/NOTIFY.

A browser's socket may land on one instance while the call's media stream (or its Twilio
status callback) lands on another. Every event published on this instance's bus is also sent
on the ``callgate_events`` channel; every instance listens, and republishes on its own bus what
other instances sent. Delivery is best effort, like the bus itself: an event that cannot be
sent in time is dropped (and counted in the log), never waited for by a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import asyncpg
import orjson

from bridge.events import Event, EventBus
from db.errors import AWAY

log = logging.getLogger("callgate.fanout")

CHANNEL = "callgate_events"
MAX_PAYLOAD = 7900        # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
MAX_TEXT = 2000           # a transcript longer than this is cut in what other instances see
QUEUE = 2048              # events waiting to be sent; past it they are dropped
SEND_TIMEOUT_S = 2.0
RECONNECT_MAX_S = 10.0


def _clip(event: Event) -> Event:
    text = event.get("text")
    if isinstance(text, str) and len(text) > MAX_TEXT:
        return {**event, "text": text[:MAX_TEXT] + "…"}
    return event


class PgFanout:
    def __init__(self, dsn: str, pool: asyncpg.Pool, bus: EventBus) -> None:
        self._dsn = dsn
        self._pool = pool
        self._bus = bus
        self.instance = secrets.token_hex(6)
        self._outbox: asyncio.Queue[Event] = asyncio.Queue(QUEUE)
        self._dropped = 0
        self.listening = asyncio.Event()

    def offer(self, event: Event) -> None:
        """Called by the bus for each event published here; never waits."""
        try:
            self._outbox.put_nowait(_clip(event))
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped % 100 == 1:
                log.warning("fan-out behind: %d event(s) not sent to other instances", self._dropped)

    async def run(self) -> None:
        """Until cancelled: send what is published here, republish what others send."""
        await asyncio.gather(self._send_loop(), self._listen_loop())

    # --- out --------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 64:
                batch.append(self._outbox.get_nowait())
            for payload in self._payloads(batch):
                try:
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await self._pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
                except AWAY:
                    self._dropped += 1
                    log.debug("fan-out: PostgreSQL away, a batch was not sent")

    def _payloads(self, batch: list[Event]) -> list[str]:
        """Pack events into as few NOTIFY payloads as fit."""
        payloads, current = [], []
        for event in batch:
            attempt = self._encode(current + [event])
            if len(attempt) > MAX_PAYLOAD and current:
                payloads.append(self._encode(current))
                current = [event]
            else:
                current.append(event)
        if current:
            payloads.append(self._encode(current))
        return [p for p in payloads if len(p) <= MAX_PAYLOAD]

    def _encode(self, events: list[Event]) -> str:
        return orjson.dumps({"o": self.instance, "e": events}).decode()

    # --- in ---------------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        delay = 0.5
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _conn: closed.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listening.set()
                delay = 0.5
                await closed.wait()
            except AWAY as exc:
                log.debug("fan-out listener: %s", type(exc).__name__)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict) or message.get("o") == self.instance:
            return  # our own, already delivered here
        for event in message.get("e") or []:
            if isinstance(event, dict) and isinstance(event.get("callSid"), str) and isinstance(event.get("type"), str):
                self._bus.publish(event, remote=True)

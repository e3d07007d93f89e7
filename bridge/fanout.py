"""Call events between instances, over PostgreSQL LISTEN/NOTIFY.

A browser's socket may land on one instance while the call's media stream (or its Twilio
status callback) lands on another. Every event published on this instance's bus is also sent
on the ``callgate_events`` channel; every instance listens, and republishes on its own bus what
other instances sent. Delivery is best effort, like the bus itself: an event that cannot be
sent in time is dropped (and counted in the log), never waited for by a call.

Except for a call's status, which a page must not miss (a call shown live that is over): while
PostgreSQL is away the latest status of each call is kept and sent once it is back; and an
instance whose listener was away (with PostgreSQL) asks, each time it hears again, for the
recorded status of the calls its browsers follow (``on_listening``: calls/status.py catch_up),
now and once more CATCH_UP_AGAIN_S later, when the instance that ended a call meanwhile has
written its end back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from bridge.events import Event, EventBus
from db.bounded import DatabaseAway, DatabaseGate
from db.errors import AWAY
from db.sql import Queries

log = logging.getLogger("callgate.fanout")

CHANNEL = "callgate_events"
# Messages between instances rather than call events (e.g. "control.end_call": the instance
# that streams the call ends it): sent with offer(), handed to on_control, never to the bus.
CONTROL_PREFIX = "control."
CONTROL_END_CALL = "control.end_call"  # {callSid, reason}
CONTROL_INSTANCE_JOINED = "control.instance_joined"  # {}: count the instances again now
MAX_PAYLOAD = 7900        # bytes; PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
MAX_TEXT_BYTES = 1500     # a longer text field is cut in what other instances see
QUEUE = 2048              # events waiting to be sent; past it they are dropped
SEND_TIMEOUT_S = 2.0
RECONNECT_MAX_S = 10.0
PROBE_EVERY_S = 20.0      # a listening connection that died without a reset is found this soon
UNSENT_STATUSES = 1024    # calls whose latest status waits for PostgreSQL's return; oldest go first
CATCH_UP_AGAIN_S = 5.0    # a call's end made elsewhere meanwhile is written back within ~1 s of the return


def _cut(text: str) -> str:
    """``text`` cut to MAX_TEXT_BYTES of UTF-8 (not characters: Devanagari is 3 bytes each)."""
    data = text.encode()
    if len(data) <= MAX_TEXT_BYTES:
        return text
    return data[:MAX_TEXT_BYTES].decode(errors="ignore") + "…"


def _clip(event: Event) -> Event:
    long = {k: _cut(v) for k, v in event.items() if k in ("text", "delta", "arguments", "output") and isinstance(v, str)}
    return {**event, **long} if long else event


class PgFanout:
    def __init__(self, dsn: str, gate: DatabaseGate, queries: Queries, bus: EventBus, instance_id: str,
                 count_drop: Callable[[str], None] = lambda reason: None) -> None:
        self._dsn = dsn
        self._count_drop = count_drop  # callgate_fanout_dropped_total
        self._gate = gate
        self._q = queries
        self._bus = bus
        self.instance = instance_id
        self._outbox: asyncio.Queue[Event] = asyncio.Queue(QUEUE)
        self.on_control: Callable[[Event], None] | None = None
        # After each (re)LISTEN: what this instance's followers may have missed (calls/status.py).
        self.on_listening: Callable[[], Awaitable[Any]] | None = None
        self._unsent: dict[str, Event] = {}  # callSid → its latest status not sent (PostgreSQL away)
        self._tasks: set[asyncio.Task] = set()  # held: the loop keeps only weak references
        self._dropped = 0
        self.listening = asyncio.Event()

    def offer(self, event: Event) -> None:
        """Called by the bus for each event published here; never waits."""
        try:
            self._outbox.put_nowait(_clip(event))
        except asyncio.QueueFull:
            self._dropped += 1
            self._count_drop("queue_full")
            if self._dropped % 100 == 1:
                log.warning("fan-out behind: %d event(s) not sent to other instances", self._dropped)

    async def run(self) -> None:
        """Until cancelled: send what is published here, republish what others send. A loop
        that fails unexpectedly is logged and started again: fan-out must not stop silently."""
        await asyncio.gather(self._forever(self._send_loop), self._forever(self._listen_loop))

    async def _forever(self, loop) -> None:
        while True:
            try:
                await loop()
            except Exception:  # noqa: BLE001 - logged, then the loop starts over
                log.exception("fan-out %s failed; restarting it", loop.__name__)
                await asyncio.sleep(1.0)

    # --- out --------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 64:
                batch.append(self._outbox.get_nowait())
            for payload, events in self._pack(batch):
                try:
                    await self._gate.run(lambda conn, p=payload: conn.execute(
                        self._q.events_notify, CHANNEL, p), SEND_TIMEOUT_S)
                except DatabaseAway:
                    self._dropped += 1
                    self._count_drop("database_away")
                    self._keep_statuses(events)
                    log.debug("fan-out: PostgreSQL away, a batch was not sent")
                except asyncpg.PostgresError as exc:
                    self._dropped += 1
                    self._count_drop("refused")
                    log.warning("fan-out: a batch was refused (%s)", type(exc).__name__)

    def _keep_statuses(self, events: list[Event]) -> None:
        """The statuses among events that could not be sent, kept (the latest per call) to be
        sent when PostgreSQL is back."""
        first = not self._unsent
        for event in events:
            if event["type"] == "call.status_changed":
                self._unsent.pop(event["callSid"], None)
                self._unsent[event["callSid"]] = event
        while len(self._unsent) > UNSENT_STATUSES:
            self._unsent.pop(next(iter(self._unsent)))
        if first and self._unsent:
            self._spawn(self._send_kept_when_back(), "fanout-resend")

    async def _send_kept_when_back(self) -> None:
        await self._gate.became_up.wait()
        kept, self._unsent = list(self._unsent.values()), {}
        for event in kept:
            self.offer(event)

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pack(self, batch: list[Event]) -> list[tuple[str, list[Event]]]:
        """Pack events into as few NOTIFY payloads as fit (measured in bytes, as PostgreSQL
        does), each with the events it carries; an event too big on its own is dropped."""
        # Sizes add up: encode(events) is the envelope, each event, and a comma between two
        # (orjson writes no spaces), so each event is encoded once to be measured, not once per
        # event after it: a batch of 64 took 2,000 encodings.
        envelope = len(self._encode([]))
        packed: list[tuple[bytes, list[Event]]] = []
        current: list[Event] = []
        size = envelope
        for event in batch:
            n = len(orjson.dumps(event))
            if current and size + 1 + n > MAX_PAYLOAD:
                packed.append((self._encode(current), current))
                current, size = [], envelope
            size += n + (1 if current else 0)
            current.append(event)
        if current:
            packed.append((self._encode(current), current))
        fitting = [(p.decode(), events) for p, events in packed if len(p) <= MAX_PAYLOAD]
        for _ in range(len(packed) - len(fitting)):
            self._count_drop("too_big")
        return fitting

    def _encode(self, events: list[Event]) -> bytes:
        return orjson.dumps({"o": self.instance, "e": events})

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
                self._spawn(self._catch_up(), "fanout-catch-up")
                delay = 0.5
                while not closed.is_set():
                    # A connection that died without a reset (a partition, a failover) would
                    # wait here forever, deaf: probe it.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), PROBE_EVERY_S)
                    if not closed.is_set():
                        await conn.fetchval(self._q.database_ping, timeout=5)
            except AWAY as exc:
                log.debug("fan-out listener: %s", type(exc).__name__)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            if self._gate is not None and not self._gate.up:
                # Away with PostgreSQL: hear again as soon as it is back, not a back-off later.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gate.became_up.wait(), RECONNECT_MAX_S)
                delay = 0.5
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _catch_up(self) -> None:
        """What this instance's followers missed while it could not hear: now, and again once
        an end made elsewhere meanwhile has had time to be written back."""
        if self.on_listening is None:
            return
        for wait in (0.0, CATCH_UP_AGAIN_S):
            await asyncio.sleep(wait)
            try:
                await self.on_listening()
            except Exception:  # noqa: BLE001 - best effort, like the rest of the fan-out
                log.exception("fan-out catch-up failed")

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict) or message.get("o") == self.instance:
            return  # our own, already delivered here
        for event in message.get("e") or []:
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                continue
            if event["type"].startswith(CONTROL_PREFIX):
                if self.on_control is not None:
                    self.on_control(event)  # for the instances, never for browsers
            elif isinstance(event.get("callSid"), str):
                self._bus.publish(event, remote=True)

"""Group commit for charges: the decisions waiting at the same moment go to PostgreSQL as one
statement (``sql/limiter_hit.sql``), one transaction, one commit.

A decision alone costs PostgreSQL a round trip, a transaction and a commit, ten times what a
``SELECT 1`` costs it (bench/limiter_bench.py): under load the commits, not the rule, set the
pace. So a charge is queued, and sent with whatever else is queued when the loop next runs;
while ``max_in_flight`` batches are out, the queue grows into the next batch instead of each
charge waiting for a connection of its own. Alone, a charge goes out at the next turn of the
loop, as before.

What each decision means does not change: it is ``callgate_limiter_charge``, in order, each
with a fresh snapshot and its number's row lock. What a batch adds: its decisions commit or
fail together, so one outage fails all of them (each falls back by the fail mode, as alone),
and they share the tightest deadline among them. Rows are sent sorted by key, so any two
batches, from any instances, take row locks in one order and never deadlock on each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from limiter.errors import LimiterUnavailable

MAX_BATCH = 64  # decisions per statement: bounds how long one batch holds its rows' locks


@dataclass(frozen=True)
class Charge:
    """One decision's parameters: ``sql/limiter_hit.sql``'s $1..$9, element by element."""

    key: bytes
    charge_id: str
    max_calls: int
    window_ms: int
    cooldown_ms: int
    now_ms: int | None
    at_ms: int | None
    force: bool
    region: str


class Deadline(Protocol):
    """The time left for one public call, in seconds (the limiter's ``_Deadline``)."""

    def left(self) -> float: ...


class _Waiting:
    __slots__ = ("charge", "deadline", "answer")

    def __init__(self, charge: Charge, deadline: Deadline, answer: asyncio.Future) -> None:
        self.charge, self.deadline, self.answer = charge, deadline, answer


class ChargeBatcher:
    """``charge(...)`` answers with the decision's row (``times``, ``charges``, ``now_ms``,
    ``admitted``), or raises what ``run`` raised for its batch.

    ``run(work, deadline)`` is the limiter's bounded way to the database (pool, timeout, retry
    of a deadlock); the batch's ``work`` is one ``fetch`` of ``query``."""

    def __init__(self, run: Callable[[Callable[[asyncpg.Connection], Awaitable[Any]], Deadline], Awaitable[Any]],
                 query: str, max_in_flight: int, max_batch: int = MAX_BATCH) -> None:
        self._run = run
        self._query = query
        self._max_in_flight = max(1, max_in_flight)
        self._max_batch = max_batch
        self._queue: list[_Waiting] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()  # held: the loop keeps only weak references
        self.batches = 0    # statements sent, and the decisions in them: their ratio is the
        self.decisions = 0  # batch size the load produced (bench/limiter_bench.py prints it)

    async def charge(self, charge: Charge, deadline: Deadline) -> asyncpg.Record:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queue.append(_Waiting(charge, deadline, answer))
        if not self._scheduled:
            # Not now: at the next turn of the loop, with every charge queued before it.
            self._scheduled = True
            loop.call_soon(self._flush)
        return await answer

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < self._max_in_flight:
            batch, self._queue = self._queue[:self._max_batch], self._queue[self._max_batch:]
            # A caller that gave up (its request cancelled) before its charge was sent is not charged.
            batch = [w for w in batch if not w.answer.done()]
            late = [w for w in batch if w.deadline.left() <= 0]
            for w in late:
                w.answer.set_exception(LimiterUnavailable("timed out waiting to be sent", sent=False))
            batch = [w for w in batch if w.deadline.left() > 0]
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Waiting]) -> None:
        try:
            batch.sort(key=lambda w: w.charge.key)  # one lock order for every batch (stable: arrival order within a key)
            rows = [w.charge for w in batch]
            columns = [[getattr(c, name) for c in rows] for name in _COLUMNS]
            tightest = min(batch, key=lambda w: w.deadline.left()).deadline
            self.batches += 1
            self.decisions += len(batch)
            try:
                answers = await self._run(lambda conn: conn.fetch(self._query, *columns), tightest)
            except BaseException as exc:  # the batch's failure is each decision's
                for w in batch:
                    if not w.answer.done():
                        w.answer.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                if not isinstance(exc, Exception):
                    raise
                return
            for w, row in zip(batch, answers, strict=True):
                if not w.answer.done():
                    w.answer.set_result(row)
        finally:
            self._in_flight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)


_COLUMNS = ("key", "charge_id", "max_calls", "window_ms", "cooldown_ms", "now_ms", "at_ms", "force", "region")

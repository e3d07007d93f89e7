"""The per-phone-number limiter: hit (charge), test (read), refund, cleanup; and budgets
that are not numbers' (a client address's call.starts).

One decision, file by file: a workflow (``calls/admission.py``, ``calls/outbound.py``) calls
``hit(number, charge_id)`` → the number parsed and keyed (``limiter/phone.py``: E.164, then
HMAC-SHA256) → charges this instance made while PostgreSQL was away written back first →
one decision of a batch (``limiter/batch.py``: the charges waiting at the same moment share one
statement, ``sql/limiter_hit.sql``, and one commit; the sliding-log rule itself is
``callgate_limiter_admit`` in ``sql/migrations/001_limiter.sql``) → the live
log that comes back, mirrored in memory (``limiter/memory.py``) and read into a ``Decision``
(``limiter/rules.py``).

Every public call is bounded by one deadline (``LIMITER_TIMEOUT_MS``: pool acquire,
statements, release, waiting for a write-back); when PostgreSQL is away the fail mode decides
(``memory``: the same rule in this process; ``closed``; ``open``), and asyncpg's errors
never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from db.bounded import DatabaseAway, DatabaseGate
from db.errors import RETRY_ONCE
from db.sql import Queries
from limiter.batch import Charge, ChargeBatcher
from limiter.errors import InvalidNumber, LimiterError, LimiterUnavailable
from limiter.memory import MemoryLog
from limiter.phone import PhoneKeyer, PhoneNumber, parse
from limiter.rules import Decision, Rules, refused, summarize

log = logging.getLogger("callgate.limiter")

FAIL_MODES = ("memory", "closed", "open")
CLEANUP_BATCH = 1000
# Charge ids stay idempotent this long after their window (a webhook replayed the next day
# still charges nothing).
CHARGE_RETENTION_MS = 24 * 3600 * 1000
# Budgets other than a number's (hit_budget) keep their rows this long: longer than any of
# their windows (the call.start budget's is an hour).
BUDGET_RETENTION_MS = 24 * 3600 * 1000
CHARGE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
BUDGET_REGION = "budget"  # what a budget's rows hold in the region column (analytics leave them out)


@dataclass(frozen=True)
class Budget:
    """A limit on something other than a phone number: ``kind`` names what is counted (say,
    ``call-starts-per-address``), ``subject`` whose (an address). Its key is an HMAC of both,
    apart from every number's."""

    kind: str
    subject: str
    rules: Rules

    def __post_init__(self) -> None:
        if self.rules.window_ms > BUDGET_RETENTION_MS:
            raise ValueError("a budget's window may not exceed BUDGET_RETENTION_MS (cleanup keeps rows that long)")

    @property
    def name(self) -> str:
        return f"budget|{self.kind}|{self.subject}"



class _Deadline:
    """One time budget shared by every step of a public call."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return self._end - time.monotonic()


@dataclass(frozen=True)
class Regions:
    default: str
    allowed: frozenset[str]


class Limiter:
    """Per-number call limits, through the database gate (one asyncpg pool).

    ``clock`` returns the epoch ms to decide at, or None (the default) for the database's own
    clock; tests pass a fixed clock to move time without sleeping.
    """

    def __init__(
        self,
        gate: DatabaseGate,
        queries: Queries,
        keyer: PhoneKeyer,
        rules: Rules,
        regions: Regions,
        *,
        fail_mode: str,
        timeout: float,
        clock: Callable[[], int | None] = lambda: None,
        observe: Callable[[str, Decision | None, float], None] | None = None,
    ) -> None:
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, not {fail_mode!r}")
        self.gate = gate
        self._q = queries
        self._keyer = keyer
        self.rules = rules
        self.regions = regions
        self.fail_mode = fail_mode
        self._timeout = timeout
        self._clock = clock
        self._observe = observe or (lambda op, decision, seconds: None)
        self.memory = MemoryLog()
        # Serialises writing back with refunds, so a refund never lands before the charge it undoes.
        self._writeback = asyncio.Lock()
        # Half the pool for charges in flight: the rest of the queue waits as the next batch,
        # and refunds, statuses and the call store still find a connection.
        self.batcher = ChargeBatcher(self._run, queries.limiter_hit, max_in_flight=gate.pool.get_max_size() // 2)

    # --- numbers ---------------------------------------------------------------------------

    def parse(self, raw: object) -> PhoneNumber:
        """Normalise a number or raise InvalidNumber (reason code + message)."""
        return parse(raw, default_region=self.regions.default, allowed_regions=self.regions.allowed)

    def _local_now(self) -> int:
        fixed = self._clock()
        return fixed if fixed is not None else int(time.time() * 1000)

    @staticmethod
    def _check_charge_id(charge_id: object) -> str:
        if not isinstance(charge_id, str) or not CHARGE_ID.fullmatch(charge_id):
            raise LimiterError(f"charge id must be 1-64 letters, digits or _.:- (got {charge_id!r:.80})")
        return charge_id

    # --- the database edge -----------------------------------------------------------------

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]], deadline: _Deadline) -> Any:
        """Run ``work`` on a pooled connection within the deadline.

        Raises LimiterUnavailable (``sent`` tells whether a statement may have reached the
        server) or LimiterError for a failure that is not an outage. A deadlock is retried once.
        """
        for attempt in (1, 2):
            try:
                return await self._attempt(work, deadline)
            except RETRY_ONCE as exc:
                log.warning("the limiter's statement was rolled back (%s: %s); %s", type(exc).__name__,
                            str(exc).splitlines()[0], "gave up" if attempt == 2 else "retrying once")
                if attempt == 2:
                    raise LimiterError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    async def _attempt(self, work: Callable[[asyncpg.Connection], Awaitable[Any]], deadline: _Deadline) -> Any:
        try:
            return await self.gate.run(work, deadline.left())
        except DatabaseAway as exc:
            raise LimiterUnavailable(str(exc), sent=exc.sent) from exc
        except asyncpg.PostgresError as exc:
            if isinstance(exc, RETRY_ONCE):
                raise
            raise LimiterError(f"{type(exc).__name__}: {exc}") from exc

    @property
    def database_ok(self) -> bool:
        return self.gate.up

    async def _fetchrow(self, query: str, *args: Any, deadline: _Deadline | None = None) -> asyncpg.Record:
        return await self._run(lambda conn: conn.fetchrow(query, *args), deadline or _Deadline(self._timeout))

    async def _charge(self, key: bytes, charge_id: str, rules: Rules, region: str, deadline: _Deadline, *,
                      at_ms: int | None = None, force: bool = False) -> asyncpg.Record:
        """Charge ``charge_id`` to the log of ``key`` under ``rules``, now (or at ``at_ms``, with
        ``force`` for a charge that already happened: a write-back): one decision of a batch
        (``limiter/batch.py``, ``sql/limiter_hit.sql``)."""
        return await self.batcher.charge(Charge(key, charge_id, rules.max_calls, rules.window_ms, rules.cooldown_ms,
                                                self._clock(), at_ms, force, region), deadline)

    async def check_database(self) -> bool:
        """Probe PostgreSQL now (the gate's probe); returns whether it answers."""
        return await self.gate.probe()

    @contextlib.asynccontextmanager
    async def _writeback_lock(self, deadline: _Deadline):
        try:
            async with asyncio.timeout(max(deadline.left(), 0)):
                await self._writeback.acquire()
        except TimeoutError as exc:
            raise LimiterUnavailable("timed out waiting for a write-back", sent=False) from exc
        try:
            yield
        finally:
            self._writeback.release()

    # --- hit / test / refund ---------------------------------------------------------------

    async def hit(self, number: str | PhoneNumber, charge_id: str) -> Decision:
        """Charge one call to ``number`` under ``charge_id`` (a CallSid or a reservation id).

        Idempotent per charge id: a second hit with the same id charges nothing and answers
        allowed. An invalid number is refused with its reason and never charged. A malformed
        charge id raises LimiterError (a bug in the caller).
        """
        started = time.perf_counter()
        self._check_charge_id(charge_id)
        phone = self._phone_or_refusal(number)
        if isinstance(phone, Decision):
            return self._done("hit", phone, started)
        key = self._keyer.key(phone.e164)
        deadline = _Deadline(self._timeout)
        sent = False
        try:
            await self._write_back_key(key, deadline)
            if self._keyer.rotating:
                await self._rekey(key, self._keyer.previous(phone.e164), deadline)
            sent = True
            row = await self._charge(key, charge_id, self.rules, phone.region, deadline)
        except LimiterUnavailable as exc:
            decision = self._hit_while_away(key, phone.region, charge_id, unknown=sent and exc.sent)
        else:
            self.memory.mirror(key, row["times"], row["charges"])
            decision = summarize(row["times"], row["now_ms"], self.rules, admitted=row["admitted"])
        if not decision.allowed:
            log.info("refused %s (key %s): %s", phone.masked, PhoneKeyer.short(key), decision.reason)
        return self._done("hit", decision, started)

    def _phone_or_refusal(self, number: str | PhoneNumber) -> PhoneNumber | Decision:
        """The parsed number, or the refusal to answer for one that may not be called."""
        if isinstance(number, PhoneNumber):
            return number
        try:
            return self.parse(number)
        except InvalidNumber as exc:
            return refused(self.rules, self._local_now(), exc.code, exc.message, "validation")

    def _done(self, op: str, decision: Decision, started: float) -> Decision:
        self._observe(op, decision, time.perf_counter() - started)
        return decision

    async def _rekey(self, key: bytes, old_keys: list[bytes], deadline: _Deadline) -> None:
        async def move(conn: asyncpg.Connection) -> None:
            # Two statements, one transaction: the second needs a fresh snapshot to see charge
            # records committed while the first waited for the old rows' locks.
            async with conn.transaction():
                moved = await conn.fetchval(self._q.limiter_rekey, key, old_keys)
                if moved:
                    await conn.execute(self._q.limiter_rekey_charges, key, moved)

        await self._run(move, deadline)

    async def hit_budget(self, budget: Budget, charge_id: str) -> Decision:
        """Charge a budget that is not a phone number's (a client address's call.starts): the
        same exact sliding log in PostgreSQL, keyed by the HMAC of the budget's name, shared
        by every instance. While PostgreSQL is away each instance keeps it in memory for
        itself (whatever the fail mode: it guards no number), and nothing is written back."""
        self._check_charge_id(charge_id)
        key = self._keyer.key(budget.name)
        try:
            row = await self._charge(key, charge_id, budget.rules, BUDGET_REGION, _Deadline(self._timeout))
        except LimiterUnavailable:
            now = self._local_now()
            times, admitted = self.memory.admit(key, BUDGET_REGION, charge_id, now, budget.rules, write_back=False)
            return summarize(times, now, budget.rules, admitted=admitted, source="memory")
        return summarize(row["times"], row["now_ms"], budget.rules, admitted=row["admitted"])

    def _hit_while_away(self, key: bytes, region: str, charge_id: str, *, unknown: bool) -> Decision:
        # A statement that was sent may have committed (a "ghost write"): it stays counted and
        # is never retried blindly. Charges decided here are written back by charge id, which
        # the database treats idempotently, so a ghost write is not counted twice.
        if unknown:
            log.warning("charge %r: outcome unknown (sent, no answer); counted as charged", charge_id)
        now = self._local_now()
        if self.fail_mode == "closed":
            return refused(self.rules, now, "limiter_unavailable",
                           "call limits cannot be checked right now; try again shortly", "closed")
        if self.fail_mode == "open":
            self.memory.record(key, region, charge_id, now, maybe_written=unknown)
            return Decision(True, self.rules.max_calls, self.rules.max_calls, now + self.rules.window_ms, source="open")
        times, admitted = self.memory.admit(key, region, charge_id, now, self.rules, maybe_written=unknown)
        return summarize(times, now, self.rules, admitted=admitted, source="memory")

    async def test(self, number: str | PhoneNumber) -> Decision:
        """The number's status without charging: would the next call be admitted, and when
        does the next slot free up."""
        started = time.perf_counter()
        phone = self._phone_or_refusal(number)
        if isinstance(phone, Decision):
            return self._done("test", phone, started)
        key = self._keyer.key(phone.e164)
        keys = [key, *self._keyer.previous(phone.e164)]
        try:
            row = await self._fetchrow(self._q.limiter_status, keys, self.rules.window_ms, self._clock())
        except LimiterUnavailable:
            now = self._local_now()
            if self.fail_mode == "closed":
                decision = refused(self.rules, now, "limiter_unavailable",
                                   "call limits cannot be checked right now; try again shortly", "closed")
            elif self.fail_mode == "open":
                decision = Decision(True, self.rules.max_calls, self.rules.max_calls,
                                    now + self.rules.window_ms, source="open")
            else:
                times = [t for t, _ in self.memory.live(key, now, self.rules.window_ms)]
                decision = summarize(times, now, self.rules, source="memory")
        else:
            # Charges this instance made while PostgreSQL was away count before they are written back.
            times = sorted([*row["times"], *(p.at_ms for _, p in self.memory.pending_for(key)
                                              if p.at_ms > row["now_ms"] - self.rules.window_ms)])
            decision = summarize(times, row["now_ms"], self.rules)
        return self._done("test", decision, started)

    async def refund(self, charge_id: str) -> bool:
        """Give back the slot taken by ``charge_id``. Idempotent; an unknown id changes nothing.

        Returns whether a live charge was removed. While PostgreSQL is away the refund is made
        in memory and written back when it returns.
        """
        started = time.perf_counter()
        self._check_charge_id(charge_id)
        deadline = _Deadline(self._timeout)
        try:
            async with self._writeback_lock(deadline):
                if charge_id in self.memory.pending or charge_id in self.memory.pending_refunds:
                    raise LimiterUnavailable("charge not written back yet", sent=False)
                removed = await self._refund_in_database(charge_id, deadline)
        except LimiterUnavailable:
            removed = self.memory.refund_while_away(charge_id)
        else:
            self.memory.drop(charge_id)
        self._observe("refund", None, time.perf_counter() - started)
        return removed

    async def _refund_in_database(self, charge_id: str, deadline: _Deadline) -> bool:
        row = await self._fetchrow(self._q.limiter_refund, charge_id, deadline=deadline)
        if row["key"] is None or row["removed"]:
            return bool(row["removed"])
        # The charge record was found but its log entry was not where the refund's snapshot
        # looked: a key rotation moved the row meanwhile, or the charge had already left the
        # window. Look again, in a fresh snapshot, under the key the record holds now.
        again = await self._fetchrow(self._q.limiter_refund_at, charge_id, row["key"], deadline=deadline)
        return again is not None

    # --- write-back, cleanup, admin --------------------------------------------------------

    @property
    def pending(self) -> int:
        """Charges and refunds made while PostgreSQL was away, not yet written back."""
        return len(self.memory.pending) + len(self.memory.pending_refunds)

    async def _write_back_charge(self, charge_id: str, deadline: _Deadline) -> None:
        charge = self.memory.pending.get(charge_id)
        if charge is None:
            return  # refunded meanwhile: never written
        await self._charge(charge.key, charge_id, self.rules, charge.region, deadline, at_ms=charge.at_ms, force=True)
        self.memory.pending.pop(charge_id, None)

    async def _write_back_key(self, key: bytes, deadline: _Deadline) -> None:
        """Before a decision on ``key``: write back that key's charges made while away, so they
        count. Only this key's: the rest is the maintenance task's, off the call path."""
        if not self.memory.pending or not self.memory.pending_for(key):
            return
        async with self._writeback_lock(deadline):
            for charge_id, _ in self.memory.pending_for(key):
                await self._write_back_charge(charge_id, deadline)

    async def flush(self) -> int:
        """Write back everything decided in memory. Returns how many were written; stops at
        the first failure (the rest stay pending). Safe to call at any time."""
        written = 0
        for charge_id in list(self.memory.pending):
            async with self._writeback_lock(_Deadline(self._timeout)):
                if charge_id in self.memory.pending:
                    await self._write_back_charge(charge_id, _Deadline(self._timeout))
                    written += 1
        for charge_id in list(self.memory.pending_refunds):
            async with self._writeback_lock(_Deadline(self._timeout)):
                if charge_id in self.memory.pending_refunds:
                    await self._refund_in_database(charge_id, _Deadline(self._timeout))
                    self.memory.pending_refunds.discard(charge_id)
                    written += 1
        if written:
            log.info("wrote back %d charge(s)/refund(s) decided while PostgreSQL was away", written)
        return written

    async def cleanup(self, batch: int = CLEANUP_BATCH) -> tuple[int, int]:
        """Delete rows whose window has passed and expired charge records, batch by batch.
        Returns (rows, charge records) deleted."""
        total_rows = total_charges = 0
        while True:
            row = await self._fetchrow(self._q.limiter_cleanup, self.rules.window_ms,
                                       self.rules.window_ms + CHARGE_RETENTION_MS, batch, self._clock(),
                                       BUDGET_RETENTION_MS)
            total_rows += row["rows"]
            total_charges += row["charges"]
            if row["rows"] < batch and row["charges"] < batch:
                break
        self.memory.prune(self._local_now(), self.rules.window_ms)
        return total_rows, total_charges

    async def maintain(self, interval: float = 1.0, cleanup_every: float = 300.0) -> None:
        """Background duty until cancelled: notice PostgreSQL's return and write back pending
        charges; delete expired rows every ``cleanup_every`` seconds."""
        next_cleanup = time.monotonic() + cleanup_every
        while True:
            await asyncio.sleep(interval)
            try:
                if self.pending or not self.database_ok:
                    if await self.check_database():
                        await self.flush()
                if time.monotonic() >= next_cleanup and self.database_ok:
                    rows, charges = await self.cleanup()
                    next_cleanup = time.monotonic() + cleanup_every
                    if rows or charges:
                        log.info("cleanup deleted %d expired row(s), %d charge record(s)", rows, charges)
            except LimiterUnavailable:
                continue
            except LimiterError:
                log.exception("limiter maintenance failed; retrying in %.0f s", interval)

    async def reset(self, number: str | PhoneNumber) -> int:
        """Forget a number's charges (admin). Returns how many rows were deleted."""
        phone = number if isinstance(number, PhoneNumber) else self.parse(number)
        keys = [self._keyer.key(phone.e164), *self._keyer.previous(phone.e164)]
        row = await self._fetchrow(self._q.limiter_reset, keys)
        for key in keys:
            self.memory.forget(key)
        return row["rows"]

    async def stats(self) -> dict[str, Any]:
        """Counts for operators: rows kept, calls in window, numbers at their limit, by region."""
        rows = await self._run(lambda conn: conn.fetch(self._q.admin_stats, self.rules.max_calls,
                                                       self.rules.window_ms, self._clock()),
                               _Deadline(self._timeout))
        by_region = {r["region"] or "unknown": {"rows": r["rows"], "callsInWindow": r["calls_in_window"],
                                                 "numbersAtLimit": r["numbers_at_limit"]} for r in rows}
        return {
            "rows": sum(r["rows"] for r in rows),
            "callsInWindow": sum(r["calls_in_window"] for r in rows),
            "numbersAtLimit": sum(r["numbers_at_limit"] for r in rows),
            "byRegion": by_region,
            "limit": self.rules.max_calls,
            "windowMs": self.rules.window_ms,
            "pending": self.pending,
            "database": "ok" if self.database_ok else "unavailable",
        }

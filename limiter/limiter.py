"""The per-phone-number limiter: hit (charge), test (read), refund, cleanup.

A decision is one statement (``sql/limiter_hit.sql``) through one pooled connection, on the
database's clock. Every database call is bounded (``LIMITER_TIMEOUT_MS`` covers the pool
acquire and the statement); when PostgreSQL is away the fail mode decides, and asyncpg's
errors never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from db.sql import Queries
from limiter.errors import InvalidNumber, LimiterUnavailable
from limiter.memory import MemoryLog
from limiter.phone import PhoneKeyer, PhoneNumber, parse
from limiter.rules import Decision, Rules, refused, summarize

log = logging.getLogger("callgate.limiter")

FAIL_MODES = ("memory", "closed", "open")
CLEANUP_BATCH = 1000
# Charge ids stay idempotent this long after their window (a webhook replayed the next day
# still charges nothing).
CHARGE_RETENTION_MS = 24 * 3600 * 1000

# What "PostgreSQL is away" looks like from asyncpg: server errors (shutdown, statement or
# lock timeouts, too many connections), a broken or closed connection, the socket, a timeout.
_UNAVAILABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Regions:
    default: str
    allowed: frozenset[str]


class Limiter:
    """Per-number call limits over one asyncpg pool.

    ``clock`` returns the epoch ms to decide at, or None (the default) for the database's own
    clock; tests pass a fixed clock to move time without sleeping.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Queries,
        keyer: PhoneKeyer,
        rules: Rules,
        regions: Regions,
        *,
        fail_mode: str = "memory",
        timeout: float = 2.0,
        clock: Callable[[], int | None] = lambda: None,
        observe: Callable[[str, Decision | None, float], None] | None = None,
    ) -> None:
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, not {fail_mode!r}")
        queries.require("limiter_hit", "limiter_status", "limiter_refund", "limiter_refund_at",
                        "limiter_rekey", "limiter_cleanup", "limiter_reset", "admin_stats")
        self._pool = pool
        self._q = queries
        self._keyer = keyer
        self.rules = rules
        self.regions = regions
        self.fail_mode = fail_mode
        self._timeout = timeout
        self._clock = clock
        self._observe = observe or (lambda op, decision, seconds: None)
        self.memory = MemoryLog()
        self.database_ok = True
        self._flush_lock = asyncio.Lock()

    # --- numbers ---------------------------------------------------------------------------

    def parse(self, raw: object) -> PhoneNumber:
        """Normalise a number or raise InvalidNumber (reason code + message)."""
        return parse(raw, default_region=self.regions.default, allowed_regions=self.regions.allowed)

    def _local_now(self) -> int:
        fixed = self._clock()
        return fixed if fixed is not None else int(time.time() * 1000)

    def _refuse_invalid(self, exc: InvalidNumber) -> Decision:
        return refused(self.rules, self._local_now(), exc.code, exc.message, "validation")

    # --- the database edge -----------------------------------------------------------------

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record:
        """One statement, bounded in time; asyncpg's failures become LimiterUnavailable."""
        return await self._run(query, args, many=False)

    async def _run(self, query: str, args: tuple, *, many: bool) -> Any:
        conn = None
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._pool.acquire()
                result = await (conn.fetch(query, *args) if many else conn.fetchrow(query, *args))
        except _UNAVAILABLE as exc:
            if conn is not None:
                # Its state is unknown (a query may still run on it): never lend it again.
                # Releasing a live one would wait for its reset, unbounded on a stalled server.
                # (A connection the server dropped is already back in the pool: nothing to do.)
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
            if self.database_ok:
                log.warning("PostgreSQL unavailable (%s: %s); fail mode %s",
                            type(exc).__name__, str(exc)[:200] or "timeout", self.fail_mode)
            self.database_ok = False
            raise LimiterUnavailable(f"{type(exc).__name__}: {exc}", sent=conn is not None) from exc
        finally:
            if conn is not None:
                with contextlib.suppress(asyncpg.InterfaceError):  # released already (see above)
                    await self._pool.release(conn)
        if not self.database_ok:
            log.info("PostgreSQL is back")
            self.database_ok = True
        return result

    async def check_database(self) -> bool:
        """Ask PostgreSQL for a trivial answer; updates and returns ``database_ok``."""
        try:
            await self._fetchrow("SELECT 1")
        except LimiterUnavailable:
            return False
        return True

    # --- hit / test / refund ---------------------------------------------------------------

    async def hit(self, number: str | PhoneNumber, charge_id: str) -> Decision:
        """Charge one call to ``number`` under ``charge_id`` (a CallSid or a reservation id).

        Idempotent per charge id: a second hit with the same id charges nothing and answers
        allowed. An invalid number is refused with its reason and never charged.
        """
        started = time.perf_counter()
        try:
            phone = number if isinstance(number, PhoneNumber) else self.parse(number)
        except InvalidNumber as exc:
            decision = self._refuse_invalid(exc)
            self._observe("hit", decision, time.perf_counter() - started)
            return decision
        key = self._keyer.key(phone.e164)
        try:
            if self.pending:
                # Charges made while PostgreSQL was away must count before the next decision.
                await self.flush()
            if self._keyer.rotating:
                await self._fetchrow(self._q.limiter_rekey, key, self._keyer.previous(phone.e164))
            row = await self._fetchrow(
                self._q.limiter_hit, key, charge_id, self.rules.max_calls, self.rules.window_ms,
                self.rules.cooldown_ms, self._clock(), None, False, phone.region,
            )
        except LimiterUnavailable as exc:
            decision = self._hit_while_away(key, phone.region, charge_id, unknown=exc.sent)
        else:
            self.memory.mirror(key, row["times"], row["charges"])
            decision = summarize(row["times"], row["now_ms"], self.rules, admitted=row["admitted"])
        self._observe("hit", decision, time.perf_counter() - started)
        if not decision.allowed:
            log.info("refused %s (key %s): %s", phone.masked, PhoneKeyer.short(key), decision.reason)
        return decision

    def _hit_while_away(self, key: bytes, region: str, charge_id: str, *, unknown: bool) -> Decision:
        # A statement that was sent may have committed (a "ghost write"): it stays counted and
        # is never retried blindly. Charges decided here are written back by charge id, which
        # the database treats idempotently, so a ghost write is not counted twice.
        if unknown:
            log.warning("charge %s: outcome unknown (statement sent, no answer); counted as charged", charge_id)
        now = self._local_now()
        if self.fail_mode == "closed":
            return refused(self.rules, now, "limiter_unavailable",
                           "call limits cannot be checked right now; try again shortly", "closed")
        if self.fail_mode == "open":
            self.memory.record(key, region, charge_id, now)
            return Decision(True, self.rules.max_calls, self.rules.max_calls, now + self.rules.window_ms, source="open")
        times, admitted = self.memory.admit(key, region, charge_id, now, self.rules)
        return summarize(times, now, self.rules, admitted=admitted, source="memory")

    async def test(self, number: str | PhoneNumber) -> Decision:
        """The number's status without charging: would the next call be admitted, and when
        does the next slot free up."""
        started = time.perf_counter()
        try:
            phone = number if isinstance(number, PhoneNumber) else self.parse(number)
        except InvalidNumber as exc:
            return self._refuse_invalid(exc)
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
            decision = summarize(row["times"], row["now_ms"], self.rules)
        self._observe("test", decision, time.perf_counter() - started)
        return decision

    async def refund(self, charge_id: str) -> bool:
        """Give back the slot taken by ``charge_id``. Idempotent; an unknown id changes nothing.

        Returns whether a live charge was removed. While PostgreSQL is away the refund is made
        in memory and written back when it returns.
        """
        started = time.perf_counter()
        try:
            removed = await self._refund_in_database(charge_id)
        except LimiterUnavailable:
            removed = self.memory.refund(charge_id)
        else:
            self.memory.refund(charge_id)
            self.memory.pending_refunds.discard(charge_id)
        self._observe("refund", None, time.perf_counter() - started)
        return removed

    async def _refund_in_database(self, charge_id: str) -> bool:
        row = await self._fetchrow(self._q.limiter_refund, charge_id)
        if row["key"] is None or row["removed"]:
            return bool(row["removed"])
        # The charge record was found but its log row was not: a key rotation moved the row
        # while this refund ran. Look again, in a fresh snapshot, under the key we now know.
        again = await self._fetchrow(self._q.limiter_refund_at, charge_id, row["key"])
        return again is not None

    # --- recovery, cleanup, admin ----------------------------------------------------------

    @property
    def pending(self) -> int:
        """Charges and refunds made while PostgreSQL was away, not yet written back."""
        return len(self.memory.pending) + len(self.memory.pending_refunds)

    async def flush(self) -> int:
        """Write back what was decided in memory. Returns how many were written; stops at
        the first failure (the rest stay pending). Safe to call at any time."""
        written = 0
        async with self._flush_lock:
            for charge_id, charge in list(self.memory.pending.items()):
                await self._fetchrow(
                    self._q.limiter_hit, charge.key, charge_id, self.rules.max_calls,
                    self.rules.window_ms, self.rules.cooldown_ms, self._clock(), charge.at_ms, True,
                    charge.region,
                )
                del self.memory.pending[charge_id]
                written += 1
            for charge_id in list(self.memory.pending_refunds):
                await self._refund_in_database(charge_id)
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
                                       self.rules.window_ms + CHARGE_RETENTION_MS, batch, self._clock())
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
        rows = await self._run(self._q.admin_stats, (self.rules.max_calls, self.rules.window_ms, self._clock()),
                               many=True)
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

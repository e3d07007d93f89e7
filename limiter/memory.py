"""The limiter's rule kept in process, for while PostgreSQL is away (LIMITER_FAIL_MODE=memory).

Every answer from PostgreSQL is mirrored here, so when the database goes away this instance
still knows the recent charges it saw. Charges and refunds made while it is away are kept as
pending and written back when it returns (idempotently: a charge id is charged once).
Only the event loop touches this object, and no method awaits, so each call is atomic.
"""

from __future__ import annotations

from dataclasses import dataclass

from limiter.rules import Rules

# Bound on numbers remembered: past it the least recently used are forgotten (they still
# count in PostgreSQL; only the outage view of this instance gets coarser).
MAX_KEYS = 100_000


@dataclass(frozen=True)
class PendingCharge:
    key: bytes
    region: str
    at_ms: int


class MemoryLog:
    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._logs: dict[bytes, list[tuple[int, str]]] = {}
        self._max_keys = max_keys
        self.pending: dict[str, PendingCharge] = {}
        self.pending_refunds: set[str] = set()

    def _touch(self, key: bytes, entries: list[tuple[int, str]]) -> None:
        self._logs.pop(key, None)
        self._logs[key] = entries
        while len(self._logs) > self._max_keys:
            del self._logs[next(iter(self._logs))]

    def live(self, key: bytes, now_ms: int, window_ms: int) -> list[tuple[int, str]]:
        return [e for e in self._logs.get(key, ()) if e[0] > now_ms - window_ms]

    def mirror(self, key: bytes, times: list[int], charges: list[str]) -> None:
        """Remember the live log PostgreSQL just returned for a key."""
        self._touch(key, list(zip(times, charges)))

    def admit(self, key: bytes, region: str, charge_id: str, now_ms: int, rules: Rules) -> tuple[list[int], bool]:
        """The sliding-log rule; an admitted charge is kept as pending. Returns (live times, admitted)."""
        entries = self.live(key, now_ms, rules.window_ms)
        if any(c == charge_id for _, c in entries):
            return [t for t, _ in entries], True
        room = len(entries) < rules.max_calls
        cooled = not rules.cooldown_ms or not entries or now_ms - entries[-1][0] >= rules.cooldown_ms
        admitted = room and cooled
        if admitted:
            entries.append((now_ms, charge_id))
            self.pending[charge_id] = PendingCharge(key, region, now_ms)
        self._touch(key, entries)
        return [t for t, _ in entries], admitted

    def record(self, key: bytes, region: str, charge_id: str, now_ms: int) -> None:
        """Count a charge whatever the rule says (fail mode open: the call goes ahead)."""
        entries = self._logs.get(key, [])
        if all(c != charge_id for _, c in entries):
            entries.append((now_ms, charge_id))
            self.pending[charge_id] = PendingCharge(key, region, now_ms)
        self._touch(key, entries)

    def refund(self, charge_id: str) -> bool:
        """Drop a charge from memory. A charge PostgreSQL holds is queued for refund there."""
        removed = False
        for key, entries in self._logs.items():
            kept = [e for e in entries if e[1] != charge_id]
            if len(kept) != len(entries):
                self._logs[key] = kept
                removed = True
                break
        if self.pending.pop(charge_id, None) is None:
            self.pending_refunds.add(charge_id)
        return removed

    def forget(self, key: bytes) -> None:
        self._logs.pop(key, None)

    def prune(self, now_ms: int, window_ms: int) -> None:
        for key in [k for k, entries in self._logs.items() if not entries or entries[-1][0] <= now_ms - window_ms]:
            del self._logs[key]

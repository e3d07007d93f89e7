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
    # The statement that tried to charge it may have reached PostgreSQL and committed (a
    # "ghost write"): a refund must then be written back too, not only dropped here.
    maybe_written: bool = False


class MemoryLog:
    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._logs: dict[bytes, list[tuple[int, str]]] = {}
        self._key_of: dict[str, bytes] = {}  # charge id → key, so a refund finds its log at once
        self._max_keys = max_keys
        self.pending: dict[str, PendingCharge] = {}
        self.pending_refunds: set[str] = set()

    def _store(self, key: bytes, entries: list[tuple[int, str]]) -> None:
        old = self._logs.pop(key, None)
        if old:
            for _, charge_id in old:
                self._key_of.pop(charge_id, None)
        self._logs[key] = entries
        for _, charge_id in entries:
            self._key_of[charge_id] = key
        while len(self._logs) > self._max_keys:
            self.forget(next(iter(self._logs)))

    def live(self, key: bytes, now_ms: int, window_ms: int) -> list[tuple[int, str]]:
        return [e for e in self._logs.get(key, ()) if e[0] > now_ms - window_ms]

    def mirror(self, key: bytes, times: list[int], charges: list[str]) -> None:
        """Remember the live log PostgreSQL just returned for a key (plus what is still pending
        for it, which PostgreSQL does not hold yet)."""
        entries = list(zip(times, charges))
        known = set(charges)
        entries += [(p.at_ms, c) for c, p in self.pending.items() if p.key == key and c not in known]
        entries.sort()
        self._store(key, entries)

    def admit(self, key: bytes, region: str, charge_id: str, now_ms: int, rules: Rules,
              *, maybe_written: bool = False, write_back: bool = True) -> tuple[list[int], bool]:
        """The sliding-log rule; an admitted charge is kept as pending (to be written back to
        PostgreSQL, unless ``write_back`` is False). Returns (live times, admitted)."""
        entries = self.live(key, now_ms, rules.window_ms)
        if any(c == charge_id for _, c in entries):
            return [t for t, _ in entries], True
        room = len(entries) < rules.max_calls
        cooled = not rules.cooldown_ms or not entries or now_ms - entries[-1][0] >= rules.cooldown_ms
        admitted = room and cooled
        if admitted:
            entries.append((now_ms, charge_id))
            entries.sort()  # the mirrored times are the database's clock, ours may lag it
            if write_back:
                self.pending[charge_id] = PendingCharge(key, region, now_ms, maybe_written)
        self._store(key, entries)
        return [t for t, _ in entries], admitted

    def record(self, key: bytes, region: str, charge_id: str, now_ms: int, *, maybe_written: bool = False) -> None:
        """Count a charge whatever the rule says (fail mode open: the call goes ahead)."""
        entries = list(self._logs.get(key, []))
        if all(c != charge_id for _, c in entries):
            entries.append((now_ms, charge_id))
            entries.sort()
            self.pending[charge_id] = PendingCharge(key, region, now_ms, maybe_written)
        self._store(key, entries)

    def drop(self, charge_id: str) -> bool:
        """Take a charge out of the mirrored log; True when it was there."""
        key = self._key_of.pop(charge_id, None)
        if key is None:
            return False
        self._logs[key] = [e for e in self._logs.get(key, []) if e[1] != charge_id]
        return True

    def refund_while_away(self, charge_id: str) -> bool:
        """A refund while PostgreSQL is away: free the slot here, and queue the refund for
        PostgreSQL unless the charge certainly never reached it. Returns whether a live
        charge was freed."""
        removed = self.drop(charge_id)
        pending = self.pending.pop(charge_id, None)
        if pending is None or pending.maybe_written:
            self.pending_refunds.add(charge_id)
        return removed or pending is not None

    def pending_for(self, key: bytes) -> list[tuple[str, PendingCharge]]:
        return [(c, p) for c, p in self.pending.items() if p.key == key]

    def forget(self, key: bytes) -> None:
        for _, charge_id in self._logs.pop(key, ()):
            self._key_of.pop(charge_id, None)

    def prune(self, now_ms: int, window_ms: int) -> None:
        stale = [k for k, entries in self._logs.items()
                 if (not entries or entries[-1][0] <= now_ms - window_ms)
                 and not any(p.key == k for p in self.pending.values())]
        for key in stale:
            self.forget(key)

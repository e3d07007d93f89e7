"""Token buckets by key, for what a client can do at will: open sockets (per address and
second), guess an admin token, send media frames. Each bucket holds ``burst`` tokens and
refills at ``rate`` a second; ``take`` spends one, or says no. Keys are bounded: past
``max_keys`` the fullest buckets (the quietest keys) are forgotten, which only ever helps them.
"""

from __future__ import annotations

import time


class Buckets:
    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self._max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when)

    def take(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self._max_keys:
            self._forget_quiet(now)
        return True

    def allows(self, key: str, now: float | None = None) -> bool:
        """Whether ``take`` would succeed now (nothing is spent)."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key, (self.burst, now))
        return tokens + (now - at) * self.rate >= 1

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_quiet(self, now: float) -> None:
        """Forget every key whose bucket has refilled: as good as new, so nothing is lost."""
        for key in [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]:
            del self._buckets[key]


class Bucket:
    """One token bucket (one call's media frames): no key, nothing to forget."""

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, time.monotonic() if now is None else now

    def take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

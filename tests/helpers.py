"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

from config import Settings
from db.sql import Queries
from limiter.limiter import Limiter, Regions
from limiter.phone import PhoneKeyer
from limiter.rules import Rules


class Clock:
    """A settable clock in epoch ms, passed to the limiter (and so to its SQL) as "now"."""

    def __init__(self, now_ms: int = 1_800_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


TEST_KEY = "test-phone-key-0123456789abcdef0123456789"


def make_limiter(pool, *, max_calls: int = 2, window_ms: int = 3_600_000, cooldown_ms: int = 0,
                 key: str = TEST_KEY, previous: tuple[str, ...] = (), fail_mode: str = "memory",
                 clock=None, timeout: float = 2.0, regions=("US", "AU", "IN")) -> Limiter:
    return Limiter(
        pool, Queries.load(), PhoneKeyer(key, previous), Rules(max_calls, window_ms, cooldown_ms),
        Regions("US", frozenset(regions)), fail_mode=fail_mode, timeout=timeout,
        **({"clock": clock} if clock else {}),
    )


def settings_for(dsn: str, **changes) -> Settings:
    env = {"DATABASE_URL": dsn, "PHONE_ENCRYPTION_KEY": TEST_KEY, "PORT": "0"}
    env.update(changes)
    return Settings.from_env(env)

"""The sliding-log rule's arithmetic on a live log, shared by the database and memory paths.

The admission itself is decided in SQL (``sql/migrations/001_limiter.sql``) or by
``MemoryLog``; this module turns the live log that comes back into the answer people see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Rules:
    max_calls: int
    window_ms: int
    cooldown_ms: int = 0


@dataclass(frozen=True)
class Decision:
    """One limiter answer.

    ``reset_time`` is the epoch ms of the next free slot: when the oldest live charge leaves the
    window (now + window when nothing is used), or when a refused number may call again.
    ``source`` says who decided: ``database``, or while PostgreSQL is away ``memory``,
    ``open`` or ``closed`` (LIMITER_FAIL_MODE).
    """

    allowed: bool
    remaining: int
    limit: int
    reset_time: int
    reason: str | None = None
    message: str | None = None
    source: str = "database"


def summarize(
    times: Sequence[int], now_ms: int, rules: Rules, *, admitted: bool | None = None, source: str = "database"
) -> Decision:
    """The answer for a live log (ascending epoch ms, all inside the window at ``now_ms``).

    ``admitted`` is the outcome of a charge that produced this log; None for a status read,
    where "allowed" means the next charge would be admitted.
    """
    used = len(times)
    remaining = max(rules.max_calls - used, 0)
    full_until = times[used - rules.max_calls] + rules.window_ms if used >= rules.max_calls else 0
    cooling_until = times[-1] + rules.cooldown_ms if rules.cooldown_ms and times else 0
    if admitted is None:
        admitted = now_ms >= full_until and now_ms >= cooling_until
    if admitted:
        reset = times[0] + rules.window_ms if times else now_ms + rules.window_ms
        return Decision(True, remaining, rules.max_calls, reset, source=source)
    if full_until > now_ms:
        wait = max(full_until, cooling_until)
        return Decision(
            False, remaining, rules.max_calls, wait, "limit_reached",
            f"this number has had {rules.max_calls} call(s) in the last {_duration(rules.window_ms)}",
            source,
        )
    return Decision(
        False, remaining, rules.max_calls, cooling_until, "cooldown",
        f"calls to one number must be at least {_duration(rules.cooldown_ms)} apart",
        source,
    )


def refused(rules: Rules, now_ms: int, reason: str, message: str, source: str) -> Decision:
    """A refusal that is not about the log (an invalid number, the limiter being away)."""
    return Decision(False, 0, rules.max_calls, now_ms, reason, message, source)


def _duration(ms: int) -> str:
    seconds = ms // 1000
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"

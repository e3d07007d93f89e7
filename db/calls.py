"""Call records, call requests and stream-token use, in PostgreSQL (``sql/calls_*.sql``,
``sql/call_requests_*.sql``, ``sql/stream_token_use.sql``).

Every statement is bounded in time (``DATABASE_TIMEOUT``). What each method does when
PostgreSQL is away is decided here, once, so no caller has to, and a live call never goes
down with the database:

=================  ============================================================================
method             when PostgreSQL is away
=================  ============================================================================
``admit``          admitted: the per-number limit still held (the global cap is not checked)
``record``         nothing recorded: the call's status callbacks still refund, by the charge
                   id their signed URL names
``put_request``    False: nothing was stored, so the caller must not place the call
``get_request``    None: the call runs its scenario's defaults
``set_status``     True: followers hear of the change (the bus keeps statuses moving forward)
``set_end_reason`` True, likewise
``claim_refund``   the ``fallback`` charge id: the limiter refunds idempotently (and writes
                   back later), so refunding without the record cannot refund twice
``get``            None: the call is unknown here
``spend_token``    single use on this instance only, until the token expires (minutes)
``cleanup``        0: the next run deletes what this one could not
=================  ============================================================================

Each fallback logs one warning naming the call and what was not done. Any other database
error is a bug and is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from db.bounded import DatabaseAway, DatabaseGate
from db.sql import Queries

log = logging.getLogger("callgate.calls")

CALL_RETENTION_DAYS = 30

# The advisory lock every instance takes to admit a call under the global cap ("CGADMIT").
ADMISSION_LOCK = 0x4347_4144_4D49_54

T = TypeVar("T")
AWAY: Any = object()  # what a statement "returned" when PostgreSQL was away (see _fetchrow)


class CallStore:
    def __init__(self, gate: DatabaseGate, queries: Queries, timeout: float) -> None:
        self._gate = gate
        self._q = queries
        self._timeout = timeout
        # Stream tokens spent while PostgreSQL was away, with their expiry (see spend_token).
        self._spent_here: dict[str, float] = {}

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]], when_away: T, what: str) -> T:
        """``work`` on a pooled connection, bounded; ``when_away`` (logged) if PostgreSQL is away."""
        try:
            return await self._gate.run(work, self._timeout)
        except DatabaseAway as exc:
            log.warning("%s: not done, the database is unavailable (%s)", what, exc)
            return when_away

    async def _fetchrow(self, query: str, *args: Any, what: str) -> Any:
        """The row (or None), or AWAY (logged, with ``what``) when PostgreSQL is away."""
        return await self._run(lambda conn: conn.fetchrow(query, *args), AWAY, what)

    async def admit(self, call_sid: str, charge_id: str | None, direction: str, region: str,
                    scenario_id: str | None, *, max_live: int, stale_after_s: float) -> bool:
        """Record a call if fewer than ``max_live`` calls are live across every instance.
        A call recorded before (a retried webhook) is admitted again."""
        async def admit(conn: asyncpg.Connection) -> bool:
            async with conn.transaction():
                await conn.execute(self._q.calls_admit_lock, ADMISSION_LOCK)
                row = await conn.fetchrow(self._q.calls_admit, call_sid, charge_id, direction, region,
                                          scenario_id, max_live, stale_after_s)
                return bool(row["admitted"])

        return await self._run(admit, True, f"call {call_sid}: admission under the cap (admitted)")

    async def record(self, call_sid: str, charge_id: str, direction: str, region: str, scenario_id: str) -> None:
        """Record a call we placed, before Twilio reports on it."""
        await self._fetchrow(self._q.calls_record, call_sid, charge_id, direction, region, scenario_id,
                             what=f"call {call_sid}: record")

    async def put_request(self, request_id: str, scenario_id: str, config_json: str, voice: str) -> bool:
        """Remember what a call is for, until its webhook or its stream asks; False if not stored."""
        stored = await self._fetchrow(self._q.call_requests_put, request_id, scenario_id, config_json, voice,
                                      what=f"call request {request_id}: store")
        return stored is not AWAY

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        row = await self._fetchrow(self._q.call_requests_get, request_id,
                                   what=f"call request {request_id}: read (the scenario's defaults are used)")
        return None if row is AWAY or row is None else dict(row)

    async def set_status(self, call_sid: str, status: str, rank: int, *, final_rank: int,
                         reason: str | None = None, charge_id: str | None = None) -> bool:
        """Move a call forward to ``status`` (of ``rank``; ``final_rank`` and above end it);
        False when it was already there or further on."""
        row = await self._fetchrow(self._q.calls_status, call_sid, status, rank, reason, charge_id, final_rank,
                                   what=f"call {call_sid}: status {status}")
        return row is not None

    async def set_end_reason(self, call_sid: str, reason: str) -> bool:
        """Fill in why a call ended if nothing said so yet; True when it was filled in."""
        row = await self._fetchrow(self._q.calls_end_reason, call_sid, reason, what=f"call {call_sid}: end reason")
        return row is not None

    async def claim_refund(self, call_sid: str, fallback: str) -> str | None:
        """The call's charge id, the first time only (so exactly one refund is made); while
        PostgreSQL is away, ``fallback`` (the charge the request names)."""
        row = await self._fetchrow(self._q.calls_mark_refunded, call_sid,
                                   what=f"call {call_sid}: refund bookkeeping (refunding {fallback})")
        if row is AWAY:
            return fallback
        return row["charge_id"] if row else None

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        row = await self._fetchrow(self._q.calls_get, call_sid, what=f"call {call_sid}: read")
        return None if row is AWAY or row is None else dict(row)

    async def spend_token(self, jti: str, expires: float) -> bool:
        """True the first time a stream token is used, on any instance (while PostgreSQL is
        away: on this instance; the token expires within minutes anyway)."""
        row = await self._fetchrow(self._q.stream_token_use, jti, what="stream token: single use on this instance only")
        if row is not AWAY:
            return bool(row["first"])
        now = time.time()
        for old in [j for j, until in self._spent_here.items() if until < now]:
            del self._spent_here[old]
        if jti in self._spent_here:
            return False
        self._spent_here[jti] = expires
        return True

    async def cleanup(self, retention_days: int = CALL_RETENTION_DAYS, batch: int = 1000) -> int:
        """Delete spent tokens, stale call requests and old call records; returns how many."""
        total = 0
        while True:
            row = await self._fetchrow(self._q.calls_cleanup, retention_days, batch, what="calls cleanup")
            if row is AWAY:
                return total
            total += row["tokens"] + row["requests"] + row["calls"]
            if max(row["tokens"], row["requests"], row["calls"]) < batch:
                return total

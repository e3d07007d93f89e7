"""Call records and stream-token use, in PostgreSQL (``sql/calls_*.sql``, ``sql/stream_token_use.sql``).

Every statement is bounded in time; an outage leaves as ``CallStoreUnavailable``, so a database
that goes away never takes a live call down with it (anything else is a bug and is raised).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from db.bounded import DatabaseAway, run_bounded
from db.sql import Queries

CALL_RETENTION_DAYS = 30

# The advisory lock every instance takes to admit a call under the global cap ("CGADMIT").
ADMISSION_LOCK = 0x4347_4144_4D49_54


class CallStoreUnavailable(Exception):
    """PostgreSQL did not answer in time or could not be reached."""


class CallStore:
    def __init__(self, pool: asyncpg.Pool, queries: Queries, timeout: float = 2.0) -> None:
        self._pool = pool
        self._q = queries
        self._timeout = timeout

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self._with_connection(lambda conn: conn.fetchrow(query, *args))

    async def _with_connection(self, work) -> Any:
        try:
            return await run_bounded(self._pool, work, self._timeout)
        except DatabaseAway as exc:
            raise CallStoreUnavailable(str(exc)) from exc

    async def admit(self, call_sid: str, charge_id: str | None, direction: str, region: str,
                    scenario_id: str | None, *, max_live: int, stale_after_s: float) -> tuple[bool, bool]:
        """Record a call if fewer than ``max_live`` calls are live across every instance.
        Returns (admitted, created); a call recorded before is admitted again (not created)."""
        async def admit(conn: asyncpg.Connection) -> asyncpg.Record:
            async with conn.transaction():
                await conn.execute(self._q.calls_admit_lock, ADMISSION_LOCK)
                return await conn.fetchrow(self._q.calls_admit, call_sid, charge_id, direction, region,
                                           scenario_id, max_live, stale_after_s)

        row = await self._with_connection(admit)
        return bool(row["admitted"]), bool(row["created"])

    async def record(self, call_sid: str, charge_id: str, direction: str, region: str, scenario_id: str) -> None:
        """Record a call we placed, before Twilio reports on it."""
        await self._fetchrow(self._q.calls_record, call_sid, charge_id, direction, region, scenario_id)

    async def put_request(self, reservation_id: str, scenario_id: str, config_json: str, voice: str) -> None:
        """Remember what an outbound call is for, until its webhook asks."""
        await self._fetchrow(self._q.call_requests_put, reservation_id, scenario_id, config_json, voice)

    async def get_request(self, reservation_id: str) -> dict[str, Any] | None:
        row = await self._fetchrow(self._q.call_requests_get, reservation_id)
        return dict(row) if row else None

    async def set_status(self, call_sid: str, status: str, rank: int, reason: str | None = None,
                         charge_id: str | None = None) -> bool:
        """Move a call forward to ``status``; False when it was already there or further on."""
        return await self._fetchrow(self._q.calls_status, call_sid, status, rank, reason, charge_id) is not None

    async def set_end_reason(self, call_sid: str, reason: str) -> bool:
        """Fill in why a call ended if nothing said so yet; True when it was filled in."""
        return await self._fetchrow(self._q.calls_end_reason, call_sid, reason) is not None

    async def cleanup(self, retention_days: int = CALL_RETENTION_DAYS, batch: int = 1000) -> int:
        """Delete spent tokens, stale call requests and old call records; returns how many."""
        total = 0
        while True:
            row = await self._fetchrow(self._q.calls_cleanup, retention_days, batch)
            total += row["tokens"] + row["requests"] + row["calls"]
            if max(row["tokens"], row["requests"], row["calls"]) < batch:
                return total

    async def claim_refund(self, call_sid: str) -> str | None:
        """The call's charge id, the first time only (so exactly one refund is made)."""
        row = await self._fetchrow(self._q.calls_mark_refunded, call_sid)
        return row["charge_id"] if row else None

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        row = await self._fetchrow(self._q.calls_get, call_sid)
        return dict(row) if row else None

    async def spend_token(self, jti: str) -> bool:
        """True the first time a stream token is used, on any instance."""
        row = await self._fetchrow(self._q.stream_token_use, jti)
        return bool(row["first"])

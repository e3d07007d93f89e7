"""Call records and stream-token use, in PostgreSQL (``sql/calls_*.sql``, ``sql/stream_token_use.sql``).

Every statement is bounded in time; an outage leaves as ``CallStoreUnavailable``, so a database
that goes away never takes a live call down with it (anything else is a bug and is raised).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from db.errors import AWAY
from db.sql import Queries



class CallStoreUnavailable(Exception):
    """PostgreSQL did not answer in time or could not be reached."""


class CallStore:
    def __init__(self, pool: asyncpg.Pool, queries: Queries, timeout: float = 2.0) -> None:
        queries.require("calls_upsert", "calls_status", "calls_mark_refunded", "calls_get", "stream_token_use")
        self._pool = pool
        self._q = queries
        self._timeout = timeout

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._pool.fetchrow(query, *args)
        except AWAY as exc:
            raise CallStoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def record(self, call_sid: str, charge_id: str | None, direction: str, region: str,
                     scenario_id: str | None) -> bool:
        """Record an admitted call; False when it was recorded already (a retried webhook)."""
        row = await self._fetchrow(self._q.calls_upsert, call_sid, charge_id, direction, region, scenario_id)
        return bool(row["created"])

    async def set_status(self, call_sid: str, status: str, rank: int, reason: str | None = None) -> bool:
        """Move a call forward to ``status``; False when it was already there or further on."""
        return await self._fetchrow(self._q.calls_status, call_sid, status, rank, reason) is not None

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

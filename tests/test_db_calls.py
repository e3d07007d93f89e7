"""db/calls.py: the call store, and what each of its methods does while PostgreSQL is away
(the table in its docstring), against a real PostgreSQL behind a proxy that cuts it off."""

from __future__ import annotations

import logging
import time

import pytest

from db.calls import CallStore
from db.database import create_pool
from db.sql import Queries
from helpers import gate_for, proxied


@pytest.fixture
async def store_and_proxy(dsn):
    async with proxied(dsn) as proxy:
        pool = await create_pool(proxy.dsn, 2, client_timeout_ms=300)
        try:
            yield CallStore(gate_for(pool), Queries.load(), timeout=0.3), proxy
        finally:
            pool.terminate()


async def test_every_method_answers_as_documented_while_the_database_is_away(store_and_proxy, caplog):
    """With PostgreSQL cut off, each method returns its documented fallback within its bound,
    and says in the log what was not done; none raises."""
    store, proxy = store_and_proxy
    proxy.cut()
    caplog.set_level(logging.WARNING, logger="callgate.calls")
    started = time.monotonic()
    answers = {
        "admit": await store.admit("CA1", "CA1", "inbound", "US", "job-interview", max_live=1, stale_after_s=60),
        "record": await store.record("CA1", "RS1", "outbound-api", "US", "job-interview"),
        "put_request": await store.put_request("RS1", "job-interview", "{}", "marin"),
        "get_request": await store.get_request("RS1"),
        "set_status": await store.set_status("CA1", "ringing", 10, final_rank=100),
        "set_end_reason": await store.set_end_reason("CA1", "caller_hangup"),
        "claim_refund": await store.claim_refund("CA1", fallback="RS1"),
        "get": await store.get("CA1"),
        "cleanup": await store.cleanup(),
    }
    elapsed = time.monotonic() - started
    assert answers == {"admit": True, "record": None, "put_request": False, "get_request": None,
                       "set_status": True, "set_end_reason": True, "claim_refund": "RS1", "get": None,
                       "cleanup": 0}
    assert elapsed < 9 * 1.0  # each bounded by its timeout (0.3 s), with room for a slow machine
    assert len([r for r in caplog.records if "database is unavailable" in r.getMessage()]) == 9


async def test_a_stream_token_is_single_use_on_this_instance_while_away(store_and_proxy):
    """While PostgreSQL is away a token can still be spent once (on this instance), not twice."""
    store, proxy = store_and_proxy
    proxy.cut()
    expires = time.time() + 60
    assert await store.spend_token("jti-1", expires) is True
    assert await store.spend_token("jti-1", expires) is False
    assert await store.spend_token("jti-2", expires) is True


async def test_with_the_database_there_records_and_refunds_happen_once(store_and_proxy):
    """The same calls with PostgreSQL there: a call is recorded, moves forward only, and its
    charge is claimed for a refund exactly once."""
    store, _ = store_and_proxy
    assert await store.admit("CA2", "CA2", "inbound", "US", "job-interview", max_live=5, stale_after_s=60)
    assert await store.set_status("CA2", "connected", 30, final_rank=100) is True
    assert await store.set_status("CA2", "ringing", 10, final_rank=100) is False
    assert await store.claim_refund("CA2", fallback="unused") == "CA2"
    assert await store.claim_refund("CA2", fallback="unused") is None
    assert (await store.get("CA2"))["status"] == "connected"

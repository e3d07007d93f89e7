"""The limiter while PostgreSQL is away: each fail mode, and the write-back when it returns.

PostgreSQL "goes away" through a loopback TCP proxy the test cuts, stalls or mutes, and once
for real: an embedded server stopped mid-run and started again.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from db.database import create_pool
from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from helpers import make_limiter, proxied, wait_until
from limiter.limiter import _Deadline

NUMBER = "+14155550100"


@pytest.fixture
async def proxy(dsn):
    async with proxied(dsn) as p:
        yield p


@pytest.fixture
async def proxied_pool(proxy):
    p = await create_pool(proxy.dsn, 4, client_timeout_ms=2000)
    yield p
    p.terminate()


async def charges_in_database(pool) -> int:
    return await pool.fetchval("SELECT coalesce(sum(cardinality(times)), 0) FROM phone_limits")


async def test_memory_mode_keeps_the_rule_and_writes_back(pool, proxy, proxied_pool):
    """fail mode memory: the same limit holds while PostgreSQL is away, using what this instance
    already knew; the charges made meanwhile reach PostgreSQL once it returns."""
    limiter = make_limiter(proxied_pool, max_calls=3, timeout=0.5)
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    proxy.cut()
    during = await limiter.hit(NUMBER, "CA2")
    assert (during.allowed, during.remaining, during.source) == (True, 1, "memory")
    assert (await limiter.hit(NUMBER, "CA3")).allowed
    refused = await limiter.hit(NUMBER, "CA4")
    assert (refused.allowed, refused.reason) == (False, "limit_reached")
    assert (await limiter.test(NUMBER)).source == "memory"
    assert not limiter.database_ok
    assert limiter.pending == 2

    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    assert await limiter.flush() == 2
    assert await limiter.flush() == 0
    assert limiter.pending == 0
    assert await charges_in_database(pool) == 3
    after = await limiter.hit(NUMBER, "CA5")
    assert (after.allowed, after.source) == (False, "database")


async def test_write_back_after_a_ghost_write_counts_once(pool, proxy, proxied_pool):
    """A charge whose statement committed but whose answer was lost counts as charged, and
    writing it back later does not count it twice."""
    limiter = make_limiter(proxied_pool, max_calls=2, timeout=0.5)
    # Warm the connection's prepared statement, so under mute the charge itself is sent (asyncpg
    # would otherwise wait for the reply to its Parse and never send the Execute).
    await limiter.hit("+14155550199", "CA-warm")
    proxy.mute()
    decision = await limiter.hit(NUMBER, "CA1")
    assert (decision.allowed, decision.source) == (True, "memory")
    assert await charges_in_database(pool) == 2  # the ghost write landed
    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    await limiter.flush()
    assert await charges_in_database(pool) == 2
    assert (await limiter.test(NUMBER)).remaining == 1


async def test_stalled_database_costs_one_timeout_per_decision(proxy, proxied_pool):
    """A database that accepts but never answers costs each decision one timeout, even with
    charges waiting to be written back and many decisions at once."""
    limiter = make_limiter(proxied_pool, timeout=0.3)
    proxy.stall()
    started = time.monotonic()
    assert (await limiter.hit(NUMBER, "CA1")).source == "memory"
    assert time.monotonic() - started < 0.6
    started = time.monotonic()
    decisions = await asyncio.gather(*(limiter.hit(NUMBER, f"CB{i}") for i in range(20)))
    assert time.monotonic() - started < 0.6  # waiting for the write-back lock is in the budget
    assert all(d.source == "memory" for d in decisions)


async def test_a_stall_after_the_answer_keeps_the_answer(proxy, proxied_pool):
    """When PostgreSQL answers and then stalls, the decision stands and returns in time."""
    limiter = make_limiter(proxied_pool, timeout=0.3)
    await limiter.hit("+14155550199", "CA-warm")

    class StallAfterAnswer:
        async def __call__(self, conn):
            row = await conn.fetchrow("SELECT 1 AS one")
            proxy.stall()
            return row

    started = time.monotonic()
    row = await limiter._run(StallAfterAnswer(), _Deadline(0.3))
    assert row["one"] == 1
    assert time.monotonic() - started < 0.6


async def test_refund_after_a_ghost_write_reaches_the_database(pool, proxy, proxied_pool):
    """A charge whose outcome was unknown, refunded while PostgreSQL is away, is refunded in
    PostgreSQL too once it returns."""
    limiter = make_limiter(proxied_pool, max_calls=2, timeout=0.5)
    await limiter.hit("+14155550199", "CA-warm")
    proxy.mute()
    assert (await limiter.hit(NUMBER, "CA1")).allowed  # the ghost write lands
    proxy.cut()
    assert await limiter.refund("CA1") is True
    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    await limiter.flush()
    assert await pool.fetchval("SELECT cardinality(times) FROM phone_limits WHERE 'CA1' = ANY (charges)") is None
    assert (await limiter.test(NUMBER)).remaining == 2


async def test_refund_during_write_back_is_not_lost(pool, proxy, proxied_pool):
    """A refund that arrives while charges are being written back frees its slot for good."""
    limiter = make_limiter(proxied_pool, max_calls=5, timeout=0.5)
    proxy.cut()
    for i in range(3):
        await limiter.hit(NUMBER, f"CA{i}")
    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    flushing = asyncio.create_task(limiter.flush())
    await wait_until(limiter._writeback.locked, what="the write-back to start")
    await limiter.refund("CA2")
    await flushing
    await limiter.flush()
    assert await charges_in_database(pool) == 2
    assert (await limiter.test(NUMBER)).remaining == 3


async def test_closed_mode_refuses_while_away(pool, proxy, proxied_pool):
    """fail mode closed: nothing is admitted while PostgreSQL is away, nothing is charged."""
    limiter = make_limiter(proxied_pool, fail_mode="closed", timeout=0.5)
    proxy.cut()
    decision = await limiter.hit(NUMBER, "CA1")
    assert (decision.allowed, decision.reason, decision.source) == (False, "limiter_unavailable", "closed")
    assert not (await limiter.test(NUMBER)).allowed
    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    assert await limiter.flush() == 0
    assert await charges_in_database(pool) == 0
    assert (await limiter.hit(NUMBER, "CA2")).allowed


async def test_open_mode_allows_and_still_counts(pool, proxy, proxied_pool):
    """fail mode open: calls go ahead while PostgreSQL is away, and are counted when it returns."""
    limiter = make_limiter(proxied_pool, max_calls=1, fail_mode="open", timeout=0.5)
    proxy.cut()
    assert all([(await limiter.hit(NUMBER, f"CA{i}")).allowed for i in range(3)])
    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    assert await limiter.flush() == 3
    assert await charges_in_database(pool) == 3
    assert not (await limiter.hit(NUMBER, "CA9")).allowed


async def test_refund_while_away_is_written_back(pool, proxy, proxied_pool):
    """A refund made while PostgreSQL is away frees the slot now and in PostgreSQL later."""
    limiter = make_limiter(proxied_pool, max_calls=1, timeout=0.5)
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    proxy.cut()
    assert await limiter.refund("CA1") is True
    assert (await limiter.test(NUMBER)).allowed
    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    await limiter.flush()
    assert await charges_in_database(pool) == 0


async def test_next_decision_after_recovery_counts_memory_charges(pool, proxy, proxied_pool):
    """The first decision after PostgreSQL returns writes back first, so nothing is over-admitted."""
    limiter = make_limiter(proxied_pool, max_calls=1, timeout=0.5)
    proxy.cut()
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    proxy.restore()
    assert await limiter.check_database()  # the gate's probe finds it back
    assert not (await limiter.hit(NUMBER, "CA2")).allowed
    assert await charges_in_database(pool) == 1


async def test_background_duty_writes_back_on_recovery(pool, proxy, proxied_pool):
    """The maintenance task notices PostgreSQL's return by itself and writes back."""
    limiter = make_limiter(proxied_pool, timeout=0.3)
    proxy.cut()
    await limiter.hit(NUMBER, "CA1")
    proxy.restore()
    duty = asyncio.create_task(limiter.maintain(interval=0.05))
    try:
        await wait_until(lambda: not limiter.pending, timeout=10, what="the charges to be written back")
    finally:
        duty.cancel()
    assert await charges_in_database(pool) == 1
    assert limiter.database_ok


async def test_embedded_server_stopped_and_started_mid_run(tmp_path):
    """A real PostgreSQL stop and start: decisions continue in memory, then land in PostgreSQL
    exactly once, and the pool reconnects by itself."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    dsn = await asyncio.to_thread(pg.start)
    pool = await create_pool(dsn, 4, client_timeout_ms=2000)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        limiter = make_limiter(pool, max_calls=3, timeout=1.0)
        assert (await limiter.hit(NUMBER, "CA1")).allowed
        await asyncio.to_thread(pg.stop)
        assert (await limiter.hit(NUMBER, "CA2")).source == "memory"
        assert (await limiter.hit(NUMBER, "CA2")).allowed  # retried: still one charge
        await asyncio.to_thread(pg.start)
        assert await limiter.check_database()
        assert await limiter.flush() == 1
        assert await pool.fetchval("SELECT cardinality(times) FROM phone_limits") == 2
        assert (await limiter.test(NUMBER)).remaining == 1
    finally:
        pool.terminate()
        await asyncio.to_thread(pg.stop)

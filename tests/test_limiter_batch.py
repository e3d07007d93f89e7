"""Group commit (limiter/batch.py): charges that wait together go to PostgreSQL as one statement,
and every decision in it means what it meant alone."""

from __future__ import annotations

import asyncio

import asyncpg

from db.database import create_pool
from helpers import make_limiter, wait_until

HOT = "+14155550100"


def number(i: int) -> str:
    return f"+1415555{2000 + i:04d}"


async def test_charges_waiting_together_share_a_statement_and_stay_exact(pool):
    """60 charges at once, 30 on one number (limit 4) and 30 on numbers of their own: the hot
    number admits exactly 4, every other number its one call, in far fewer statements than
    decisions."""
    limiter = make_limiter(pool, max_calls=4)
    hot = [limiter.hit(HOT, f"CAhot{i:03d}") for i in range(30)]
    cold = [limiter.hit(number(i), f"CAcold{i:03d}") for i in range(30)]
    decisions = await asyncio.gather(*hot, *cold)
    assert sum(d.allowed for d in decisions[:30]) == 4
    assert all(d.allowed for d in decisions[30:])
    assert (await limiter.test(HOT)).remaining == 0
    assert limiter.batcher.decisions == 60 and limiter.batcher.batches <= 60 // 4


async def test_one_charge_id_twice_in_a_batch_charges_once(pool):
    """A webhook and its retry arriving together: both answered allowed, one charge."""
    limiter = make_limiter(pool, max_calls=3)
    first, again, other = await asyncio.gather(limiter.hit(HOT, "CAsame"), limiter.hit(HOT, "CAsame"),
                                               limiter.hit(HOT, "CAother"))
    assert first.allowed and again.allowed and other.allowed
    assert (await limiter.test(HOT)).remaining == 1
    assert await limiter.refund("CAsame") is True
    assert await limiter.refund("CAsame") is False
    assert (await limiter.test(HOT)).remaining == 2


async def _lock_waiters(pool, *, at_least: int) -> bool:
    waiting = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                  " AND datname = current_database()")
    return waiting >= at_least


async def test_batches_from_two_instances_on_the_same_numbers_never_deadlock(dsn, pool, caplog):
    """Two instances charge the same 60 numbers at once, one in ascending and one in descending
    order, while a third session holds the row of the number in the middle: batches sent as they
    came would each hold half the rows and wait for the other's (a deadlock, which PostgreSQL
    breaks by failing one). Every decision is answered from the database, PostgreSQL reports no
    deadlock, and each number admits exactly its limit."""
    other_pool = await create_pool(dsn, 10, client_timeout_ms=2000)
    a, b = make_limiter(pool, max_calls=3, timeout=20), make_limiter(other_pool, max_calls=3, timeout=20)
    await asyncio.gather(*(a.hit(number(i), f"CAfirst{i:02d}") for i in range(60)))  # the rows exist
    blocker = await asyncpg.connect(dsn)
    try:
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("SELECT 1 FROM phone_limits WHERE key = $1 FOR UPDATE", a._keyer.key(number(30)))
        both = asyncio.gather(*(a.hit(number(i), f"CAa{i:02d}") for i in range(60)),
                              *(b.hit(number(i), f"CAb{i:02d}") for i in reversed(range(60))))
        await wait_until(lambda: _lock_waiters(pool, at_least=2), what="both batches to queue on locks", timeout=10)
        await hold.rollback()
        decisions = await both
    finally:
        await blocker.close()
        await other_pool.close()
    assert all(d.source == "database" for d in decisions)
    assert "deadlock" not in caplog.text.lower()
    for i in range(60):
        assert (await a.test(number(i))).remaining == 0
    assert sum(d.allowed for d in decisions) == 60 * 2

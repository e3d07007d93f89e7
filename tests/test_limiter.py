"""The per-number limiter against a real PostgreSQL: exactness, rolling window, idempotency,
refunds, key rotation, cooldown, cleanup."""

from __future__ import annotations

import asyncio

import pytest

from db.database import create_pool
from helpers import TEST_KEY, make_limiter, wait_until

NUMBER = "+14155550100"
HOUR = 3_600_000


async def test_concurrent_hits_admit_exactly_the_limit(pool):
    """200 concurrent charges for one number admit exactly the limit."""
    limiter = make_limiter(pool, max_calls=3)
    decisions = await asyncio.gather(*(limiter.hit(NUMBER, f"CA{i:04d}") for i in range(200)))
    assert sum(d.allowed for d in decisions) == 3
    status = await limiter.test(NUMBER)
    assert (status.allowed, status.remaining) == (False, 0)


async def test_concurrent_hits_across_two_pools_admit_exactly_the_limit(dsn, pool):
    """Two separate pools (as two instances) share one limit exactly."""
    other_pool = await create_pool(dsn, 10, client_timeout_ms=2000)
    try:
        a, b = make_limiter(pool, max_calls=5), make_limiter(other_pool, max_calls=5)
        decisions = await asyncio.gather(
            *((a if i % 2 else b).hit(NUMBER, f"CA{i:04d}") for i in range(200))
        )
    finally:
        await other_pool.close()
    assert sum(d.allowed for d in decisions) == 5


async def test_formats_of_one_number_share_one_key(pool):
    """+1 (415) 555-0100, 4155550100 (region US) and +14155550100 are one number."""
    limiter = make_limiter(pool, max_calls=3)
    assert (await limiter.hit("+1 (415) 555-0100", "CA1")).remaining == 2
    assert (await limiter.hit("4155550100", "CA2")).remaining == 1
    assert (await limiter.hit("+14155550100", "CA3")).remaining == 0
    assert not (await limiter.hit("(415) 555-0100", "CA4")).allowed


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("not a number", "unparseable"),
        ("", "missing"),
        ("+1415555", "invalid"),
        ("911", "not_callable"),          # emergency
        ("+19005550100", "not_callable"),  # premium-rate
        ("+442079460000", "region_not_allowed"),
    ],
)
async def test_refused_numbers_are_never_charged(pool, number, reason):
    """Invalid, emergency, premium-rate and off-list numbers are refused with a reason and
    leave nothing in the database."""
    limiter = make_limiter(pool)
    decision = await limiter.hit(number, "CA1")
    assert not decision.allowed
    assert decision.reason == reason
    assert decision.message
    assert await pool.fetchval("SELECT count(*) FROM phone_limits") == 0
    assert await pool.fetchval("SELECT count(*) FROM limiter_charges") == 0


async def test_window_rolls_when_the_oldest_charge_leaves(pool, clock):
    """A slot frees exactly when its oldest charge is one window old, not at a clock boundary."""
    limiter = make_limiter(pool, max_calls=2, window_ms=HOUR, clock=clock)
    first = clock.now_ms
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    clock.advance(20 * 60_000)
    assert (await limiter.hit(NUMBER, "CA2")).allowed
    clock.advance(1000)
    refused = await limiter.hit(NUMBER, "CA3")
    assert not refused.allowed
    assert refused.reason == "limit_reached"
    assert refused.reset_time == first + HOUR

    clock.now_ms = first + HOUR - 1
    assert not (await limiter.test(NUMBER)).allowed
    assert not (await limiter.hit(NUMBER, "CA4")).allowed
    clock.now_ms = first + HOUR
    assert (await limiter.test(NUMBER)).allowed
    assert (await limiter.hit(NUMBER, "CA5")).allowed
    assert not (await limiter.hit(NUMBER, "CA6")).allowed


async def test_status_reports_remaining_and_reset_time(pool, clock):
    """test() reads without charging; resetTime is now + window when nothing is used, else
    when the oldest charge leaves."""
    limiter = make_limiter(pool, max_calls=2, window_ms=HOUR, clock=clock)
    fresh = await limiter.test(NUMBER)
    assert (fresh.allowed, fresh.remaining, fresh.limit, fresh.reset_time) == (True, 2, 2, clock.now_ms + HOUR)
    assert (await limiter.test(NUMBER)).remaining == 2  # reading charged nothing
    start = clock.now_ms
    await limiter.hit(NUMBER, "CA1")
    clock.advance(5000)
    status = await limiter.test(NUMBER)
    assert (status.allowed, status.remaining, status.reset_time) == (True, 1, start + HOUR)


async def test_same_charge_id_charges_once(pool):
    """A retried charge id (a webhook retry) is answered allowed and charges nothing more."""
    limiter = make_limiter(pool, max_calls=2)
    first = await limiter.hit(NUMBER, "CA1")
    again = await asyncio.gather(*(limiter.hit(NUMBER, "CA1") for _ in range(20)))
    assert first.allowed and all(d.allowed for d in again)
    assert (await limiter.test(NUMBER)).remaining == 1


async def test_charge_id_stays_idempotent_after_its_window(pool, clock):
    """A webhook replayed after the charge left the window still charges nothing."""
    limiter = make_limiter(pool, max_calls=1, window_ms=HOUR, clock=clock)
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    clock.advance(2 * HOUR)
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    assert (await limiter.test(NUMBER)).remaining == 1


async def test_refund_frees_the_slot(pool):
    """refund(charge_id) gives the slot back; a second refund changes nothing."""
    limiter = make_limiter(pool, max_calls=1)
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    assert not (await limiter.hit(NUMBER, "CA2")).allowed
    assert await limiter.refund("CA1") is True
    assert await limiter.refund("CA1") is False
    assert (await limiter.hit(NUMBER, "CA3")).allowed
    assert (await limiter.test(NUMBER)).remaining == 0


async def test_refund_of_unknown_charge_changes_nothing(pool):
    """Refunding an id that was never charged (or was refused) leaves the counts alone."""
    limiter = make_limiter(pool, max_calls=2)
    await limiter.hit(NUMBER, "CA1")
    await limiter.hit(NUMBER, "CA2")
    refused = await limiter.hit(NUMBER, "CA3")
    assert not refused.allowed
    assert await limiter.refund("CA3") is False
    assert await limiter.refund("nope") is False
    assert (await limiter.test(NUMBER)).remaining == 0


async def test_counts_survive_a_key_rotation(pool):
    """Charges made under the old key still count under the new one, and refunds still find them."""
    old = make_limiter(pool, max_calls=3, key="old-key-" + "x" * 32)
    await old.hit(NUMBER, "CA1")
    await old.hit(NUMBER, "CA2")
    rotated = make_limiter(pool, max_calls=3, key=TEST_KEY, previous=("old-key-" + "x" * 32,))
    assert (await rotated.test(NUMBER)).remaining == 1
    assert (await rotated.hit(NUMBER, "CA3")).allowed
    assert not (await rotated.hit(NUMBER, "CA4")).allowed
    # The rows now live under the new key only.
    assert await pool.fetchval("SELECT count(*) FROM phone_limits") == 1
    assert await rotated.refund("CA1") is True
    assert (await rotated.test(NUMBER)).remaining == 1


async def test_concurrent_hits_during_a_key_rotation_stay_exact(pool):
    """Many instances moving the same old-key row at once neither lose nor double a charge."""
    old = make_limiter(pool, max_calls=4, key="old-key-" + "x" * 32)
    await old.hit(NUMBER, "CA-old")
    rotated = make_limiter(pool, max_calls=4, key=TEST_KEY, previous=("old-key-" + "x" * 32,))
    decisions = await asyncio.gather(*(rotated.hit(NUMBER, f"CA{i}") for i in range(50)))
    assert sum(d.allowed for d in decisions) == 3
    assert (await rotated.test(NUMBER)).remaining == 0


async def test_cooldown_spaces_calls(pool, clock):
    """With a cooldown, a second call is refused until the gap has passed."""
    limiter = make_limiter(pool, max_calls=5, cooldown_ms=60_000, clock=clock)
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    clock.advance(59_999)
    early = await limiter.hit(NUMBER, "CA2")
    assert (early.allowed, early.reason, early.reset_time) == (False, "cooldown", clock.now_ms + 1)
    clock.advance(1)
    assert (await limiter.hit(NUMBER, "CA3")).allowed


async def test_cleanup_deletes_only_expired_rows(pool, clock):
    """cleanup() removes rows whose window has passed and keeps live ones."""
    limiter = make_limiter(pool, max_calls=2, window_ms=HOUR, clock=clock)
    await limiter.hit("+14155550101", "CA1")
    clock.advance(HOUR)
    await limiter.hit("+14155550102", "CA2")
    rows, _ = await limiter.cleanup(batch=1)
    assert rows == 1
    assert await pool.fetchval("SELECT count(*) FROM phone_limits") == 1
    assert (await limiter.test("+14155550102")).remaining == 1


async def test_reset_forgets_a_number(pool):
    """The admin reset makes a limited number callable again."""
    limiter = make_limiter(pool, max_calls=1)
    await limiter.hit(NUMBER, "CA1")
    assert await limiter.reset("+1 415 555 0100") == 1
    assert (await limiter.hit(NUMBER, "CA2")).allowed


async def test_stats_count_without_numbers(pool):
    """Admin stats count rows, calls in the window and numbers at their limit, by region."""
    limiter = make_limiter(pool, max_calls=1)
    await limiter.hit(NUMBER, "CA1")
    await limiter.hit("+61 2 9374 4000", "CA2")
    await limiter.hit("+61 2 9374 4001", "CA3")
    stats = await limiter.stats()
    assert (stats["rows"], stats["callsInWindow"], stats["numbersAtLimit"]) == (3, 3, 3)
    assert stats["byRegion"]["AU"]["rows"] == 2
    assert stats["byRegion"]["US"]["callsInWindow"] == 1


async def test_replayed_charge_after_a_refund_charges_nothing(pool):
    """A webhook replayed after its call was refunded does not charge again."""
    limiter = make_limiter(pool, max_calls=2)
    await limiter.hit(NUMBER, "CA1")
    assert await limiter.refund("CA1")
    assert (await limiter.hit(NUMBER, "CA1")).allowed
    assert (await limiter.test(NUMBER)).remaining == 2


async def test_refund_racing_replays_of_its_charge_neither_deadlocks_nor_is_lost(pool):
    """A refund at the same moment as retried charges of the same id completes, and the slot is free."""
    limiter = make_limiter(pool, max_calls=3)
    for round_ in range(20):
        charge = f"CA{round_}"
        await limiter.hit(NUMBER, charge)
        results = await asyncio.gather(*(limiter.hit(NUMBER, charge) for _ in range(4)), limiter.refund(charge))
        assert results[-1] is True
        assert limiter.database_ok
    assert (await limiter.test(NUMBER)).remaining == 3


async def test_malformed_charge_ids_are_refused_loudly(pool):
    """A charge id that is not a plain id is a caller bug: LimiterError, nothing stored."""
    from limiter.errors import LimiterError

    limiter = make_limiter(pool)
    for bad in ("", "CA\x00x", "x" * 65, None, "a b"):
        with pytest.raises(LimiterError):
            await limiter.hit(NUMBER, bad)
    assert limiter.database_ok and limiter.pending == 0
    assert await pool.fetchval("SELECT count(*) FROM phone_limits") == 0


async def test_refund_finds_a_charge_moved_by_a_rotation_it_raced(dsn, pool):
    """An old-key instance's charge that lands while a rotated instance moves the row can still
    be refunded."""
    import asyncpg

    from db.sql import Queries
    from limiter.limiter import _Deadline
    from limiter.phone import PhoneKeyer

    old_key, new_key = "old-key-" + "x" * 32, TEST_KEY
    old = make_limiter(pool, max_calls=5, key=old_key)
    await old.hit(NUMBER, "CA1")
    rotated = make_limiter(pool, max_calls=5, key=new_key, previous=(old_key,))
    keyer = PhoneKeyer(new_key, [old_key])
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()  # the old instance's charge, not yet committed
        await conn.fetch(Queries.load().limiter_hit, [PhoneKeyer(old_key).key(NUMBER)], ["CA9"], [5], [HOUR], [0],
                         [None], [None], [False], ["US"])
        move = asyncio.create_task(rotated._rekey(keyer.key(NUMBER), keyer.previous(NUMBER), _Deadline(10)))
        await asyncio.wait_for(asyncio.shield(_until_blocked(pool)), timeout=10)
        await tx.commit()
        await move
    finally:
        await conn.close()
    assert await rotated.refund("CA9") is True
    assert (await rotated.test(NUMBER)).remaining == 4


async def _until_blocked(pool) -> None:
    """Wait until some session waits on a lock (the move queued behind the open transaction)."""
    await wait_until(lambda: pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"),
                     what="a session to wait on a lock")


async def test_cleanup_keeps_other_budgets_for_their_own_window(pool, clock):
    """A budget with a longer window than the numbers' (a client address's call.starts) is not
    reset by the cleanup that clears numbers' rows."""
    from limiter.limiter import Budget
    from limiter.rules import Rules

    limiter = make_limiter(pool, max_calls=2, window_ms=60_000, clock=clock)
    budget = Budget("call-starts-per-address", "203.0.113.5", Rules(1, HOUR))
    assert (await limiter.hit_budget(budget, "CS1")).allowed
    await limiter.hit(NUMBER, "CA1")
    clock.advance(2 * 60_000)
    rows, _ = await limiter.cleanup()
    assert rows == 1  # the number's row only
    assert not (await limiter.hit_budget(budget, "CS2")).allowed

"""The sliding-log rule in SQL (sql/migrations/009_limiter_rule_in_plpgsql.sql): the loop that
decides gives, on every log, the answer 001's sorting version gives."""

from __future__ import annotations

import random

NOW = 1_800_000_000_000
WINDOW = 3_600_000
ARGS = "$1::bigint[], $2::text[], $3, $4::bigint, $5::bigint, $6::int, $7::bigint, $8::bigint, $9, $10"


def _case(rng: random.Random, ascending: bool) -> tuple:
    """A log of 0-5 charges around the window's edge (some equal times), and a decision on it."""
    ids = ["CA1", "CA2", "CA3", "RS1", "RS2", "a", "B"]
    entries = [(NOW - rng.choice((WINDOW + 5, WINDOW, WINDOW - 1, 90_000, 1_000, 0)) + rng.choice((0, 0, 7)),
                rng.choice(ids)) for _ in range(rng.randint(0, 5))]
    if ascending:
        entries.sort()
    at = NOW - rng.choice((0, 0, 0, 500, 60_000, WINDOW, WINDOW + 1))
    return ([t for t, _ in entries], [c for _, c in entries], rng.choice(ids), at, NOW,
            rng.choice((0, 1, 2, 3, 10)), WINDOW, rng.choice((0, 0, 1_000, 120_000)),
            rng.random() < 0.2, rng.random() < 0.1)


async def test_the_loop_decides_as_the_sorting_rule_on_every_log(pool):
    """Thousands of logs and decisions, ascending (what every row holds) and not (a row edited
    by hand): the same live log after the decision, entry for entry, from both functions. The
    cases cover admitted, refused for room, for cooldown, as a duplicate, as seen, as too old,
    and forced."""
    rng = random.Random(20261201)
    cases = [_case(rng, ascending=i % 4 != 0) for i in range(3000)]
    outcomes = set()
    async with pool.acquire() as conn:
        fast = await conn.prepare(f"SELECT times, charges FROM callgate_limiter_admit({ARGS})")
        sorting = await conn.prepare(f"SELECT times, charges FROM callgate_limiter_admit_sorting({ARGS})")
        for case in cases:
            got, want = tuple(await fast.fetchrow(*case)), tuple(await sorting.fetchrow(*case))
            assert got == want, case
            live_before = sum(t > NOW - WINDOW for t in case[0])
            outcomes.add("admitted" if len(got[0]) > live_before else "refused")
    assert outcomes == {"admitted", "refused"}


async def test_a_log_with_holes_goes_to_the_sorting_rule(pool):
    """Parallel arrays of unequal length or with NULLs (never written, but a row edited by
    hand could hold them) get the sorting rule's answer, not an error."""
    for times, charges in (([NOW - 10, NOW - 5], ["CA1"]), ([NOW - 10, None], ["CA1", "CA2"]),
                           ([NOW - 10, NOW - 5], ["CA1", None])):
        args = (times, charges, "CA9", NOW, NOW, 5, WINDOW, 0, False, False)
        got = tuple(await pool.fetchrow(f"SELECT times, charges FROM callgate_limiter_admit({ARGS})", *args))
        want = tuple(await pool.fetchrow(f"SELECT times, charges FROM callgate_limiter_admit_sorting({ARGS})", *args))
        assert got == want

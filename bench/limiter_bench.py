"""Benchmark of the per-phone limiter against a bare `SELECT 1`, through one asyncpg pool.

Five phases, each a fixed number of operations in flight for a fixed time (after a warm-up
that is not counted):

    (c) SELECT 1                 the pool's round trip: the floor a decision cannot beat
    (a) Limiter.hit, random keys a new valid US number and a new charge id per call (INSERTs)
    (b) Limiter.hit, one hot key one number, a new charge id per call: all calls queue on one
                                 row lock, and all but the first few are refused (expected)
    (a') and (b')                the same with each number parsed beforehand, as the server
                                 has done by the time it charges one: the client's ~0.1 ms of
                                 phonenumbers per call no longer sets the pace

It prints decisions per second, p50/p99 latency, the ratios limiter / SELECT 1 (by ops/s, and
by operations per CPU second of the local PostgreSQL: the server-side cost), and the share
of HOT updates on phone_limits (sql/migrations/001_limiter.sql is built to keep it near 99 %).

Run from the repository root:

    .venv/bin/python bench/limiter_bench.py                      # embedded PostgreSQL, temporary
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/limiter_bench.py
    .venv/bin/python bench/limiter_bench.py --seconds 10 --concurrency 50 --pool-size 10 --warmup 2

With DATABASE_URL it creates a fresh database `bench_<random>` on that server and drops it at
the end. `Limiter.hit` is called with the number as text, as the server does, so its figures
include parsing and HMAC on the client side.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

# The project is not installed: import it from the repository root.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from bench.common import run_database  # noqa: E402
from db.bounded import DatabaseGate  # noqa: E402
from db.database import create_pool  # noqa: E402
from db.migrate import migrate  # noqa: E402
from db.sql import Queries  # noqa: E402
from limiter.errors import InvalidNumber  # noqa: E402
from limiter.limiter import Limiter, Regions  # noqa: E402
from limiter.phone import PhoneKeyer, parse  # noqa: E402
from limiter.rules import Decision, Rules  # noqa: E402

# The server's defaults (config.py): 2 calls per number per rolling hour, no cooldown.
RULES = Rules(max_calls=2, window_ms=3_600_000, cooldown_ms=0)
REGIONS = Regions("US", frozenset({"US"}))
BENCH_KEY = "bench-phone-key-0123456789abcdef0123456789"
AREA_CODES = (212, 415, 646, 718, 917)  # real, long-assigned NANP area codes
HOT_NUMBER = "+14155550123"
# Numbers to pre-generate per second of SELECT 1 throughput: a decision is at least one round
# trip, so the limiter should not outrun SELECT 1; the margin covers noise.
NUMBER_MARGIN = 1.2


# --- measuring ---------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    elapsed: float
    client_cpu: float  # CPU seconds this process used, user + system
    latencies: list[float] = field(repr=False)
    server_cpu: float = math.nan  # CPU seconds PostgreSQL's processes used (when it is local)

    @property
    def per_server_cpu_s(self) -> float:
        """Operations per CPU second of PostgreSQL: what one costs the database, whoever (the
        client, the database) set the pace."""
        return self.ops / self.server_cpu if self.server_cpu > 0 else math.nan

    @property
    def ops(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed if self.elapsed else 0.0

    @property
    def client_share(self) -> float:
        """Cores' worth of CPU the client burnt: near 1.0 means the client (one thread) was
        the bottleneck, not PostgreSQL."""
        return self.client_cpu / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else math.nan


async def run_for(name: str, op: Callable[[], Awaitable[object]], seconds: float, concurrency: int) -> Phase:
    """`concurrency` workers call `op` back to back until `seconds` have passed.

    Workers rather than a semaphore: exactly `concurrency` operations stay in flight, and no
    task is created per operation (which would cost the client CPU the server needs too).
    """
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (started := time.perf_counter()) < deadline:
            await op()
            latencies.append(time.perf_counter() - started)

    cpu_before, server_before, started = cpu_seconds(), postgres_cpu_seconds(), time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    # Up to the last answer, so the operations finishing after the deadline are paid for.
    return Phase(name, time.perf_counter() - started, cpu_seconds() - cpu_before, latencies,
                 postgres_cpu_seconds() - server_before)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu_seconds() -> float:
    """CPU seconds used so far by this machine's PostgreSQL processes (every server's: an idle
    one adds next to nothing); NaN when /proc is not there. The backends serving the pool
    live through a phase, so the difference over a phase is its cost to the database."""
    total, ticks = 0, os.sysconf("SC_CLK_TCK")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return math.nan
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if name.startswith("postgres") or name.startswith("postmaster"):
            total += int(rest[11]) + int(rest[12])
    return total / ticks


async def measure(name: str, op: Callable[[], Awaitable[object]], args: argparse.Namespace) -> Phase:
    """A warm-up (connections opened, plans cached, buffers warm), then the counted run."""
    if args.warmup > 0:
        await run_for(name, op, args.warmup, args.concurrency)
    return await run_for(name, op, args.seconds, args.concurrency)


# --- workload ----------------------------------------------------------------------------------

def generate_numbers(count: int, rng: random.Random) -> tuple[list[str], float]:
    """`count` random US numbers that the project's own parser accepts, and its cost per call.

    Done before the timed phases: parsing with phonenumbers costs about 0.1 ms of CPU, which
    would otherwise be charged to the limiter twice.
    """
    numbers: list[str] = []
    tried = 0
    started = time.perf_counter()
    while len(numbers) < count:
        exchange = rng.randrange(200, 1000)
        if exchange % 100 == 11:  # N11 codes (411, 911, ...) are services, not exchanges
            continue
        number = f"+1{rng.choice(AREA_CODES)}{exchange}{rng.randrange(10_000):04d}"
        tried += 1
        try:
            parse(number, default_region=REGIONS.default, allowed_regions=REGIONS.allowed)
        except InvalidNumber:
            continue
        numbers.append(number)
    return numbers, (time.perf_counter() - started) / max(tried, 1)


class Tally:
    """Outcomes of the limiter calls of a phase, to check that the database decided them."""

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, bool]] = Counter()

    def add(self, decision: Decision) -> None:
        self.outcomes[decision.source, decision.allowed] += 1

    def summary(self) -> str:
        admitted = sum(n for (_, allowed), n in self.outcomes.items() if allowed)
        refused = sum(n for (_, allowed), n in self.outcomes.items() if not allowed)
        text = f"admitted {admitted}, refused {refused}"
        elsewhere = sum(n for (source, _), n in self.outcomes.items() if source != "database")
        if elsewhere:
            # A fail-mode answer means PostgreSQL did not answer within the limiter's timeout:
            # those calls never reached the database and the figures are not comparable.
            text += f"; WARNING: {elsewhere} decided by the fail mode, not PostgreSQL"
        return text


def random_key_op(limiter: Limiter, numbers: list, charge_ids: itertools.count, tally: Tally,
                  reused: Counter) -> Callable[[], Awaitable[None]]:
    calls = itertools.count()

    async def op() -> None:
        index = next(calls)
        if index >= len(numbers):  # ran out: go round again (reported: UPDATEs, not INSERTs)
            reused["numbers"] += 1
        number = numbers[index % len(numbers)]
        tally.add(await limiter.hit(number, f"bench-{next(charge_ids)}"))

    return op


def hot_key_op(limiter: Limiter, charge_ids: itertools.count, tally: Tally,
               number=HOT_NUMBER) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        tally.add(await limiter.hit(number, f"bench-{next(charge_ids)}"))

    return op


def select_one_op(pool: asyncpg.Pool) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        # Acquire, one statement, release: the same pool steps a limiter decision takes.
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    return op


# --- the database ------------------------------------------------------------------------------

async def flush_statistics(pool: asyncpg.Pool) -> None:
    """Ask every pooled backend to publish its table counters now.

    Since PostgreSQL 15 each backend flushes its counters itself, at most about once a second
    and when idle, so pg_stat_user_tables lags; pg_stat_force_next_flush() (PG 15+) makes the
    backend flush right after this statement. Older servers lack it: we read a bit late there.
    """
    held = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        for conn in held:
            await conn.execute("SELECT pg_stat_force_next_flush()")
    except asyncpg.UndefinedFunctionError:
        pass
    finally:
        for conn in held:
            await pool.release(conn)


async def hot_update_counts(dsn: str, settle: float = 3.0) -> tuple[int, int]:
    """(n_tup_upd, n_tup_hot_upd) of phone_limits, read until two reads agree (the flushes
    above are asynchronous) or `settle` seconds have passed."""
    conn = await asyncpg.connect(dsn)
    try:
        query = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'phone_limits'"
        last = None
        deadline = time.monotonic() + settle
        while True:
            row = await conn.fetchrow(query)
            current = (row["n_tup_upd"], row["n_tup_hot_upd"])
            if current == last or time.monotonic() >= deadline:
                return current
            last = current
            await asyncio.sleep(0.3)
    finally:
        await conn.close()


# --- report ------------------------------------------------------------------------------------

def print_report(args: argparse.Namespace, where: str, version: str, phases: list[Phase],
                 notes: list[str]) -> None:
    select_one, random_keys, hot_key, random_parsed, hot_parsed = phases
    print()
    print(f"Callgate limiter benchmark: {args.concurrency} in flight, pool of {args.pool_size}, "
          f"{args.seconds:g} s per phase after {args.warmup:g} s warm-up")
    print(f"PostgreSQL {version}, {where}")
    print(f"Note: the benchmark client and the server share this machine's {os.cpu_count()} cores "
          "(when the server is local), so client CPU is taken from PostgreSQL.")
    print()
    print(f"{'phase':<28}{'ops':>9}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'client CPU':>12}"
          f"{'ops per PG CPU-s':>18}")
    for phase in phases:
        print(f"{phase.name:<28}{phase.ops:>9}{phase.rate:>10.0f}"
              f"{phase.percentile_ms(0.50):>9.2f}{phase.percentile_ms(0.99):>9.2f}"
              f"{phase.client_share:>11.0%} {phase.per_server_cpu_s:>17.0f}")
    print("(client CPU: share of one core used by this benchmark process; ~100 % means the "
          "client, not PostgreSQL, set the pace)")
    print()
    base = select_one.rate or math.nan
    print(f"limiter / SELECT 1 (ops/s): (a) random keys {random_keys.rate / base:.2f}, "
          f"(b) hot key {hot_key.rate / base:.2f}; numbers parsed beforehand: "
          f"(a') {random_parsed.rate / base:.2f}, (b') {hot_parsed.rate / base:.2f}")
    # Server-side: the client (one Python process, parsing and hashing every number) is the
    # bottleneck of ops/s above; per CPU second of PostgreSQL is what a decision costs the
    # database, the resource every instance shares.
    server_base = select_one.per_server_cpu_s or math.nan
    print(f"limiter / SELECT 1 (ops per PostgreSQL CPU-second, server-side): "
          f"(a) random keys {random_keys.per_server_cpu_s / server_base:.2f}, "
          f"(b) hot key {hot_key.per_server_cpu_s / server_base:.2f}, "
          f"(a') {random_parsed.per_server_cpu_s / server_base:.2f}, (b') {hot_parsed.per_server_cpu_s / server_base:.2f}")
    for note in notes:
        print(note)


# --- main --------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="counted time per phase (default 5)")
    parser.add_argument("--concurrency", type=int, default=50, help="operations in flight (default 50)")
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg pool connections (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before each phase (default 1)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.concurrency < 1 or args.pool_size < 1 or args.warmup < 0:
        parser.error("--seconds must be > 0, --concurrency and --pool-size >= 1, --warmup >= 0")
    return args


async def main() -> None:
    args = parse_args()
    async with run_database(migrated=True) as (dsn, where):
        pool = await create_pool(dsn, args.pool_size, client_timeout_ms=2000)
        try:
            queries = Queries.load()
            gate = DatabaseGate(pool, queries.database_ping, migrate, 2.0)
            await gate.probe()
            limiter = Limiter(gate, queries, PhoneKeyer(BENCH_KEY), RULES, REGIONS,
                              fail_mode="memory", timeout=2.0)
            version = await pool.fetchval("SHOW server_version")
            phases, notes = await run_phases(limiter, pool, args)
            await flush_statistics(pool)
        finally:
            await pool.close()
        # After the pool is closed: its backends have exited, which flushes their counters too.
        updates, hot = await hot_update_counts(dsn)
        share = f"{100 * hot / updates:.1f} %" if updates else "n/a"
        notes.append(f"HOT updates on phone_limits: {hot} of {updates} ({share}; "
                     "reference ≈ 99 %; nearly all from the hot-key phase, random keys are INSERTs)")
        print_report(args, where, version, phases, notes)


async def run_phases(limiter: Limiter, pool: asyncpg.Pool, args: argparse.Namespace) -> tuple[list[Phase], list[str]]:
    print(f"(c) SELECT 1 for {args.warmup:g}+{args.seconds:g} s ...", file=sys.stderr)
    select_one = await measure("(c) SELECT 1", select_one_op(pool), args)

    count = math.ceil(select_one.rate * (args.warmup + args.seconds) * NUMBER_MARGIN)
    print(f"pre-generating {count} random valid US numbers ...", file=sys.stderr)
    numbers, parse_cost = generate_numbers(count, random.Random())

    charge_ids = itertools.count()
    random_tally, hot_tally, reused = Tally(), Tally(), Counter()
    print(f"(a) random keys for {args.warmup:g}+{args.seconds:g} s ...", file=sys.stderr)
    random_keys = await measure("(a) hit, random keys",
                                random_key_op(limiter, numbers, charge_ids, random_tally, reused), args)
    print(f"(b) hot key for {args.warmup:g}+{args.seconds:g} s ...", file=sys.stderr)
    hot_key = await measure("(b) hit, one hot key", hot_key_op(limiter, charge_ids, hot_tally), args)
    # The same two with each number parsed beforehand (the server parses a webhook's number once,
    # before it charges it): the client's phonenumbers time, ~0.1 ms a decision, no longer sets
    # the pace, so these are the decision's own cost next to SELECT 1.
    parsed = [limiter.parse(n) for n in generate_numbers(count, random.Random())[0]]
    print(f"(a') random keys, parsed beforehand, for {args.warmup:g}+{args.seconds:g} s ...", file=sys.stderr)
    random_parsed = await measure("(a') random keys, parsed", random_key_op(limiter, parsed, charge_ids,
                                                                           Tally(), reused), args)
    hot = limiter.parse(HOT_NUMBER)
    print(f"(b') hot key, parsed beforehand, for {args.warmup:g}+{args.seconds:g} s ...", file=sys.stderr)
    hot_parsed = await measure("(b') hot key, parsed", hot_key_op(limiter, charge_ids, Tally(), hot), args)

    batcher = limiter.batcher
    notes = [
        f"group commit: {batcher.decisions} decisions in {batcher.batches} statements, "
        f"{batcher.decisions / max(1, batcher.batches):.1f} per statement on average (limiter/batch.py)",
        f"(a) {random_tally.summary()} (warm-up included)",
        f"(b) {hot_tally.summary()} (warm-up included; limit {RULES.max_calls} per "
        f"{RULES.window_ms // 60_000} min, refusals expected)",
        f"parse + validate of one number (phonenumbers, inside every hit): {parse_cost * 1e6:.0f} µs of client CPU",
    ]
    if reused["numbers"]:
        notes.append(f"WARNING: the {len(numbers)} pre-generated numbers ran out; "
                     f"{reused['numbers']} were used again (UPDATEs, not INSERTs)")
    return [select_one, random_keys, hot_key, random_parsed, hot_parsed], notes


if __name__ == "__main__":
    asyncio.run(main())

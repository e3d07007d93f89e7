"""db/calls.py: the call store, the global cap's bookkeeping (admissions, holds, streams,
replays, dead instances), and what each method does while PostgreSQL is away (the table in
its docstring), against a real PostgreSQL, behind a proxy that can cut it off."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from calls.status import rank
from db.calls import DEAD_AFTER_S
from db.database import create_pool
from helpers import make_store, proxied

CONNECTED = ("connected", rank("connected"))

PARAMS = {"scenarioId": "job-interview", "voice": "marin", "token": "t1"}


@pytest.fixture
async def store_and_proxy(dsn):
    async with proxied(dsn) as proxy:
        pool = await create_pool(proxy.dsn, 2, client_timeout_ms=300)
        try:
            yield make_store(pool, timeout=0.3, max_live=2), proxy
        finally:
            pool.terminate()


async def admit(store, call_sid: str, charge_id: str | None = None, params=PARAMS):
    return await store.admit(call_sid, charge_id or call_sid, "inbound", "US", "job-interview", params,
                             "+1415•••0100")


async def test_every_method_answers_as_documented_while_the_database_is_away(store_and_proxy, caplog):
    """With PostgreSQL cut off, each method returns its documented fallback within its bound,
    and says in the log what was not done; none raises."""
    store, proxy = store_and_proxy
    proxy.cut()
    caplog.set_level(logging.WARNING, logger="callgate.calls")
    started = time.monotonic()
    answers = {
        "admit": (await admit(store, "CA1")).admitted,
        "hold": await store.hold("RS2"),
        "release_hold": await store.release_hold("RS2"),
        "record": await store.record("CA1", "RS1", "outbound-api", "US", "job-interview", "+1415•••0101"),
        "put_request": await store.put_request("RS1", "job-interview", "{}", "marin"),
        "get_request": await store.get_request("RS1"),
        "set_status": await store.set_status("CA1", "ringing", 10, final_rank=100),
        "set_end_reason": await store.set_end_reason("CA1", "caller_hangup"),
        "claim_refund": await store.claim_refund("CA1", fallback="RS1"),
        "get": await store.get("CA1"),
        "cleanup": await store.cleanup(),
    }
    elapsed = time.monotonic() - started
    assert answers == {"admit": True, "hold": True, "release_hold": None, "record": None, "put_request": False,
                       "get_request": None, "set_status": True, "set_end_reason": True, "claim_refund": "RS1",
                       "get": None, "cleanup": 0}
    assert elapsed < 11 * 1.0  # each bounded by its timeout (0.3 s), and after the first, at once
    assert len([r for r in caplog.records if "database is unavailable" in r.getMessage()]) == 11


@pytest.mark.parametrize(("fail_mode", "taken"), [("memory", [True, True, False]), ("closed", [False] * 3),
                                                  ("open", [True] * 3)])
async def test_while_away_the_cap_is_decided_by_the_fail_mode(dsn, fail_mode, taken):
    """PostgreSQL away: memory takes calls up to this instance's share of the cap (2 of 2, one
    instance alive), closed none, open all; and the calls taken are recorded once it returns."""
    async with proxied(dsn) as proxy:
        pool = await create_pool(proxy.dsn, 2, client_timeout_ms=300)
        try:
            store = make_store(pool, timeout=0.3, max_live=2, fail_mode=fail_mode)
            proxy.cut()
            answers = [(await admit(store, f"CA{i}")).admitted for i in range(3)]
            proxy.restore()
            assert await store._gate.probe()
            await store._write_back()
            recorded = await pool.fetchval("SELECT count(*) FROM calls WHERE admitted_at IS NOT NULL")
        finally:
            pool.terminate()
    assert answers == taken
    assert recorded == sum(taken)


async def test_what_happens_while_away_is_recorded_when_the_database_returns(store_and_proxy, caplog):
    """Calls that streamed and ended during an outage must not hold places under the cap after
    it: their admission, stream start, latest status and end reason are written back, as is a
    call placed meanwhile; repeated warnings of one kind are counted, not repeated."""
    store, proxy = store_and_proxy
    caplog.set_level(logging.WARNING, logger="callgate.calls")
    assert (await admit(store, "CA1")).admitted  # before: recorded at once
    proxy.cut()
    assert (await store.start_stream("jti-1", "CA1", time.time() + 60, CONNECTED)).first
    assert (await admit(store, "CA2")).admitted
    assert (await store.start_stream("jti-2", "CA2", time.time() + 60, CONNECTED)).first
    for call in ("CA1", "CA2"):
        await store.set_status(call, "connected", 50, final_rank=100)
        await store.set_status(call, "ended", 100, final_rank=100, reason="caller_hangup")
        await store.set_status(call, "connected", 50, final_rank=100)  # late: must not undo the end
    await store.record("CA3", "RS3", "outbound-api", "US", "job-interview", "+1415•••0103")
    assert store.owed == 6
    proxy.restore()
    assert await store._gate.probe()
    await store._write_back()
    assert store.owed == 0
    pool = store._gate.pool
    rows = {r["call_sid"]: (r["status"], r["end_reason"], r["streamed_at"] is not None)
            for r in await pool.fetch("SELECT * FROM calls")}
    assert rows == {"CA1": ("ended", "caller_hangup", True), "CA2": ("ended", "caller_hangup", True),
                    "CA3": ("queued", None, False)}
    assert await pool.fetchval("SELECT callgate_live_calls(NULL, NULL, 420, 60, 60)") == 0
    statuses = [r.getMessage() for r in caplog.records if ": status" in r.getMessage()]
    assert len(statuses) == 2 and all("CA1" in m for m in statuses)  # CA2's: counted in the next line


async def test_while_away_calls_let_in_but_not_streaming_yet_count_in_the_share(store_and_proxy):
    """A burst has many calls between webhook and stream: one admitted through PostgreSQL just
    before it went away takes a place in this instance's share like a streaming one."""
    store, proxy = store_and_proxy  # cap 2, one instance alive: a share of 2
    assert (await admit(store, "CA1")).admitted  # through PostgreSQL; its stream not open yet
    proxy.cut()
    assert [(await admit(store, call)).admitted for call in ("CA2", "CA3")] == [True, False]


async def test_after_an_outage_admissions_keep_to_the_share_until_others_wrote_back(dsn):
    """Instance B lets a call in while PostgreSQL is away; A finds PostgreSQL back before B
    wrote it back, so PostgreSQL's count is short by one: for SETTLE_S A also keeps to its
    share, and the cap (2) holds across both."""
    async with proxied(dsn) as proxy_a, proxied(dsn) as proxy_b:
        pool_a = await create_pool(proxy_a.dsn, 2, client_timeout_ms=300)
        pool_b = await create_pool(proxy_b.dsn, 2, client_timeout_ms=300)
        try:
            a = make_store(pool_a, timeout=0.3, max_live=2, instance_id="a")
            b = make_store(pool_b, timeout=0.3, max_live=2, instance_id="b")
            a.instances_alive = b.instances_alive = 2  # a share of 1 each
            proxy_a.cut()
            proxy_b.cut()
            assert await a.get("CA0") is None  # A notices the outage
            assert (await admit(b, "CB1")).admitted  # in memory: not in PostgreSQL yet
            proxy_a.restore()
            assert await a._gate.probe()
            taken = [(await admit(a, call)).admitted for call in ("CA1", "CA2")]
        finally:
            pool_a.terminate()
            pool_b.terminate()
    assert taken == [True, False]


async def test_a_retried_webhook_gets_the_same_answer_and_a_replay_gets_none(pool):
    """A retry of a webhook whose stream has not started gets the first answer (the same
    token); once the call has its stream, or has ended, a replay is not admitted."""
    store = make_store(pool, max_live=5)
    first = await admit(store, "CA1")
    retry = await admit(store, "CA1", params={**PARAMS, "token": "t2"})
    assert (first.state, first.admitted, retry.state, retry.admitted) == ("new", True, "pending", True)
    assert retry.stream_params == PARAMS
    assert (await store.start_stream("jti-1", "CA1", time.time() + 60, CONNECTED)).first is True
    assert (await store.start_stream("jti-2", "CA1", time.time() + 60, CONNECTED)).first is False  # one stream, ever
    assert (await admit(store, "CA1")).state == "streaming"
    await store.set_status("CA1", "ended", 100, final_rank=100)
    replay = await admit(store, "CA1")
    assert (replay.state, replay.admitted) == ("ended", False)


async def test_a_stream_start_records_the_call_connected_once(pool):
    """The stream's start is the call's connection: its record says connected (moved, news to
    announce) in the same statement, whatever Twilio said first; nothing moves for a second
    start, nor backwards for a call Twilio already ended."""
    store = make_store(pool, max_live=5)
    for call in ("CA1", "CA2", "CA3"):
        await admit(store, call)
    await store.set_status("CA2", "in-progress", rank("in-progress"), final_rank=100)  # Twilio's callback first
    await store.set_status("CA3", "ended", 100, final_rank=100)
    first = await store.start_stream("jti-1", "CA1", time.time() + 60, CONNECTED)
    after_callback = await store.start_stream("jti-2", "CA2", time.time() + 60, CONNECTED)
    again = await store.start_stream("jti-3", "CA1", time.time() + 60, CONNECTED)
    ended = await store.start_stream("jti-4", "CA3", time.time() + 60, CONNECTED)
    assert (first.first, first.connected, after_callback.first, after_callback.connected) == (True, True, True, True)
    assert (again.first, again.connected, ended.first, ended.connected) == (False, False, False, False)
    rows = {r["call_sid"]: (r["status"], r["connected_at"] is not None, r["streamed_at"] is not None)
            for r in await pool.fetch("SELECT * FROM calls")}
    assert rows == {"CA1": ("connected", True, True), "CA2": ("connected", True, True), "CA3": ("ended", False, False)}
    assert not await store.set_status("CA1", "connected", rank("connected"), final_rank=100)  # already there


async def test_holds_count_under_the_cap_until_answered_released_or_expired(pool):
    """An outbound call's hold takes a place: past the cap nothing more is held or admitted;
    the held call's own webhook is taken even at the cap; a released hold frees its place."""
    store = make_store(pool, max_live=2)
    assert await store.hold("RS1") and await store.hold("RS2")
    assert not await store.hold("RS3")
    assert not (await admit(store, "CA9")).admitted  # an inbound caller meets a full cap
    assert (await admit(store, "CA1", charge_id="RS1")).admitted  # RS1's callee answered
    await store.release_hold("RS2")  # RS2 was busy
    assert await store.hold("RS3")
    live = await pool.fetchval("SELECT callgate_live_calls(NULL, NULL, 420, 60, 60)")
    assert live == 2  # CA1 and RS3


async def test_a_dead_instances_calls_are_ended_by_another(pool):
    """An instance that stops saying it is alive has its streaming calls ended (instance_lost)
    by the next instance's upkeep; a live instance's calls are left alone."""
    alive, dead = make_store(pool, instance_id="alive"), make_store(pool, instance_id="dead")
    for store, call in ((alive, "CA1"), (dead, "CA2")):
        await admit(store, call)
        assert (await store.start_stream(f"jti-{call}", call, time.time() + 60, CONNECTED)).first
    await pool.execute("INSERT INTO instances (instance_id, seen_at) VALUES ('alive', now()), "
                       "('dead', now() - make_interval(secs => $1))", DEAD_AFTER_S + 1)
    reaped = [r["call_sid"] for r in await pool.fetch(alive._q.instances_reap, DEAD_AFTER_S, 100)]
    rows = {r["call_sid"]: (r["status"], r["end_reason"]) for r in await pool.fetch("SELECT * FROM calls")}
    assert reaped == ["CA2"]
    assert rows == {"CA1": ("connected", None), "CA2": ("ended", "instance_lost")}


async def test_a_stream_token_is_single_use_on_this_instance_while_away(store_and_proxy):
    """While PostgreSQL is away a token can still be used once (on this instance), not twice."""
    store, proxy = store_and_proxy
    proxy.cut()
    expires = time.time() + 60
    assert (await store.start_stream("jti-1", "CA1", expires, CONNECTED)).first is True
    assert (await store.start_stream("jti-1", "CA1", expires, CONNECTED)).first is False
    assert (await store.start_stream("jti-2", "CA2", expires, CONNECTED)).first is True


async def test_with_the_database_there_records_and_refunds_happen_once(store_and_proxy):
    """A call is recorded, moves forward only, and its charge is claimed for a refund once."""
    store, _ = store_and_proxy
    assert (await admit(store, "CA2")).admitted
    assert await store.set_status("CA2", "connected", 30, final_rank=100) is True
    assert await store.set_status("CA2", "ringing", 10, final_rank=100) is False
    assert await store.claim_refund("CA2", fallback="unused") == "CA2"
    assert await store.claim_refund("CA2", fallback="unused") is None
    assert (await store.get("CA2"))["status"] == "connected"


async def test_the_cap_is_exact_under_concurrent_admissions_from_two_instances(dsn):
    """60 webhooks at once, spread over two instances' pools, for a cap of 7: exactly 7 are
    admitted (one statement each: the admission lock and a snapshot taken after it)."""
    pool_a = await create_pool(dsn, 10, client_timeout_ms=5000)
    pool_b = await create_pool(dsn, 10, client_timeout_ms=5000)
    try:
        a = make_store(pool_a, timeout=5, max_live=7, instance_id="a")
        b = make_store(pool_b, timeout=5, max_live=7, instance_id="b")
        results = await asyncio.gather(*(admit(a if i % 2 else b, f"CA{i}") for i in range(60)))
        live = await pool_a.fetchval("SELECT callgate_live_calls(NULL, NULL, 420, 60, 60)")
    finally:
        await pool_a.close()
        await pool_b.close()
    assert sum(r.admitted for r in results) == 7
    assert live == 7

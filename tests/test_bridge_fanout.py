"""Several instances on one PostgreSQL: a browser on one instance follows a call whose media
stream is on another (events travel over LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp

from appkeys import BUS, FANOUT, TOKEN_SECRET
from bridge import events, tokens
from bridge.events import EventBus
from bridge.fanout import MAX_PAYLOAD, QUEUE, PgFanout, _clip
from calls import status
from db.sql import Queries
from helpers import callgate, collect, until
from tools.fake_realtime import FakeRealtime

ORIGIN = "https://callgate.test"
ADMIN = "operator-token-" + "x" * 24


async def wait_listening(h) -> None:
    await asyncio.wait_for(h.app[FANOUT].listening.wait(), timeout=10)


@contextlib.asynccontextmanager
async def two_instances(dsn, model: FakeRealtime):
    """Instances A and B on one PostgreSQL, both listening for the other's events, and an HTTP
    session for B's browsers (their origin allowed)."""
    async with callgate(dsn, model=model, ALLOWED_ORIGINS=ORIGIN, ADMIN_TOKEN=ADMIN) as a, \
            callgate(dsn, model=model, ALLOWED_ORIGINS=ORIGIN, ADMIN_TOKEN=ADMIN) as b, aiohttp.ClientSession() as http:
        await wait_listening(a)
        await wait_listening(b)
        yield a, b, http


async def test_a_browser_follows_a_call_on_another_instance(dsn):
    """The stream is on instance A, the browser on instance B: B's subscriber sees the call's
    status and transcript, once each."""
    async with FakeRealtime(reply_text="Hello from A.") as model, two_instances(dsn, model) as (a, b, http):
        call = a.call(audio=b"")
        await call.webhook()
        token = tokens.subscription_token(b.app[TOKEN_SECRET], call.call_sid)
        browser = await http.ws_connect(b.url + "/logs", headers={"Origin": "https://callgate.test"})
        await browser.send_str(json.dumps({"type": "call.subscribe", "callSid": call.call_sid, "token": token}))
        await call.connect()
        seen = []
        async with asyncio.timeout(10):
            while not (seen and seen[-1]["type"] == "transcript.done"):
                seen.append(json.loads((await browser.receive()).data))
        await call.stop()
        async with asyncio.timeout(10):
            while seen[-1].get("status") != "ended":
                seen.append(json.loads((await browser.receive()).data))
        await browser.close()
    assert seen[-1]["reason"] == "caller_hangup"
    assert [e["text"] for e in seen if e["type"] == "transcript.done"] == ["Hello from A."]
    statuses = [e["status"] for e in seen if e["type"] == "call.status_changed"]
    assert statuses.count("ended") == 1 and "connected" in statuses


async def test_an_operator_who_subscribes_mid_call_sees_the_calls_live_on_other_instances(dsn):
    """A call streams on A and is connected; an operator then opens the all-calls monitor on B. B
    shows it at once, connected, with its record (masked number), though its status event crossed
    before anyone on B listened for it."""
    async with FakeRealtime() as model, two_instances(dsn, model) as (a, b, http):
        call = a.call(audio=b"", from_="+14155550177")
        await call.webhook()
        with collect(a.bus, call.call_sid) as sub:
            await call.connect()
            await model.wait_for_session()
            await until(sub, lambda e: e.get("status") == "connected")
        monitor = await http.ws_connect(b.url + "/logs", headers={"Origin": ORIGIN})
        await monitor.send_str(json.dumps({"type": "call.subscribe", "all": True, "adminToken": ADMIN}))
        seen = []
        async with asyncio.timeout(10):
            while not any(m["type"] == "call.details" for m in seen):
                seen.append(json.loads((await monitor.receive()).data))
        await monitor.close()
        await call.stop()
    # (The greeting's transcript may cross meanwhile: it carries no status.)
    assert [m for m in seen if m["type"] == "call.status_changed"] == [
        {"type": "call.status_changed", "callSid": call.call_sid, "status": "connected"}]
    details = seen[-1]
    assert (details["callSid"], details["number"], details["scenarioId"]) == (call.call_sid, "+1415•••0177",
                                                                               "job-interview")


def test_big_batches_are_split_under_the_notify_limit():
    """Events are packed into NOTIFY payloads under PostgreSQL's limit; long texts are cut."""
    fanout = PgFanout("postgresql://unused", None, Queries.load(), EventBus(status.rank), "test-instance")
    hindi = "नमस्ते, आपका कॉल कैसा रहा? " * 200  # 3 bytes a character in UTF-8
    batch = [events.transcript_done("CA1", f"item_{i}", "assistant", hindi if i % 2 else "x" * 5000)
             for i in range(6)]
    payloads = [payload for payload, _ in fanout._pack([_clip(e) for e in batch])]
    assert len(payloads) >= 2 and all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    assert sum(len(json.loads(p)["e"]) for p in payloads) == 6


def test_events_past_a_full_outbox_are_dropped_and_counted():
    """Fan-out never makes a call wait: past its queue, events are dropped, each one counted
    (callgate_fanout_dropped_total), and the queue still holds what came before."""
    drops: list[str] = []
    fanout = PgFanout("postgresql://unused", None, Queries.load(), EventBus(status.rank), "test-instance",
                      count_drop=drops.append)
    for i in range(QUEUE + 5):
        fanout.offer(events.status_changed(f"CA{i}", "connected"))
    assert drops == ["queue_full"] * 5
    assert fanout._outbox.qsize() == QUEUE


async def test_call_end_sent_to_another_instance_ends_the_call_where_it_streams(dsn):
    """The stream is on A; call.end reaches B: B routes it to A, which ends the call as
    ended_by_client (not as Twilio's later stop would), and B's browser sees that reason."""
    async with FakeRealtime() as model, two_instances(dsn, model) as (a, b, http):
        call = a.call(audio=b"")
        await call.webhook()
        await call.connect()
        await call.wait_for_audio(800)
        token = tokens.subscription_token(b.app[TOKEN_SECRET], call.call_sid)
        browser = await http.ws_connect(b.url + "/logs", headers={"Origin": "https://callgate.test"})
        await browser.send_json({"type": "call.subscribe", "callSid": call.call_sid, "token": token})
        assert (await browser.receive_json(timeout=5))["status"] == "connected"
        await browser.send_json({"type": "call.end", "callSid": call.call_sid})
        while (event := await browser.receive_json(timeout=10)).get("status") != "ended":
            pass
        closed = await call.wait_closed()
        await browser.close()
    assert event["reason"] == "ended_by_client" and closed is not None


async def test_the_call_start_budget_per_address_holds_across_instances(dsn):
    """One client address gets CALL_STARTS_PER_IP call.starts an hour in all, whichever
    instances its sockets land on."""
    from calls.outbound import CALL_STARTS_PER_ADDRESS as CALL_STARTS_PER_IP

    env = {"TWILIO_PHONE_NUMBER_US": "+14155550000", "ALLOWED_ORIGINS": "https://callgate.test",
           "RATE_LIMIT_PHONE_MAX_CALLS": "100", "TRUST_FLY_CLIENT_IP": "yes"}
    headers = {"Origin": "https://callgate.test", "Fly-Client-IP": "198.51.100.23"}
    async with callgate(dsn, **env) as a, callgate(dsn, **env) as b, aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(h.url + "/logs", headers=headers) for h in (a, b)]
        codes = []
        for i in range(CALL_STARTS_PER_IP + 1):
            ws = sockets[i % 2]
            await ws.send_str(json.dumps({"type": "call.start", "phoneNumber": f"+1415555{3000 + i}",
                                          "scenarioId": "customer-service", "config": {"companyName": "Acme"}}))
            reply = json.loads((await ws.receive(timeout=10)).data)
            codes.append(reply.get("code", reply["type"]))
        for ws in sockets:
            await ws.close()
    assert codes == ["call.status_changed"] * CALL_STARTS_PER_IP + ["too_many_calls"]


async def test_non_latin_transcripts_cross_instances_and_fanout_keeps_going(dsn):
    """Long Hindi transcripts (3 bytes a character) reach the other instance, cut to fit, and
    events after them still do."""
    async with callgate(dsn) as a, callgate(dsn) as b:
        await wait_listening(a)
        await wait_listening(b)
        with collect(b.app[BUS], "CA1") as sub:
            for i in range(3):
                a.app[BUS].publish(events.transcript_done("CA1", f"item_{i}", "user", "नमस्ते दुनिया " * 400))
            a.app[BUS].publish(events.status_changed("CA1", "ended"))
            got = [await asyncio.wait_for(sub.get(), 10) for _ in range(4)]
    assert [e["type"] for e in got] == ["transcript.done"] * 3 + ["call.status_changed"]
    assert got[0]["text"].startswith("नमस्ते") and got[0]["text"].endswith("…")


async def test_an_instance_that_joins_is_counted_by_the_others_at_once(dsn, monkeypatch):
    """Each instance's share of the cap while PostgreSQL is away is the cap over the instances
    it counts: a new instance tells the others, who recount then, not at their next heartbeat
    (made an hour long here, so only the news can do it)."""
    import db.calls
    from appkeys import CALL_STORE, DATABASE
    from helpers import wait_until

    monkeypatch.setattr(db.calls, "HEARTBEAT_S", 3600.0)
    async with callgate(dsn) as a:
        await wait_listening(a)
        pool = a.app[DATABASE].pool
        await wait_until(lambda: pool.fetchval("SELECT count(*) FROM instances"), what="a's first heartbeat")
        assert a.app[CALL_STORE].instances_alive == 1
        async with callgate(dsn):
            await wait_until(lambda: a.app[CALL_STORE].instances_alive == 2, timeout=10, what="a counting b")

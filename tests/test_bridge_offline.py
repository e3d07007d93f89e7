"""A whole call answered by the offline agent (no OPENAI_API_KEY): webhook, stream, greeting,
the caller's words played back, transcripts, hang-up, records."""

from __future__ import annotations

import asyncio

from appkeys import CALL_STORE, LIMITER
from helpers import callgate, collect, until, wait_until
from tools.simulate_call import silence, tone


async def test_offline_agent_greets_and_plays_the_caller_back(dsn):
    """Without a model key the call is answered: a greeting plays, what the caller says comes
    back after a pause, with transcripts saying so; the hang-up ends and records the call."""
    async with callgate(dsn) as h:
        call = h.call(audio=b"")
        twiml = await call.webhook()
        assert twiml.stream_url == "wss://callgate.test/call" and not twiml.verbs_after_connect
        assert {"token", "scenarioId", "config", "voice"} <= twiml.parameters.keys()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            await call.wait_for_audio(8000)  # a second of greeting
            spoken = tone(500, freq=300)
            await call.play(spoken + silence(800))
            events = await until(sub, lambda e: e["type"] == "transcript.done" and e["role"] == "assistant"
                                   and "Playing back" in e["text"])
            await call.wait_for_event(lambda e: e.get("event") == "media", timeout=5)
            played_back = await asyncio.wait_for(_wait_for_bytes(call, spoken[160:1600]), timeout=10)
            assert played_back
            await call.stop()
            ended = await until(sub, lambda e: e["type"] == "call.status_changed" and e["status"] == "ended")

    statuses = [e["status"] for e in events + ended if e["type"] == "call.status_changed"]
    assert statuses[0] == "connected" and statuses[-1] == "ended"
    assert ended[-1]["reason"] == "caller_hangup"
    user = [e for e in events if e["type"] == "transcript.done" and e["role"] == "user"]
    assert user and "offline agent" in user[0]["text"]
    assert call.clears >= 1  # the caller spoke over the greeting: it was cut
    assert not call.errors


async def _wait_for_bytes(call, needle: bytes) -> bool:
    while needle not in bytes(call.received_audio):
        await call.wait_for_audio(len(call.received_audio) + 800)
    return True


async def test_call_record_and_charge(dsn):
    """An answered call is recorded, charged once to its number, and marked ended."""
    async with callgate(dsn) as h:
        call = h.call(audio=b"", from_="+14155550123")
        await call.webhook()
        assert (await call.webhook()).stream_url  # Twilio retried the webhook: still one charge
        await call.connect()
        await call.wait_for_audio(800)
        await call.stop()
        await call.wait_closed()
        status = await h.app[LIMITER].test("+14155550123")
        record = await _ended_record(h, call.call_sid)
    assert status.remaining == 1
    assert record["direction"] == "inbound" and record["charge_id"] == call.call_sid
    assert record["status"] == "ended" and record["end_reason"] == "caller_hangup"


async def _ended_record(h, call_sid: str) -> dict:
    async def ended() -> dict | None:
        record = await h.app[CALL_STORE].get(call_sid)
        return record if record["status"] == "ended" else None
    return await wait_until(ended, what="the call's record to say ended")

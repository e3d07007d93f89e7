"""The call path against the loopback Realtime GA peer: a whole call, many at once, barge-in,
function calls, the time limit, and every way the model can fail."""

from __future__ import annotations

import asyncio

import pytest

from appkeys import CALL_STORE, LIFECYCLE, METRICS
from helpers import callgate, collect, hangups, is_ended, quiet_pattern, silent_call_to_its_end, until, wait_until
from tools.fake_realtime import FakeRealtime
from tools.simulate_call import silence, tone


async def test_a_full_call(dsn):
    """TwiML → stream → greeting audio reaches the caller; caller audio reaches the model in
    order; transcripts appear on the bus; stop closes the model socket; the record is right."""
    async with FakeRealtime(reply_text="Hello, how can I help?") as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        twiml = await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            session = await model.wait_for_session()
            greeting = await call.wait_for_audio(8000)
            caller_audio = quiet_pattern(1, 400)
            await call.play(caller_audio, tail_silence_ms=0)
            received = await session.wait_for_audio(len(caller_audio))
            events = await until(sub, lambda e: e["type"] == "transcript.done")
            await call.stop()
            events += await until(sub, is_ended)
            await asyncio.wait_for(session.closed.wait(), timeout=5)
        record = await h.app[CALL_STORE].get(call.call_sid)

    assert twiml.parameters["scenarioId"] == "job-interview"
    config = session.session_config
    assert config["type"] == "realtime" and config["audio"]["input"]["format"]["type"] == "audio/pcmu"
    assert config["audio"]["output"]["voice"] == "marin" and config["instructions"]
    assert session.headers["Authorization"] == "Bearer test-key" and session.model == "gpt-realtime-1.5"
    assert bytes(received[:len(caller_audio)]) == caller_audio
    assert greeting >= 8000
    assert [e["text"] for e in events if e["type"] == "transcript.done"] == ["Hello, how can I help?"]
    assert "".join(e["delta"] for e in events if e["type"] == "transcript.delta") == "Hello, how can I help?"
    assert events[0] == {"type": "call.status_changed", "callSid": call.call_sid, "status": "connected"}
    assert events[-1]["reason"] == "caller_hangup"
    assert record["status"] == "ended" and record["charge_id"] == call.call_sid
    assert not call.errors


async def test_twenty_calls_at_once_keep_their_audio_apart(dsn):
    """20 simultaneous calls, each with its own audio: every model session hears exactly one
    caller, every frame of it; every caller hears only its own session's replies."""
    n = 20
    async with FakeRealtime() as model, callgate(dsn, model=model, RATE_LIMIT_MAX_CONCURRENT_CALLS="50") as h:
        calls = [h.call(audio=b"", from_=f"+1415555{1000 + i}") for i in range(n)]
        audio = [quiet_pattern(i, 600) for i in range(n)]

        async def run(i: int) -> None:
            call = calls[i]
            assert (await call.webhook()).stream_url
            await call.connect()
            await call.wait_for_audio(8000)
            await call.play(audio[i], tail_silence_ms=0)

        await asyncio.gather(*(run(i) for i in range(n)))
        sessions = [await model.wait_for_session(i + 1) for i in range(n)]
        for s in sessions:
            await s.wait_for_audio(len(audio[0]))
        for call in calls:
            await call.stop()
        heard = {bytes(s.audio_in) for s in sessions}
        replies = {bytes(c.received_audio) for c in calls}

    assert heard == set(audio)  # each session got exactly one caller's audio, all of it, in order
    assert len(replies) == n  # each caller got its own session's (distinct) reply
    for call in calls:
        assert not call.errors


async def test_barge_in_truncates_at_the_audio_played(dsn):
    """Speech over the agent clears Twilio's buffer and truncates the item at exactly the
    audio the caller heard (from echoed marks); speech into silence does neither."""
    def reply(session_index: int, response_index: int) -> bytes:
        # The greeting is long enough to talk over; later replies are short.
        return tone(3000 if response_index == 0 else 200, freq=200, amplitude=0.2)

    async with FakeRealtime(reply_audio=reply) as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"", speed=0.5)  # slow playout: 200 ms between marks
        await call.webhook()
        await call.connect()
        session = await model.wait_for_session()
        marks = await call.wait_for_mark(4, timeout=10)
        heard = marks[-1][1]
        await call.play(tone(200, freq=500), tail_silence_ms=0)  # the caller speaks
        truncate = await session.wait_for_event("conversation.item.truncate")
        await call.wait_for_event(lambda e: e.get("event") == "clear")
        assert call.clears == 1
        assert truncate["audio_end_ms"] == heard // 8
        greeting = next(e for e in session.events_out if e["type"] == "response.output_audio.delta")
        assert truncate["item_id"] == greeting["item_id"]

        # The caller's turn ends; the short reply arrives and plays out completely...
        received = len(call.received_audio)
        await call.play(silence(600), tail_silence_ms=0)
        await call.wait_for_audio(received + 1600, timeout=10)
        await call.wait_for_mark(sum(1 for e in call.events if e.get("event") == "mark"), timeout=10)
        # ...then the caller speaks into silence: no clear, no truncate. The reply to that
        # speech arriving shows the bridge has handled its speech_started by then.
        received = len(call.received_audio)
        await call.play(tone(200, freq=500) + silence(600), tail_silence_ms=0)
        await call.wait_for_audio(received + 1600, timeout=10)
        assert call.clears == 1
        assert len(session.truncates) == 1
        await call.stop()


async def test_function_calls_run_and_answer_once(dsn):
    """A function call from the model runs from the registry; its output goes back once as a
    string, then the next response is requested; subscribers see it."""
    async with FakeRealtime(function_calls=[("get_current_time", '{"timezone": "Europe/Paris"}')]) as model, \
            callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            session = await model.wait_for_session()
            events = await until(sub, lambda e: e["type"] == "function_call")
            await session.wait_for_event("response.create")  # the greeting's
            await session.wait_for_event("response.create")  # after the output
            await call.stop()
    assert len(session.function_outputs) == 1
    output = session.function_outputs[0]["output"]
    assert isinstance(output, str) and "Europe/Paris" in output
    assert events[-1]["name"] == "get_current_time" and events[-1]["output"] == output


async def test_the_time_limit_wraps_up_then_ends_the_call(dsn):
    """Near the session limit the agent is asked to wrap up; at the limit the call ends and is
    hung up over REST."""
    async with FakeRealtime() as model, callgate(dsn, model=model, RATE_LIMIT_SESSION_DURATION="1200") as h:
        call, session, events = await silent_call_to_its_end(h)
        items = [e for e in session.events_in if e["type"] == "conversation.item.create"]
        await call.wait_closed()
    assert events[-1]["reason"] == "time_limit"
    assert any("nearly up" in str(item) for item in items)
    assert hangups(h, call.call_sid)


@pytest.mark.parametrize("fault", ["drop_after_greeting", "no_handshake", "stall", "garbage",
                                   "no_session_updated", "error_on_update"])
async def test_model_failures_end_the_call_cleanly(dsn, fault):
    """Whatever the model does wrong, the call ends within a bounded time: Twilio's socket is
    closed, the call hung up over REST, the subscribers told, nothing left running."""
    async with FakeRealtime(fault=fault) as model, \
            callgate(dsn, model=model, MODEL_READY_TIMEOUT_MS="800") as h:
        call = h.call(audio=b"")
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            events = await until(sub, is_ended, timeout=5)
        await call.wait_closed(timeout=5)
        # The handler returns once the call is finalised.
        await wait_until(lambda: not h.app[LIFECYCLE].active_calls, what="the stream handler to return")
        tasks = [t for t in asyncio.all_tasks() if call.call_sid in t.get_name() and not t.done()]
        live = dict(h.app[LIFECYCLE].calls), h.app[LIFECYCLE].active_calls
    assert events[-1]["reason"] in ("model_failed", "model_unavailable")
    assert hangups(h, call.call_sid)
    assert tasks == [] and live == ({}, 0)
    assert model.connections == 1


async def test_twilio_socket_drop_finalises_the_call_once(dsn):
    """The caller's stream drops without `stop`: the model socket closes and the call ends once."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            session = await model.wait_for_session()
            await call.wait_for_audio(800)
            await call.drop()
            events = await until(sub, is_ended)
            await asyncio.wait_for(session.closed.wait(), timeout=5)
            # Once the stream handler has returned, the call is finalised: nothing more comes.
            await wait_until(lambda: not h.app[LIFECYCLE].calls, what="the stream handler to return")
            assert sub.queue.empty()
    assert [e for e in events if is_ended(e)] == [events[-1]]
    assert events[-1]["reason"] == "stream_closed"


async def test_metrics_count_calls_frames_and_sockets(dsn):
    """/metrics shows relayed frames each way with their latency, open sockets, and calls by
    outcome, with no number in any label."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"", from_="+14155550188")
        await call.webhook()
        await call.connect()
        session = await model.wait_for_session()
        await call.wait_for_audio(8000)
        await call.play(quiet_pattern(3, 200), tail_silence_ms=0)
        await session.wait_for_audio(1600)
        during = h.app[METRICS].render().decode()
        await call.stop()
        await call.wait_closed()
        await wait_until(lambda: 'callgate_calls_total{outcome="caller_hangup"} 1.0' in h.app[METRICS].render().decode(),
                         what="the call to be counted")
        after = h.app[METRICS].render().decode()
    assert 'callgate_open_sockets{kind="twilio"} 1.0' in during
    assert 'callgate_active_calls 1.0' in during
    frames = {line.split("} ")[0]: float(line.split("} ")[1]) for line in after.splitlines()
              if line.startswith("callgate_relay_frames_total{")}
    assert frames['callgate_relay_frames_total{direction="caller_to_model"'] >= 10
    assert frames['callgate_relay_frames_total{direction="model_to_caller"'] >= 10
    assert 'callgate_relay_latency_seconds_bucket{direction="model_to_caller",le="0.1"}' in after
    assert 'callgate_open_sockets{kind="twilio"} 0.0' in after and "5550188" not in after


async def test_a_model_that_stops_answering_mid_call_ends_the_call(dsn):
    """After a good start the model goes quiet: once a reply is overdue the call is ended and
    hung up, instead of leaving the caller in silence until the time limit."""
    async with FakeRealtime(fault="stall_after_greeting") as model, \
            callgate(dsn, model=model, MODEL_READY_TIMEOUT_MS="800") as h:
        call = h.call(audio=b"")
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            await call.wait_for_audio(8000)  # the greeting came
            await call.play(tone(300, freq=500) + silence(600), tail_silence_ms=0)  # a turn, no reply
            events = await until(sub, is_ended, timeout=10)
    assert events[-1]["reason"] == "model_failed"
    assert hangups(h, call.call_sid)


async def test_end_call_lets_the_goodbye_play(dsn):
    """When the agent calls end_call, its goodbye (the reply to the tool's output) plays to the
    end before the call is hung up."""
    def reply(session_index: int, response_index: int) -> bytes:
        return tone(1000 if response_index != 2 else 1500, freq=200 + 100 * response_index, amplitude=0.2)

    async with FakeRealtime(reply_audio=reply, function_calls=[("end_call", '{"reason": "done"}')],
                            first_call_response=1) as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"", speed=2.0)
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            await call.wait_for_played(8000, timeout=10)  # the greeting has played
            await call.play(tone(300, freq=500) + silence(600), tail_silence_ms=0)  # the caller's turn
            events = await until(sub, is_ended, timeout=15)
    goodbye = reply(0, 2)
    assert events[-1]["reason"] == "agent_ended"
    assert [e["name"] for e in events if e["type"] == "function_call"] == ["end_call"]
    assert call.received_audio.endswith(goodbye)
    assert call.played_bytes == len(call.received_audio)  # every byte was heard, the goodbye too


async def test_a_silent_twilio_leg_ends_the_call(dsn, monkeypatch):
    """Twilio streams continuously; a stream that goes quiet without closing is treated as gone."""
    import bridge.call

    monkeypatch.setattr(bridge.call, "CALLER_IDLE_TIMEOUT_S", 0.5)
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call, session, events = await silent_call_to_its_end(h, timeout=5)  # it sends nothing at all
        await asyncio.wait_for(session.closed.wait(), timeout=5)
    assert events[-1]["reason"] == "stream_closed"


async def test_caller_audio_before_the_model_is_ready_is_kept(dsn):
    """Audio the caller sends while the model connection opens reaches the model, in order,
    after the greeting request."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"", speed=50.0)  # a burst: most of it lands before the model is ready
        await call.webhook()
        early = quiet_pattern(7, 1000)
        await call.connect()
        await call.play(early, tail_silence_ms=0)
        session = await model.wait_for_session()
        assert bytes(await session.wait_for_audio(len(early)))[:len(early)] == early
        kinds = [e["type"] for e in session.events_in]
        assert kinds.index("response.create") < kinds.index("input_audio_buffer.append")
        await call.stop()

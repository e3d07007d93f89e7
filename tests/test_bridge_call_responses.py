"""How a call fares when the model's responses go wrong the way the real API's do: failed and
incomplete responses, a response refused because another is active, a keypress, a failed
transcription, and a greeting that keeps the scenario's persona. Through the real server and
the strict loopback model; each test asserts what the caller or the frontend would notice."""

from __future__ import annotations

import logging

import pytest

import bridge.call
from bridge.call import APOLOGY
from helpers import callgate, collect, hangups, is_ended, silent_call, silent_call_to_its_end, until
from scenarios import DEFAULT_SCENARIO, SCENARIOS
from tools.fake_realtime import FakeRealtime
from tools.realtime_types import check_client_event
from tools.simulate_call import silence, tone


@pytest.fixture
def quick_retries(monkeypatch):
    """Back-offs in tens of milliseconds: the rule under test is the count, not the wait."""
    monkeypatch.setattr(bridge.call, "RESPONSE_RETRY_DELAYS_S", (0.02, 0.05))


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def reply(ms_by_response: dict[int, int], default_ms: int = 400):
    """reply_audio for the fake: response k lasts ms_by_response[k] ms, each one distinct."""
    def audio(session_index: int, response_index: int) -> bytes:
        ms = ms_by_response.get(response_index, default_ms)
        return tone(ms, freq=200 + 50 * response_index, amplitude=0.2)
    return audio


async def test_a_failed_greeting_is_asked_for_again_and_heard(dsn, quick_retries):
    """The greeting's response fails with a server error: it is asked for again, and the
    caller hears it; the call goes on."""
    async with FakeRealtime(response_faults={0: "server_error"}, reply_audio=reply({1: 500})) as model, \
            callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_audio(4000)
        assert len(of_type(session.events_in, "response.create")) == 2
        assert bytes(call.received_audio[:4000]) == reply({1: 500})(0, 1)
        await call.stop()


@pytest.mark.parametrize("fault", ["server_error", "rate_limit"])
async def test_when_every_response_fails_the_caller_hears_an_apology_and_the_call_ends(
        dsn, quick_retries, caplog, fault):
    """Every response fails: after a bounded number of retries the caller hears the recorded
    apology (all of it), the frontend sees the call end as model_failed, the call is hung
    up, and the log names the error's code and type, and no number."""
    caplog.set_level(logging.INFO)
    async with FakeRealtime(response_fault=fault) as model, callgate(dsn, model=model) as h:
        call, session, events = await silent_call_to_its_end(h, from_="+14155550142")
        await call.wait_closed()
    assert events[-1]["reason"] == "model_failed"
    assert len(of_type(session.events_in, "response.create")) == 1 + len(bridge.call.RESPONSE_RETRY_DELAYS_S)
    assert bytes(call.received_audio) == APOLOGY and call.played_bytes == len(APOLOGY)
    assert hangups(h, call.call_sid)
    code = {"server_error": "server_error", "rate_limit": "rate_limit_exceeded"}[fault]
    failures = [r.getMessage() for r in caplog.records if "response failed" in r.getMessage()]
    assert len(failures) == 3 and all(code in line for line in failures)
    assert "5550142" not in caplog.text


async def test_a_reply_stopped_by_the_content_filter_is_followed_by_a_redirect(dsn):
    """A reply cut by the content filter: the model is told so, and asked for a reply that
    steers back; the caller hears it and the call goes on."""
    async with FakeRealtime(response_faults={0: "content_filter"}, reply_audio=reply({0: 1000, 1: 300})) as model, \
            callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_audio(4000 + 2400)  # half the cut greeting, then all of the next reply
        notes = [e["item"]["content"][0]["text"] for e in of_type(session.events_in, "conversation.item.create")
                 if e["item"].get("role") == "system"]
        assert any("content filter" in n for n in notes)
        audio = reply({0: 1000, 1: 300})
        assert bytes(call.received_audio[:6400]) == audio(0, 0)[:4000] + audio(0, 1)
        assert not call.closed
        await call.stop()


async def test_a_call_whose_replies_are_all_filtered_ends_as_content_filter(dsn):
    """Three replies in one call stopped by the content filter: the caller hears the apology
    and the call ends with reason content_filter."""
    async with FakeRealtime(response_fault="content_filter") as model, callgate(dsn, model=model) as h:
        call, session, events = await silent_call_to_its_end(h)
    assert events[-1]["reason"] == "content_filter"
    assert len(of_type(session.events_in, "response.create")) == bridge.call.MAX_FILTERED_RESPONSES
    assert bytes(call.received_audio).endswith(APOLOGY)


async def test_a_reply_out_of_tokens_is_continued_once(dsn):
    """Replies that run out of output tokens: the first is continued once, and a continuation
    that runs out too is left as it is (no loop of responses); the call goes on."""
    async with FakeRealtime(response_fault="max_output_tokens", reply_audio=reply({}, 1000)) as model, \
            callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_audio(2 * 4000)  # half of each of the two responses
        await session.wait_for_event("response.create")
        await session.wait_for_event("response.create")
        with pytest.raises(TimeoutError):  # the model is idle now: no third ask
            await session.wait_for_event("response.create", timeout=0.3)
        assert not call.closed
        await call.stop()


async def test_the_wrap_up_asked_mid_reply_waits_for_it_and_the_goodbye_plays(dsn):
    """The wrap-up comes while the agent is still talking: its response is asked for once that
    reply is done (never refused), the goodbye plays to the end, and the call ends as
    time_limit, with the reply before it not cut."""
    audio = reply({0: 5000, 1: 300})
    async with FakeRealtime(reply_audio=audio, pace=1.0) as model, \
            callgate(dsn, model=model, RATE_LIMIT_SESSION_DURATION="6000") as h:  # wrap-up at 4.5 s
        call, session, events = await silent_call_to_its_end(h)
    assert events[-1]["reason"] == "time_limit"
    assert [e["error"]["code"] for e in of_type(session.events_out, "error")] == []
    assert bytes(call.received_audio) == audio(0, 0) + audio(0, 1)  # the reply, then the goodbye
    assert call.played_bytes == len(call.received_audio)
    wrap_up = [e for e in of_type(session.events_in, "conversation.item.create") if "nearly up" in str(e)]
    assert len(wrap_up) == 1


async def test_a_keypress_gets_an_answer(dsn):
    """A keypress after the greeting: the model is told which key, asked for a response, and
    the caller hears it without saying a word."""
    audio = reply({0: 300, 1: 400})
    async with FakeRealtime(reply_audio=audio) as model, callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_played(2400)
        await call.send_dtmf("1")
        await call.wait_for_audio(2400 + 3200)
        pressed = [e for e in of_type(session.events_in, "conversation.item.create") if e["item"].get("role") == "user"]
        assert len(pressed) == 1 and "key 1" in pressed[0]["item"]["content"][0]["text"]
        assert bytes(call.received_audio[2400:5600]) == audio(0, 1)
        await call.stop()


async def test_a_keypress_during_a_reply_is_answered_after_it(dsn):
    """A keypress while the agent talks: its response is asked for when that reply is done,
    not refused and lost; the caller hears the whole reply, then the answer."""
    audio = reply({0: 2000, 1: 400})
    async with FakeRealtime(reply_audio=audio, pace=1.0) as model, callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_audio(1600)  # the greeting is under way
        await call.send_dtmf("#")
        await call.wait_for_audio(16000 + 3200, timeout=10)
        assert bytes(call.received_audio[:19200]) == audio(0, 0) + audio(0, 1)
        assert of_type(session.events_out, "error") == []
        await call.stop()


async def test_a_failed_transcription_reaches_the_frontend(dsn, caplog):
    """The caller's turn cannot be transcribed: followers get a transcript.done for that turn
    marked failed, and the log names the error code."""
    caplog.set_level(logging.WARNING)
    async with FakeRealtime(transcription_fault=True) as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            await call.wait_for_played(8000)
            await call.play(tone(300, freq=500) + silence(600), tail_silence_ms=0)
            events = await until(sub, lambda e: e["type"] == "transcript.done" and e["role"] == "user")
            await call.stop()
    done = events[-1]
    assert done["failed"] is True and done["text"] == "" and done["itemId"].startswith("item_")
    assert "audio_unintelligible" in caplog.text


async def test_the_greeting_keeps_the_scenario_persona(dsn):
    """The greeting is made with the session's instructions (the scenario's persona and
    rules), not replaced by instructions on its response.create; it still says the
    scenario's greeting."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        create = await session.wait_for_event("response.create")
        await call.wait_for_audio(8000)
        await call.stop()
    scenario = SCENARIOS[DEFAULT_SCENARIO]
    config = scenario.validate({}, lenient=True)
    assert "response" not in create
    assert session.response_instructions[0] == scenario.instructions(config) == session.session_config["instructions"]
    notes = [str(e) for e in of_type(session.events_in, "conversation.item.create")]
    assert scenario.greeting(config) in notes[0]


async def test_every_client_event_of_a_whole_call_is_valid_for_the_sdk(dsn):
    """A call that uses every kind of client event (session.update, the greeting, audio,
    barge-in truncation, a function output and its follow-up, a keypress, the wrap-up):
    each one validates against the official SDK's client-event types, with no unknown
    field."""
    audio = reply({0: 3000}, 300)
    async with FakeRealtime(reply_audio=audio, function_calls=[("get_current_time", '{"timezone": "UTC"}')],
                            first_call_response=1) as model, \
            callgate(dsn, model=model, RATE_LIMIT_SESSION_DURATION="4000") as h:
        call = h.call(audio=b"", speed=1.0)
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            session = await model.wait_for_session()
            await call.wait_for_mark(3)
            await call.play(tone(200, freq=500) + silence(600), tail_silence_ms=0)  # barge-in, a turn
            await session.wait_for_event("conversation.item.truncate")
            await call.send_dtmf("5")
            await until(sub, is_ended, timeout=10)
    kinds = {e["type"] for e in session.events_in}
    items = {(e["item"]["type"], e["item"].get("role")) for e in of_type(session.events_in, "conversation.item.create")}
    assert kinds == {"session.update", "conversation.item.create", "response.create",
                     "input_audio_buffer.append", "conversation.item.truncate"}
    assert items == {("message", "system"), ("message", "user"), ("function_call_output", None)}
    assert [check_client_event(e) for e in session.events_in] == [None] * len(session.events_in)


async def test_a_keypress_during_a_response_that_fails_is_still_answered(dsn, quick_retries):
    """The caller presses a key while the greeting is being made, and the greeting fails: the
    retry goes out once, covering the keypress too, and the caller hears its answer."""
    audio = reply({1: 400})
    async with FakeRealtime(response_faults={0: "server_error"}, reply_audio=audio, pace=1.0, chunk_ms=300) as model, \
            callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await session.wait_for_event("response.create")  # the greeting's: it fails 300 ms later
        await call.send_dtmf("3")
        await call.wait_for_audio(3200, timeout=10)
        creates = of_type(session.events_in, "response.create")
        assert bytes(call.received_audio[:3200]) == audio(0, 1) and len(creates) == 2
        kinds = [(e["type"], e.get("item", {}).get("role")) for e in session.events_in
                 if e["type"] in ("conversation.item.create", "response.create")]
        assert kinds.index(("conversation.item.create", "user")) < len(kinds) - 1  # the key came before the retry
        await call.stop()


async def test_a_conversation_item_the_model_refuses_does_not_make_the_bridge_ask_in_a_loop(dsn, monkeypatch, caplog):
    """The model refuses the item a keypress adds: the bridge logs it and asks for one
    response (the model answers the conversation it has), not one after every response."""
    from tools import fake_realtime

    original = fake_realtime.FakeSession._on_item_create

    async def refuse_user_items(self, event):
        if (event.get("item") or {}).get("role") == "user":
            raise fake_realtime.ClientError("invalid_value", "Invalid value for 'item.content'.", "item.content")
        await original(self, event)

    monkeypatch.setattr(fake_realtime.FakeSession, "_on_item_create", refuse_user_items)
    async with FakeRealtime(reply_audio=reply({0: 200}, 200)) as model, callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_played(1600)
        await call.send_dtmf("1")
        await session.wait_for_event("response.create")  # the greeting's
        await session.wait_for_event("response.create")  # the keypress's
        with pytest.raises(TimeoutError):
            await session.wait_for_event("response.create", timeout=0.5)
        await call.stop()
    assert "refused a conversation item" in caplog.text


async def test_each_reply_out_of_tokens_gets_its_continuation(dsn):
    """Two replies in one call run out of output tokens, with a finished one between them:
    each gets its one continuation (the rule is once per cut, not once per call)."""
    async with FakeRealtime(response_faults={0: "max_output_tokens", 2: "max_output_tokens"},
                            reply_audio=reply({}, 400)) as model, callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_audio(1600 + 3200)  # half the greeting, then its whole continuation
        await call.play(tone(300, freq=500) + silence(600), tail_silence_ms=0)  # response 2, cut
        continuations = 0
        while continuations < 2:  # a missing second one times out
            continuations += "cut off" in str(await session.wait_for_event("conversation.item.create"))
        await call.stop()

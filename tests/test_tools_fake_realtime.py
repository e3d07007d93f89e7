"""The loopback Realtime peer (tools/fake_realtime.py) against a real websockets client."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from tools.fake_realtime import FakeBug, FakeRealtime, is_speech
from tools.realtime_types import check_server_event

UNIT = 0.1  # seconds; waits for "nothing arrives" are small multiples of it
GA_SESSION = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "audio": {"input": {"format": {"type": "audio/pcmu"}},
              "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"}},
}
TONE = bytes([0x00, 0x80]) * 80  # 20 ms of full-scale square wave in μ-law
SILENCE = b"\xff" * 160  # 20 ms of μ-law silence


@contextlib.asynccontextmanager
async def client(fake: FakeRealtime, key: str = "test-key", **headers: str):
    headers = {"Authorization": f"Bearer {key}", **headers}
    async with connect(f"{fake.url}?model=gpt-realtime", additional_headers=headers,
                       proxy=None, open_timeout=2, max_size=2**24) as ws:
        yield ws


async def recv(ws: ClientConnection, timeout: float = 2.0) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws: ClientConnection, type: str) -> list[dict]:
    """Every event up to and including the first of `type`."""
    events = [await recv(ws)]
    while events[-1]["type"] != type:
        events.append(await recv(ws))
    return events


async def send(ws: ClientConnection, event: dict) -> None:
    await ws.send(orjson.dumps(event).decode())


async def ready(ws: ClientConnection, session: dict = GA_SESSION) -> dict:
    """Do the GA handshake; the session.updated event."""
    assert (await recv(ws))["type"] == "session.created"
    await send(ws, {"type": "session.update", "session": session})
    return await recv(ws)


async def append(ws: ClientConnection, audio: bytes) -> None:
    await send(ws, {"type": "input_audio_buffer.append",
                    "audio": base64.b64encode(audio).decode()})


def audio_of(events: list[dict]) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events
                    if e["type"] == "response.output_audio.delta")


def of_type(events: list[dict], type: str) -> list[dict]:
    return [e for e in events if e["type"] == type]


# ---------------------------------------------------------------- handshake


async def test_wrong_or_missing_key_is_refused_with_401_and_counted():
    """A wrong or missing key gets HTTP 401 and still counts as a connection."""
    async with FakeRealtime() as fake:
        with pytest.raises(InvalidStatus) as refused:
            async with client(fake, key="wrong"):
                pass
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            async with connect(fake.url, proxy=None):
                pass
        assert fake.connections == 2
        assert fake.sessions == []


async def test_beta_header_gets_beta_api_shape_disabled_and_close():
    """The beta header is accepted, then answered with beta_api_shape_disabled and a close."""
    async with FakeRealtime() as fake, client(fake, **{"OpenAI-Beta": "realtime=v1"}) as ws:
        event = await recv(ws)
        assert event["type"] == "error"
        assert event["error"]["code"] == "beta_api_shape_disabled"
        with pytest.raises(ConnectionClosed):
            await recv(ws)


async def test_ga_handshake_records_model_and_session_config():
    """session.created, then session.update is answered by session.updated with merged fields."""
    async with FakeRealtime() as fake, client(fake) as ws:
        created = await recv(ws)
        assert created["type"] == "session.created"
        assert created["session"]["id"].startswith("sess_")
        assert created["session"]["type"] == "realtime"
        assert created["event_id"].startswith("event_")
        await send(ws, {"type": "session.update", "session": GA_SESSION})
        updated = await recv(ws)
        assert updated["type"] == "session.updated"
        assert updated["session"]["audio"]["output"]["voice"] == "marin"
        assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        session = await fake.wait_for_session()
        assert session.model == "gpt-realtime"
        assert session.headers["authorization"] == "Bearer test-key"
        assert session.session_config == GA_SESSION
        assert (await session.wait_for_event("session.update"))["session"] == GA_SESSION


@pytest.mark.parametrize(("session", "code", "param"), [
    ({"type": "realtime", "voice": "alloy"}, "unknown_parameter", "session.voice"),
    ({"input_audio_format": "g711_ulaw"}, "unknown_parameter", "session.input_audio_format"),
    ({"instructions": "hi"}, "missing_required_parameter", "session.type"),
    ({"type": "realtime", "audio": {"output": {"format": {"type": "g711_ulaw"}}}},
     "invalid_value", "session.audio.output.format.type"),
])
async def test_session_update_in_beta_shape_is_refused(session, code, param):
    """Flat beta fields, a missing type or a beta format name get an error, not session.updated."""
    async with FakeRealtime() as fake, client(fake) as ws:
        event = await ready(ws, session)
        assert event["type"] == "error"
        assert (event["error"]["code"], event["error"]["param"]) == (code, param)
        assert (await fake.wait_for_session()).session_config is None


# ---------------------------------------------------------------- responses


async def test_response_streams_reply_audio_and_transcript():
    """response.create streams reply_audio in chunk_ms deltas with the transcript alongside."""
    reply = bytes(range(256)) * 10  # 320 ms
    async with FakeRealtime(reply_audio=reply, reply_text="Hi there.") as fake, \
            client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        types = [e["type"] for e in events]
        assert types[:4] == ["response.created", "response.output_item.added",
                             "conversation.item.added", "response.content_part.added"]
        assert audio_of(events) == reply
        assert [len(base64.b64decode(e["delta"])) for e in
                of_type(events, "response.output_audio.delta")] == [800, 800, 800, 160]
        deltas = of_type(events, "response.output_audio_transcript.delta")
        text = "".join(e["delta"] for e in deltas)
        assert text == "Hi there."
        assert of_type(events, "response.output_audio_transcript.done")[0]["transcript"] == text
        done = events[-1]["response"]
        assert done["status"] == "completed"
        assert done["output"][0]["status"] == "completed"
        assert done["output"][0]["content"][0]["transcript"] == text
        item_id = done["output"][0]["id"]
        assert (await fake.wait_for_session()).produced_ms(item_id) == 320
        assert (await recv(ws))["type"] == "rate_limits.updated"


async def test_default_reply_audio_differs_per_session_and_response():
    """Without reply_audio each session and response gets its own loud second of audio."""
    async with FakeRealtime() as fake:
        replies = []
        for _ in range(2):
            async with client(fake) as ws:
                await ready(ws)
                for _ in range(2):
                    await send(ws, {"type": "response.create"})
                    replies.append(audio_of(await recv_until(ws, "response.done")))
        assert replies == [fake.reply_audio_for(s, r) for s in (0, 1) for r in (0, 1)]
        assert len(set(replies)) == 4
        assert all(len(r) == 8000 and is_speech(r) for r in replies)


async def test_cancel_stops_an_active_response_and_refuses_overlaps():
    """A second response.create is refused; response.cancel ends the response as cancelled."""
    async with FakeRealtime(pace=1.0, chunk_ms=20) as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_audio.delta")
        await send(ws, {"type": "response.create"})
        refused = await recv_until(ws, "error")
        assert refused[-1]["error"]["code"] == "conversation_already_has_active_response"
        await send(ws, {"type": "response.cancel"})
        events = await recv_until(ws, "response.done")
        assert events[-1]["response"]["status"] == "cancelled"
        assert events[-1]["response"]["status_details"]["reason"] == "client_cancelled"
        assert len(audio_of(refused + events)) < 8000
        await send(ws, {"type": "response.cancel"})
        late = await recv_until(ws, "error")
        assert late[-1]["error"]["code"] == "response_cancel_not_active"


async def test_paced_response_takes_real_time():
    """pace=1 spreads the audio over its own duration."""
    reply = b"\x10" * 1600  # 200 ms
    async with FakeRealtime(pace=1.0, reply_audio=reply, chunk_ms=50) as fake, \
            client(fake) as ws:
        await ready(ws)
        loop = asyncio.get_running_loop()
        await send(ws, {"type": "response.create"})
        start = loop.time()
        await recv_until(ws, "response.done")
        assert 0.14 <= loop.time() - start < 1.0


# ---------------------------------------------------------------- input audio


async def test_vad_reports_speech_then_silence_and_replies():
    """A tone then silence gives speech_started/stopped, a transcript and an automatic reply."""
    async with FakeRealtime(silence_ms=100) as fake, client(fake) as ws:
        await ready(ws)
        await append(ws, SILENCE * 5)
        await append(ws, TONE * 15)  # 300 ms of speech, from 100 ms
        started = await recv(ws)
        assert started["type"] == "input_audio_buffer.speech_started"
        assert started["audio_start_ms"] == 100
        await append(ws, SILENCE * 5)
        events = await recv_until(ws, "response.done")
        types = [e["type"] for e in events]
        assert types[:6] == [
            "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
            "conversation.item.added", "conversation.item.done",
            "conversation.item.input_audio_transcription.delta",
            "conversation.item.input_audio_transcription.completed"]
        assert events[0]["audio_end_ms"] == 400
        assert {e["item_id"] for e in events[:2]} == {started["item_id"]}
        assert events[5]["transcript"] == "caller said 300 ms of audio"
        assert events[6]["type"] == "response.created"
        session = await fake.wait_for_session()
        assert await session.wait_for_audio(1000) == SILENCE * 5 + TONE * 15 + SILENCE * 5


async def test_vad_without_create_response_only_transcribes():
    """turn_detection.create_response False: the turn is committed but nothing replies."""
    no_reply = {**GA_SESSION, "audio": {"input": {"turn_detection": {
        "type": "server_vad", "create_response": False}}}}
    async with FakeRealtime(silence_ms=100) as fake, client(fake) as ws:
        await ready(ws, no_reply)
        await append(ws, TONE * 10 + SILENCE * 5)
        await recv_until(ws, "conversation.item.input_audio_transcription.completed")
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=UNIT)


async def test_record_audio_false_keeps_no_audio_but_still_detects_speech():
    """record_audio=False: appends are not stored, VAD still answers them."""
    async with FakeRealtime(silence_ms=100, record_audio=False) as fake, client(fake) as ws:
        await ready(ws)
        await append(ws, TONE * 10 + SILENCE * 5)
        # Read to the end: a websockets client whose queue is full cannot finish its close.
        events = await recv_until(ws, "response.done")
        assert "input_audio_buffer.speech_stopped" in [e["type"] for e in events]
        session = await fake.wait_for_session()
        assert session.audio_in == bytearray()
        assert [e["type"] for e in session.events_in] == ["session.update"]


async def test_speech_interrupts_an_active_response():
    """Speech during a response cancels it (turn_detected), as the real server_vad does."""
    async with FakeRealtime(pace=1.0, chunk_ms=20) as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_audio.delta")
        await append(ws, TONE)
        events = await recv_until(ws, "response.done")
        assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
        assert events[-1]["response"]["status"] == "cancelled"
        assert events[-1]["response"]["status_details"]["reason"] == "turn_detected"


# ---------------------------------------------------------------- truncation


async def test_truncate_beyond_produced_audio_errors_and_within_is_accepted():
    """Truncating past the audio produced errors like the real API; within it is confirmed."""
    async with FakeRealtime(reply_audio=b"\x10" * 4000) as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        item_id = (await recv_until(ws, "response.done"))[-1]["response"]["output"][0]["id"]
        truncate = {"type": "conversation.item.truncate", "item_id": item_id,
                    "content_index": 0}
        await send(ws, {**truncate, "audio_end_ms": 501})
        error = (await recv_until(ws, "error"))[-1]["error"]
        assert error["code"] == "invalid_value"
        assert error["message"] == "Audio content of 500 ms is already shorter than 501 ms"
        await send(ws, {**truncate, "audio_end_ms": 500})
        truncated = await recv(ws)
        assert truncated == {**truncated, "type": "conversation.item.truncated",
                             "item_id": item_id, "audio_end_ms": 500}
        await send(ws, {**truncate, "item_id": "item_nope", "audio_end_ms": 0})
        assert (await recv(ws))["error"]["code"] == "invalid_value"
        assert len((await fake.wait_for_session()).truncates) == 3


# ---------------------------------------------------------------- function calls


async def test_function_call_round_trip():
    """The first response is a function call; its output is recorded; the next one speaks."""
    async with FakeRealtime(function_calls=[("end_call", '{"reason": "done"}')]) as fake, \
            client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        call = of_type(events, "response.output_item.done")[0]["item"]
        assert (call["type"], call["name"], call["arguments"], call["status"]) == (
            "function_call", "end_call", '{"reason": "done"}', "completed")
        assert of_type(events, "response.function_call_arguments.done")[0]["call_id"] == \
            call["call_id"]
        assert audio_of(events) == b""
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}
        await send(ws, {"type": "conversation.item.create", "item": output})
        assert (await recv_until(ws, "conversation.item.added"))[-1]["item"]["call_id"] == \
            call["call_id"]
        await send(ws, {"type": "response.create"})
        assert audio_of(await recv_until(ws, "response.done"))
        session = await fake.wait_for_session()
        assert [o["output"] for o in session.function_outputs] == ["ok"]


@pytest.mark.parametrize(("change", "code"), [
    ({"call_id": "call_unknown"}, "invalid_value"),
    ({"output": {"not": "a string"}}, "invalid_type"),
])
async def test_bad_function_call_output_is_refused(change, code):
    """An output for an unknown call, or not a string, gets an error and is not recorded."""
    async with FakeRealtime(function_calls=[("lookup", "{}")]) as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        call_id = of_type(events, "response.output_item.done")[0]["item"]["call_id"]
        item = {"type": "function_call_output", "call_id": call_id, "output": "x", **change}
        await send(ws, {"type": "conversation.item.create", "item": item})
        assert (await recv_until(ws, "error"))[-1]["error"]["code"] == code
        assert (await fake.wait_for_session()).function_outputs == []


# ---------------------------------------------------------------- robustness and helpers


async def test_bad_frames_get_errors_and_the_session_survives():
    """Non-JSON, binary and unknown events each get an error; the session keeps working."""
    async with FakeRealtime() as fake, client(fake) as ws:
        await ready(ws)
        await ws.send("{not json")
        assert (await recv(ws))["error"]["code"] == "invalid_json"
        await ws.send(b'{"type": "response.create"}')
        assert (await recv(ws))["error"]["code"] == "invalid_json"
        await send(ws, {"type": "no.such.event", "event_id": "mine"})
        error = (await recv(ws))["error"]
        assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "type",
                                                                      "mine")
        await send(ws, {"type": "response.create"})
        assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "completed"


async def test_wait_for_event_returns_each_event_once():
    """wait_for_event hands out events of a type in order, including ones already received."""
    async with FakeRealtime() as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.cancel", "n": 1})
        await send(ws, {"type": "response.cancel", "n": 2})
        session = await fake.wait_for_session()
        assert (await session.wait_for_event("response.cancel"))["n"] == 1
        assert (await session.wait_for_event("response.cancel"))["n"] == 2
        with pytest.raises(TimeoutError):
            await session.wait_for_event("response.cancel", timeout=UNIT)


async def test_session_send_and_drop():
    """session.send_unchecked pushes any event; session.drop closes with 1011 and sets closed."""
    async with FakeRealtime() as fake, client(fake) as ws:
        await recv(ws)
        session = await fake.wait_for_session()
        await session.send_unchecked({"type": "custom.event"})
        assert (await recv(ws))["type"] == "custom.event"
        await session.drop()
        with pytest.raises(ConnectionClosedError) as closed:
            await recv(ws)
        assert closed.value.rcvd.code == 1011
        await asyncio.wait_for(session.closed.wait(), 1)


# ---------------------------------------------------------------- faults


async def test_fault_drop_after_greeting_cuts_tcp_after_response_done():
    """drop_after_greeting: response.done arrives, then TCP dies without a close frame."""
    async with FakeRealtime(fault="drop_after_greeting") as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "completed"
        with pytest.raises(ConnectionClosedError) as closed:
            await recv(ws)
        assert closed.value.rcvd is None


async def test_fault_no_handshake_times_out_the_client():
    """no_handshake: TCP is accepted and counted, the upgrade never answered."""
    async with FakeRealtime(fault="no_handshake") as fake:
        with pytest.raises(TimeoutError):
            async with connect(fake.url, proxy=None, open_timeout=2 * UNIT,
                               additional_headers={"Authorization": "Bearer test-key"}):
                pass
        assert fake.connections == 1
        assert fake.sessions == []


async def test_fault_stall_never_sends():
    """stall: the handshake completes, then nothing is ever sent, not even errors."""
    async with FakeRealtime(fault="stall") as fake, client(fake) as ws:
        await ws.send("{not json")
        await send(ws, {"type": "session.update", "session": GA_SESSION})
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=2 * UNIT)
        assert (await fake.wait_for_session()).events_in[0]["type"] == "session.update"


async def test_fault_garbage_sends_non_json_then_typeless_json():
    """garbage: a non-JSON text frame, then a JSON object without "type", then silence."""
    async with FakeRealtime(fault="garbage") as fake, client(fake) as ws:
        with pytest.raises(orjson.JSONDecodeError):
            await recv(ws)
        assert "type" not in await recv(ws)
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=UNIT)


async def test_fault_no_session_updated_ignores_the_update():
    """no_session_updated: session.created comes, session.update is never answered."""
    async with FakeRealtime(fault="no_session_updated") as fake, client(fake) as ws:
        assert (await recv(ws))["type"] == "session.created"
        await send(ws, {"type": "session.update", "session": GA_SESSION})
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=UNIT)


async def test_fault_error_on_update_answers_with_an_error():
    """error_on_update: session.update gets an error event and no session.updated."""
    async with FakeRealtime(fault="error_on_update") as fake, client(fake) as ws:
        event = await ready(ws)
        assert event["type"] == "error"
        assert event["error"]["code"] == "invalid_request_error"
        with pytest.raises(TimeoutError):
            await recv(ws, timeout=UNIT)


def test_unknown_fault_is_refused():
    """A misspelt fault fails at construction, naming the choices."""
    with pytest.raises(ValueError, match="fault='stal'"):
        FakeRealtime(fault="stal")


# ---------------------------------------------------------------- strictness (the SDK's types)


@pytest.mark.parametrize(("event", "code", "param"), [
    ({"type": "response.create", "response": {"instructions": "x", "temperature": 0.7}},
     "unknown_parameter", "response.temperature"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": 5}]}},
     "invalid_type", "item.content[0].text"),
    ({"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0},
     "missing_required_parameter", "audio_end_ms"),
    ({"type": "input_audio_buffer.append", "audio": "AAAA", "format": "pcmu"},
     "unknown_parameter", "format"),
])
async def test_client_events_the_sdk_refuses_get_the_real_error(event, code, param):
    """An unknown field, a wrong type or a missing field gets the API's error shape, naming
    the parameter and echoing the client's event_id; the event is listed as refused and
    has no effect."""
    async with FakeRealtime() as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {**event, "event_id": "evt_mine"})
        error = await recv(ws)
        assert error["type"] == "error" and error["event_id"].startswith("event_")
        assert error["error"]["type"] == "invalid_request_error"
        assert (error["error"]["code"], error["error"]["param"], error["error"]["event_id"]) == (code, param, "evt_mine")
        session = await fake.wait_for_session()
        assert [e["event_id"] for e, _ in session.refused] == ["evt_mine"]
        assert session.response_instructions == [] and session.truncates == []


async def test_every_server_event_validates_against_the_sdk():
    """Over a session with speech, a reply, a function call and a truncation, every event the
    fake sent validates against the SDK's server-event types with no unknown field (pcmu
    carries no rate; a transcription carries its usage)."""
    async with FakeRealtime(silence_ms=100, function_calls=[("lookup", "{}")], first_call_response=1) as fake, \
            client(fake) as ws:
        updated = await ready(ws)
        assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.done")
        await append(ws, TONE * 10 + SILENCE * 5)
        events = await recv_until(ws, "response.done")
        completed = of_type(events, "conversation.item.input_audio_transcription.completed")[0]
        assert completed["usage"] == {"type": "duration", "seconds": 0.2}
        session = await fake.wait_for_session()
    assert fake.invalid_sent == []
    assert [check_server_event(e) for e in session.events_out] == [None] * len(session.events_out)


async def test_a_server_event_the_sdk_refuses_is_a_bug_in_the_fake():
    """The fake refuses to send an event the SDK's types refuse, and says so."""
    async with FakeRealtime() as fake, client(fake) as ws:
        await recv(ws)
        session = await fake.wait_for_session()
        with pytest.raises(FakeBug, match="usage"):
            await session.send({"type": "conversation.item.input_audio_transcription.completed",
                                "item_id": "item_1", "content_index": 0, "transcript": "hi"})
        assert len(fake.invalid_sent) == 1


@pytest.mark.parametrize(("fault", "error"), [
    ("server_error", {"type": "server_error", "code": "server_error"}),
    ("rate_limit", {"type": "invalid_request_error", "code": "rate_limit_exceeded"}),
])
async def test_failed_responses_look_like_the_real_ones(fault, error):
    """A failed response: response.created, then response.done with status failed, no
    output, and the error in status_details; a rate limit also reports none left."""
    async with FakeRealtime(response_fault=fault) as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        done = events[-1]["response"]
        assert events[0]["type"] == "response.created"
        assert (done["status"], done["output"]) == ("failed", [])
        assert done["status_details"]["type"] == "failed"
        assert {k: done["status_details"]["error"][k] for k in ("type", "code")} == error
        assert audio_of(events) == b""
        limits = [e for e in events if e["type"] == "rate_limits.updated"]
        assert [[lim["remaining"] for lim in e["rate_limits"]] for e in limits] == (
            [[0, 0]] if fault == "rate_limit" else [])
        # The response is over: another may be asked for at once.
        await send(ws, {"type": "response.create"})
        assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "failed"
    assert fake.invalid_sent == []


@pytest.mark.parametrize("reason", ["max_output_tokens", "content_filter"])
async def test_incomplete_responses_stop_halfway_with_their_reason(reason):
    """An incomplete response carries half its audio, an incomplete item, and the reason."""
    reply = bytes(range(256)) * 25  # 800 ms: 8 chunks of 100 ms
    async with FakeRealtime(response_faults={0: reason}, reply_audio=reply) as fake, client(fake) as ws:
        await ready(ws)
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "response.done")
        done = events[-1]["response"]
        assert (done["status"], done["status_details"]) == ("incomplete", {"type": "incomplete", "reason": reason})
        assert done["output"][0]["status"] == "incomplete"
        assert audio_of(events) == reply[:3200]
        await send(ws, {"type": "response.create"})  # only response 0 was faulty
        assert audio_of(await recv_until(ws, "response.done")) == reply
    assert fake.invalid_sent == []


async def test_a_failed_transcription_looks_like_the_real_one():
    """transcription_fault: the turn is committed as usual, then its transcription fails with
    an error object instead of completing (and no delta comes first)."""
    async with FakeRealtime(silence_ms=100, transcription_fault=True) as fake, client(fake) as ws:
        await ready(ws)
        await append(ws, TONE * 10 + SILENCE * 5)
        events = await recv_until(ws, "conversation.item.input_audio_transcription.failed")
        failed = events[-1]
        committed = of_type(events, "input_audio_buffer.committed")[0]
        assert failed["item_id"] == committed["item_id"] and failed["content_index"] == 0
        assert failed["error"]["code"] == "audio_unintelligible" and failed["error"]["type"] == "invalid_request_error"
        assert of_type(events, "conversation.item.input_audio_transcription.delta") == []
    assert fake.invalid_sent == []


async def test_response_instructions_replace_the_sessions_for_that_response():
    """A response.create with instructions is made with those, not the session's; one
    without uses the session's (what a greeting must rely on to keep its persona)."""
    async with FakeRealtime() as fake, client(fake) as ws:
        await ready(ws, {**GA_SESSION, "instructions": "You are Ada, a recruiter."})
        await send(ws, {"type": "response.create", "response": {"instructions": "Say hi."}})
        await recv_until(ws, "response.done")
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.done")
        session = await fake.wait_for_session()
    assert session.response_instructions == ["Say hi.", "You are Ada, a recruiter."]


async def test_session_faults_hit_only_their_session():
    """session_faults: session 1 fails every response, session 2 drops after its greeting;
    session 0 is served as usual (what a scenario with healthy neighbours relies on)."""
    async with FakeRealtime(session_faults={1: "server_error", 2: "drop_after_greeting"}) as fake:
        statuses = []
        for _ in range(3):
            async with client(fake) as ws:
                await ready(ws)
                await send(ws, {"type": "response.create"})
                statuses.append((await recv_until(ws, "response.done"))[-1]["response"]["status"])
                try:
                    await send(ws, {"type": "response.create"})
                    statuses.append((await recv_until(ws, "response.done"))[-1]["response"]["status"])
                except ConnectionClosedError as closed:
                    statuses.append(closed.rcvd)
    assert statuses == ["completed", "completed", "failed", "failed", "completed", None]
    with pytest.raises(ValueError, match="session fault 'no_handshake'"):
        FakeRealtime(session_faults={0: "no_handshake"})


def test_unknown_response_fault_is_refused():
    """A misspelt response fault fails at construction, naming the choices."""
    with pytest.raises(ValueError, match="response fault 'timeout'"):
        FakeRealtime(response_faults={0: "timeout"})

"""The wire formats, pure: Twilio Media Streams and OpenAI Realtime GA, tested with plain dicts."""

from __future__ import annotations

import base64

import orjson
import pytest

from bridge import realtime, twilio


def frame(**message) -> str:
    return orjson.dumps(message).decode()


def test_start_is_parsed_and_what_the_relay_ignores_cannot_refuse_it():
    """Twilio's start becomes a typed Start; fields the relay never reads (mediaFormat, tracks)
    are not parsed, so odd values there refuse nothing."""
    event = twilio.parse(frame(event="start", sequenceNumber="1", streamSid="MZ1", start={
        "streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound"],
        "customParameters": {"token": "t", "scenarioId": "job-interview"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": "1"}}))
    assert event == twilio.Start("MZ1", "CA1", "AC1", {"token": "t", "scenarioId": "job-interview"})
    odd = twilio.parse(frame(event="start", start={"streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1",
                                                   "mediaFormat": {"sampleRate": "eight thousand"}, "tracks": 5}))
    assert odd == twilio.Start("MZ1", "CA1", "AC1", {})


def test_media_mark_dtmf_stop_are_parsed():
    """media, mark, dtmf and stop become typed events; the payload passes through untouched."""
    payload = base64.b64encode(b"\xff" * 160).decode()
    assert twilio.parse(frame(event="media", media={"track": "inbound", "chunk": "3", "timestamp": "60",
                                                    "payload": payload})) == twilio.Media(payload)
    assert twilio.parse(frame(event="mark", mark={"name": "item_1.4"})) == twilio.Mark("item_1.4")
    assert twilio.parse(frame(event="dtmf", dtmf={"track": "inbound_track", "digit": "5"})) == twilio.Dtmf("5")
    assert twilio.parse(frame(event="stop", stop={"callSid": "CA1"})) == twilio.Stop()
    assert twilio.parse(frame(event="something-new")) is None


@pytest.mark.parametrize("bad", [
    "not json", "[1]", frame(no_event=1), frame(event="media"),
    frame(event="media", media={"payload": 5}),
    frame(event="mark", mark={}), frame(event="start", start={"callSid": "CA1"}),
])
def test_malformed_frames_raise_protocol_error(bad):
    """Malformed frames raise ProtocolError with a reason, never anything else."""
    with pytest.raises(twilio.ProtocolError):
        twilio.parse(bad)


def test_outbound_frames_are_valid_json_text():
    """media, mark and clear frames we build are the JSON Twilio documents."""
    assert orjson.loads(twilio.media("MZ1", "AAA=")) == {"event": "media", "streamSid": "MZ1", "media": {"payload": "AAA="}}
    assert orjson.loads(twilio.mark("MZ1", "item_1.2")) == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "item_1.2"}}
    assert orjson.loads(twilio.clear("MZ1")) == {"event": "clear", "streamSid": "MZ1"}


def test_safe_ids_refuse_anything_needing_escapes():
    """Only plain ids go into hand-built frames."""
    assert twilio.safe_id("MZ0123abc") and twilio.safe_id("item_AbC-1")
    assert not any(twilio.safe_id(s) for s in ('a"b', "a\\b", "", "é", "a b"))


def test_session_update_is_ga_shaped():
    """session.update uses the GA shape: type realtime, pcmu in and out, server VAD, voice, tools."""
    update = realtime.session_update(instructions="Be brief.", voice="marin", tools=[{"type": "function", "name": "x"}],
                                     transcription_model="gpt-live-transcribe")
    session = update["session"]
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-live-transcribe"}
    assert update["type"] == "session.update" and session["type"] == "realtime"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "marin"}
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert "input_audio_format" not in session and "voice" not in session


def test_append_audio_is_valid_json():
    """The hand-built input_audio_buffer.append is the JSON it claims to be."""
    payload = base64.b64encode(bytes(range(256))).decode()
    assert orjson.loads(realtime.append_audio(payload)) == {"type": "input_audio_buffer.append", "audio": payload}


def test_base64_checks():
    """Payload checks accept base64 and count decoded bytes without decoding."""
    for n in (0, 1, 2, 3, 159, 160, 800):
        text = base64.b64encode(b"x" * n).decode()
        assert realtime.is_base64(text) and realtime.base64_len(text) == n
    assert not realtime.is_base64('AA"}') and not realtime.is_base64("A A")


def test_decode_refuses_non_events():
    """decode() returns None for frames that are not JSON objects with a type."""
    assert realtime.decode("nope") is None and realtime.decode("{}") is None and realtime.decode("[]") is None
    assert realtime.decode('{"type":"session.created"}') == {"type": "session.created"}

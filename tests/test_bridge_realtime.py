"""bridge/realtime.py, pure: the OpenAI Realtime GA client events we build and the server
events we read, tested with plain dicts."""

from __future__ import annotations

import base64

import orjson

from bridge import realtime


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

"""OpenAI Realtime (GA) wire format: the client events we send, and the facts we need from
the server events we receive. Pure: no I/O.

GA shape: ``session.type`` is ``"realtime"``; audio formats live under ``session.audio.input``
and ``session.audio.output``; server audio arrives as ``response.output_audio.delta``. We keep
μ-law end to end (``audio/pcmu``), so nothing is resampled.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# Error codes that are expected around barge-in and need no action: a cancel that raced the
# response's own end.
BENIGN_ERROR_CODES = frozenset({"response_cancel_not_active"})
# Our response.create came while another response was active: ask again after that one.
ACTIVE_RESPONSE = "conversation_already_has_active_response"
TRANSCRIPTION_FAILED = "conversation.item.input_audio_transcription.failed"

# Server events that carry transcript text: type → (role, "delta" or "done", the text's field).
TRANSCRIPT_EVENTS = {
    "response.output_audio_transcript.delta": ("assistant", "delta", "delta"),
    "response.output_audio_transcript.done": ("assistant", "done", "transcript"),
    "conversation.item.input_audio_transcription.delta": ("user", "delta", "delta"),
    "conversation.item.input_audio_transcription.completed": ("user", "done", "transcript"),
}

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")

PCMU = {"type": "audio/pcmu"}


def session_update(*, instructions: str, voice: str, tools: list[dict[str, Any]],
                   transcription_model: str) -> dict[str, Any]:
    return {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "instructions": instructions,
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": PCMU,
                    "transcription": {"model": transcription_model},
                    "turn_detection": {"type": "server_vad", "create_response": True, "interrupt_response": True},
                },
                "output": {"format": PCMU, "voice": voice},
            },
            "tools": tools,
            "tool_choice": "auto" if tools else "none",
        },
    }


def append_audio(payload: str) -> str:
    """``input_audio_buffer.append`` as text: built by hand, it runs 50 times a second per call
    and ``payload`` is base64 from Twilio (checked by the caller), which needs no escaping."""
    return '{"type":"input_audio_buffer.append","audio":"' + payload + '"}'


def is_base64(text: str) -> bool:
    return _BASE64.fullmatch(text) is not None


def response_create(event_id: str) -> dict[str, Any]:
    """A response with the session's own instructions and tools. (``response.instructions``
    would replace the session's for that response: the scenario's persona would be lost.)
    ``event_id`` comes back in an ``error`` about this event."""
    return {"type": "response.create", "event_id": event_id}


def truncate(item_id: str, content_index: int, audio_end_ms: int) -> dict[str, Any]:
    return {"type": "conversation.item.truncate", "item_id": item_id,
            "content_index": content_index, "audio_end_ms": audio_end_ms}


def function_output(call_id: str, output: str, item_id: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"id": item_id, "type": "function_call_output", "call_id": call_id, "output": output}}


def user_text(text: str, item_id: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"id": item_id, "type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": text}]}}


def system_text(text: str, item_id: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"id": item_id, "type": "message", "role": "system",
                     "content": [{"type": "input_text", "text": text}]}}


def encode(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def decode(frame: str | bytes) -> dict[str, Any] | None:
    """A server frame → its event dict, or None when it is not a JSON object with a type."""
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    return event


def base64_len(payload: str) -> int:
    """Decoded byte count of a base64 string, without decoding it."""
    n = len(payload)
    if n == 0:
        return 0
    return n * 3 // 4 - (2 if payload.endswith("==") else 1 if payload.endswith("=") else 0)

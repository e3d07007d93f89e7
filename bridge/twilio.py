"""Twilio Media Streams wire format, both directions. Pure: no I/O.

Twilio sends JSON text frames whose numbers are strings; ``parse`` turns a frame into one of
the small typed events below (numbers cast), or raises ``ProtocolError``. The builders return
the text frames we send: ``media``, ``mark`` and ``clear`` (text only: Twilio rejects binary
frames with error 31950).

Audio payloads stay base64 text end to end: Twilio's ``media.payload`` is base64 μ-law, and the
model's ``input_audio_buffer.append`` wants base64 ``audio/pcmu``, so the hot path never
decodes or re-encodes audio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson


class ProtocolError(ValueError):
    """A frame that is not valid Twilio Media Streams JSON."""


# Each event holds only what Callgate reads. A field the relay ignores (tracks, mediaFormat,
# a media frame's timestamp and chunk) is never parsed, so it can never refuse a stream.


@dataclass(frozen=True, slots=True)
class Connected:
    pass


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str  # checked against TWILIO_ACCOUNT_SID
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Media:
    payload: str  # base64 μ-law, passed through untouched (50 frames a second per call)


@dataclass(frozen=True, slots=True)
class Mark:
    name: str


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class Stop:
    pass


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop


def _obj(message: dict, name: str) -> dict:
    value = message.get(name)
    if not isinstance(value, dict):
        raise ProtocolError(f"{message.get('event')} without a {name!r} object")
    return value


def _str(obj: dict, name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{where} without {name!r}")
    return value


def parse(frame: str | bytes) -> TwilioEvent | None:
    """One Twilio frame → a typed event; None for events we do not use. Raises ProtocolError."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    event = message.get("event")
    if event == "media":
        media = _obj(message, "media")
        payload = media.get("payload")
        if not isinstance(payload, str):
            raise ProtocolError("media without a payload")
        return Media(payload)
    if event == "mark":
        return Mark(_str(_obj(message, "mark"), "name", "mark"))
    if event == "start":
        start = _obj(message, "start")
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError("start.customParameters is not an object")
        return Start(
            stream_sid=_str(start, "streamSid", "start") if "streamSid" in start else _str(message, "streamSid", "start"),
            call_sid=_str(start, "callSid", "start"),
            account_sid=str(start.get("accountSid", "")),
            custom_parameters={str(k): str(v) for k, v in params.items()},
        )
    if event == "dtmf":
        return Dtmf(_str(_obj(message, "dtmf"), "digit", "dtmf"))
    if event == "stop":
        return Stop()
    if event == "connected":
        return Connected()
    if isinstance(event, str):
        return None  # an event Twilio may add later: not ours to refuse
    raise ProtocolError("frame without an 'event'")


# --- server → Twilio. Hand-built strings: these run 50 times a second per call, and every
# value placed in them is base64 or one of our own ids, which need no JSON escaping. ---


def media(stream_sid: str, payload: str) -> str:
    return '{"event":"media","streamSid":"' + stream_sid + '","media":{"payload":"' + payload + '"}}'


def mark(stream_sid: str, name: str) -> str:
    return '{"event":"mark","streamSid":"' + stream_sid + '","mark":{"name":"' + name + '"}}'


def clear(stream_sid: str) -> str:
    return '{"event":"clear","streamSid":"' + stream_sid + '"}'


def safe_id(value: str) -> bool:
    """True when ``value`` can be placed in a hand-built frame without escaping."""
    return value.isascii() and value.replace("_", "").replace("-", "").isalnum()

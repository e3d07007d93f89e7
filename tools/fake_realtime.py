"""A loopback OpenAI Realtime (GA) peer for tests, the call simulator and benchmarks.

This machine cannot reach OpenAI, so ``FakeRealtime`` speaks the GA wire format on
``ws://127.0.0.1:<port>/v1/realtime`` and records what the client sent::

    async with FakeRealtime(reply_text="Hi.") as fake:
        ...  # point the bridge at fake.url
        session = await fake.wait_for_session()
        await session.wait_for_event("response.create")

Handshake: ``Authorization: Bearer <api_key>`` is required (else HTTP 401 with OpenAI's
JSON error body, code ``invalid_api_key``); a request carrying ``OpenAI-Beta: realtime=v1``
is accepted, then told ``beta_api_shape_disabled`` and closed. The ``model`` query parameter
is recorded; with ``models`` given, a session for any other model is accepted, sent the
``error`` ``model_not_found`` and closed with 4000 (the API's close for a refused request,
reason ``<error type>.<code>``).

Client events handled:
    session.update                  validated for the GA shape → session.updated or error
    input_audio_buffer.append       recorded; server VAD on μ-law → speech_started/stopped,
                                    committed, user item, transcription, auto response
    input_audio_buffer.commit       commits buffered audio (≥ 100 ms) as a user item
    input_audio_buffer.clear        → input_audio_buffer.cleared
    conversation.item.create        message / function_call / function_call_output items
    conversation.item.truncate      checked against the audio produced for the item
    response.create                 an audio response (or a scripted function call)
    response.cancel                 stops the active response → response.done "cancelled"
Every client event is first checked against the official ``openai`` SDK's types
(``tools/realtime_types.py``): an unknown field, a missing or badly typed one gets the
``error`` the real API sends (``unknown_parameter``, ``missing_required_parameter``,
``invalid_type``, ``invalid_value``, with ``param`` and the client's ``event_id``).
Anything else, non-JSON frames and binary frames get an ``error`` event too; the peer
never crashes on input. Every server event is checked against the SDK's types before it
is sent (an invalid one is a bug in the fake: FakeBug).

Server events sent: session.created, session.updated, error, input_audio_buffer.*,
conversation.item.added / .done / .truncated,
conversation.item.input_audio_transcription.delta / .completed / .failed, response.created,
response.output_item.added / .done, response.content_part.added / .done,
response.output_audio.delta / .done, response.output_audio_transcript.delta / .done,
response.function_call_arguments.delta / .done, response.done, rate_limits.updated
(after every response.done: noise that clients must ignore).

Like the real server_vad, speech starting while a response is active cancels it
(``response.done`` status "cancelled", reason "turn_detected") unless
``turn_detection.interrupt_response`` is False; a client's later ``response.cancel``
then gets the benign ``response_cancel_not_active``.

Faults (constructor ``fault``, applied to every connection):
    drop_after_greeting   after the first response.done, cut TCP (no close frame)
    stall_after_greeting  after the first response.done, still hear the caller (VAD events,
                          transcripts) but never start another response
    no_handshake          accept TCP, never answer the HTTP upgrade
    stall                 complete the handshake, then never send anything
    garbage               send a non-JSON frame and a JSON frame without "type", then nothing
    no_session_updated    send session.created, never answer session.update
    error_on_update       answer session.update with an error, never session.updated

Per response (``response_fault`` for all, ``response_faults`` by index): ``server_error``
and ``rate_limit`` fail the response (``response.done`` status failed, with
``status_details.error``); ``max_output_tokens`` and ``content_filter`` stop it halfway
(status incomplete, with ``status_details.reason``). ``transcription_fault`` fails every
caller turn's transcription (``conversation.item.input_audio_transcription.failed``).
Per session (``session_faults``, by 0-based session index): any fault above but
``no_handshake``, for that session alone (a scenario's one faulty call among healthy ones).

CLI: ``python tools/fake_realtime.py --port 9100 [--pace 1] [--fault stall] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import signal
import sys
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

# Run as a script, this folder (tools/) is on sys.path, the repository root is not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bridge import mulaw  # noqa: E402
from tools.realtime_types import check_client_event, check_server_event  # noqa: E402

logger = logging.getLogger(__name__)

PATH = "/v1/realtime"
FAULTS = frozenset({
    "drop_after_greeting", "stall_after_greeting", "no_handshake", "stall", "garbage", "no_session_updated",
    "error_on_update",
})
# Per-response faults (``response_fault`` / ``response_faults``): how real responses end badly.
# A failed response carries status_details.error; an incomplete one a reason, after part of
# its audio.
FAILED_RESPONSES = {
    "server_error": {"type": "server_error", "code": "server_error",
                     "message": "The server had an error while processing your request. Sorry about that!"},
    "rate_limit": {"type": "invalid_request_error", "code": "rate_limit_exceeded",
                   "message": "Rate limit reached for requests. Please try again in 1.2s."},
}
INCOMPLETE_RESPONSES = frozenset({"max_output_tokens", "content_filter"})
RESPONSE_FAULTS = frozenset(FAILED_RESPONSES) | INCOMPLETE_RESPONSES
# What one session may be given (``session_faults``): a connection fault that happens after
# the handshake, or a fault of every one of its responses.
SESSION_FAULTS = (FAULTS - {"no_handshake"}) | RESPONSE_FAULTS
TRANSCRIPTION_ERROR = {"type": "invalid_request_error", "code": "audio_unintelligible",
                       "message": "The audio could not be transcribed.", "param": None}
AUDIO_FORMATS = frozenset({"audio/pcmu", "audio/pcma", "audio/pcm"})
# Fields of the beta session shape that the GA API rejects at the top of `session`.
BETA_FIELDS = (
    "input_audio_format", "output_audio_format", "voice", "modalities", "turn_detection",
    "input_audio_transcription", "input_audio_noise_reduction",
)
BYTES_PER_MS = mulaw.BYTES_PER_MS
VAD_CHUNK = 160  # 20 ms, the size of a Twilio media frame
SPEECH_RMS = 500
MIN_COMMIT_MS = 100  # the real API refuses to commit less than 100 ms of audio
MAX_MESSAGE = 16 * 2**20
# How the API closes a session it refused after the handshake, as reported for invalid_model
# (close 4000, reason "invalid_request_error.invalid_model"; livekit/agents-js#1756).
REFUSED_CLOSE_CODE = 4000

ReplyAudio = bytes | Callable[[int, int], bytes] | None


# ---------------------------------------------------------------- pure helpers


_ULAW_SQUARED = tuple(mulaw.decode(code) ** 2 for code in range(256))


def is_speech(chunk: bytes) -> bool:
    """True when a μ-law chunk's RMS exceeds SPEECH_RMS (μ-law silence is 0xFF / 0x7F)."""
    if not chunk:
        return False
    mean_square = sum(map(_ULAW_SQUARED.__getitem__, chunk)) / len(chunk)
    return mean_square > SPEECH_RMS**2


def default_reply_audio(session_index: int, response_index: int) -> bytes:
    """One second of loud, deterministic μ-law noise, different for every session and response.

    Every 32-byte block differs, so reordered or duplicated chunks show in a comparison.
    """
    blocks = (
        hashlib.sha256(f"fake-realtime:{session_index}:{response_index}:{k}".encode()).digest()
        for k in range(1000 * BYTES_PER_MS // 32)
    )
    return b"".join(blocks)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def merge(base: dict, update: dict) -> dict:
    """A copy of `base` with `update` applied recursively (how session.update combines).
    An object whose ``type`` changes is replaced whole: ``audio/pcmu`` has no ``rate``."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) == old.get("type"):
            merged[key] = merge(old, value)
        else:
            merged[key] = value
    return merged


def split_evenly(text: str, parts: int) -> list[str]:
    """`text` cut into `parts` consecutive pieces (some maybe empty) whose join is `text`."""
    parts = max(parts, 1)
    return [text[len(text) * i // parts:len(text) * (i + 1) // parts] for i in range(parts)]


class FakeBug(AssertionError):
    """The fake was about to send an event the SDK's types refuse: a bug in the fake."""


class ClientError(Exception):
    """A client event the real API would refuse; becomes an `error` event, never a crash."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.type = code, message, param, type


def check_session_update(session: Any) -> None:
    """Raise ClientError where `session` is not a valid GA session.update payload."""
    if not isinstance(session, dict):
        raise ClientError("missing_required_parameter",
                          "Missing required parameter: 'session'.", "session")
    for name in BETA_FIELDS:
        if name in session:
            raise ClientError("unknown_parameter",
                              f"Unknown parameter: 'session.{name}'.", f"session.{name}")
    if "type" not in session:
        raise ClientError("missing_required_parameter",
                          "Missing required parameter: 'session.type'.", "session.type")
    if session["type"] != "realtime":
        raise ClientError("invalid_value", f"Invalid value: {session['type']!r}. "
                          "Supported values are: 'realtime'.", "session.type")
    audio = session.get("audio") or {}
    for direction in ("input", "output"):
        fmt = ((audio.get(direction) or {}).get("format") or {}).get("type")
        if fmt is not None and fmt not in AUDIO_FORMATS:
            raise ClientError(
                "invalid_value",
                f"Invalid value: {fmt!r}. Supported values are: {sorted(AUDIO_FORMATS)}.",
                f"session.audio.{direction}.format.type")


def default_session(model: str) -> dict:
    """The session object of session.created, with the real API's defaults."""
    return {
        "id": new_id("sess"), "object": "realtime.session", "type": "realtime",
        "model": model, "expires_at": int(time.time()) + 3600,
        "output_modalities": ["audio"], "instructions": "", "tools": [],
        "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None, "noise_reduction": None,
                "turn_detection": {
                    "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                    "silence_duration_ms": 200, "idle_timeout_ms": None,
                    "create_response": True, "interrupt_response": True,
                },
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy",
                       "speed": 1.0},
        },
    }


def usage(input_ms: int, output_ms: int, text: str) -> dict:
    """Plausible token counts (about 20 audio tokens a second) for response.done."""
    audio_in, audio_out, text_out = input_ms // 50, output_ms // 50, len(text) // 4
    return {
        "total_tokens": audio_in + audio_out + text_out,
        "input_tokens": audio_in, "output_tokens": audio_out + text_out,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_in,
                                "cached_tokens": 0},
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


# ---------------------------------------------------------------- one response


@dataclass
class _Response:
    """A response being produced; `cancel()` makes the producer stop at the next chunk."""

    id: str
    index: int
    task: asyncio.Task | None = None
    cancel_reason: str | None = None
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def pause_until(self, deadline: float) -> None:
        """Wait for `deadline` (loop time) or a cancel, whichever comes first."""
        delay = deadline - asyncio.get_running_loop().time()
        if delay <= 0:
            # Even unpaced, yield so the reader can see a response.cancel between chunks.
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cancelled.wait(), delay)


# ---------------------------------------------------------------- one connection


class FakeSession:
    """One accepted connection: what the client sent, plus helpers to wait and to misbehave."""

    def __init__(self, fake: FakeRealtime, ws: ServerConnection, index: int) -> None:
        self.fake, self.ws, self.index = fake, ws, index
        self.fault = fake.fault_for(index)
        query = parse_qs(urlsplit(ws.request.path).query)
        self.model: str | None = query.get("model", [None])[0]
        self.headers: Headers = ws.request.headers
        self.config = default_session(self.model or "gpt-realtime")
        self.events_in: list[dict] = []
        self.events_out: list[dict] = []
        self.session_config: dict | None = None
        self.audio_in = bytearray()
        self.truncates: list[dict] = []
        # Client events the SDK's types refuse (unknown or badly typed fields), with why.
        self.refused: list[tuple[dict, Any]] = []
        self.function_outputs: list[dict] = []
        # The instructions each response was made with, in order: the session's, unless the
        # response.create carried response.instructions (which replace them for that one).
        self.response_instructions: list[str] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Condition()
        self._by_type: dict[str, list[dict]] = {}
        self._consumed: dict[str, int] = {}
        self._items: dict[str, dict] = {}
        self._produced: dict[str, int] = {}  # item id → bytes of audio produced
        self._call_ids: set[str] = set()
        self._last_item_id: str | None = None
        self._response: _Response | None = None
        self._responses = 0
        self._answered = 0  # responses that reached response.done
        self._received = 0  # bytes of input audio, recorded or not
        # Server VAD state, all positions in bytes of audio_in.
        self._vad_pending = bytearray()
        self._vad_pos = 0
        self._uncommitted = 0
        self._speech_item: str | None = None
        self._speech_start = 0
        self._speech_end = 0
        self._silence = 0

    # ------------------------------------------------------------ public helpers

    async def send(self, event: dict) -> None:
        """Send one server event (an `event_id` is added when missing) as a JSON text frame.
        Raises FakeBug (and records it in ``fake.invalid_sent``) for an event the SDK's
        server-event types refuse, or that carries a field they do not know."""
        event = dict(event)
        event.setdefault("event_id", new_id("event"))
        problem = check_server_event(event)
        if problem is not None:
            self.fake.invalid_sent.append((event, problem))
            raise FakeBug(f"fake realtime would send an invalid {event.get('type')!r}: {problem}")
        await self.send_unchecked(event)

    async def send_unchecked(self, event: dict) -> None:
        """Send any JSON object as a text frame (tests use it to misbehave on purpose)."""
        self.events_out.append(event)
        await self.ws.send(orjson.dumps(event), text=True)

    async def drop(self) -> None:
        """Close the connection with code 1011, as the API does on an internal error."""
        await self.ws.close(1011, "fake model dropped the session")

    def abort(self) -> None:
        """Cut the TCP connection without a close frame: the client sees 1006."""
        self.ws.transport.abort()

    async def wait_for_event(self, type: str, timeout: float = 5.0) -> dict:
        """The first client event of `type` not returned by an earlier call (maybe already here).

        Raises TimeoutError (listing what did arrive) when none comes within `timeout`.
        """
        def next_unconsumed() -> dict | None:
            seen, used = self._by_type.get(type, []), self._consumed.get(type, 0)
            if used < len(seen):
                self._consumed[type] = used + 1
                return seen[used]
            return None

        return await self._wait(next_unconsumed, timeout, f"a client {type!r} event")

    async def wait_for_audio(self, nbytes: int, timeout: float = 5.0) -> bytes:
        """All audio received so far, once at least `nbytes` have been appended."""
        def enough() -> bytes | None:
            return bytes(self.audio_in) if len(self.audio_in) >= nbytes else None

        return await self._wait(enough, timeout, f"{nbytes} bytes of input audio")

    def produced_ms(self, item_id: str) -> int:
        """Milliseconds of audio sent so far for an item (0 for unknown or non-audio items)."""
        return self._produced.get(item_id, 0) // BYTES_PER_MS

    # ------------------------------------------------------------ the connection's story

    async def run(self) -> None:
        """Greet (or misbehave, per the fault), then answer client events until the socket closes."""
        try:
            if self.headers.get("OpenAI-Beta", "").strip().lower() == "realtime=v1":
                await self._refuse_beta()
                return
            if self.fake.models is not None and self.model not in self.fake.models:
                await self._refuse_model()
                return
            await self._greet()
            async for message in self.ws:
                await self._receive(message)
        except ConnectionClosed:
            pass
        finally:
            if self._response is not None and self._response.task is not None:
                self._response.task.cancel()
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    async def _refuse_beta(self) -> None:
        await self._send_error(ClientError(
            "beta_api_shape_disabled",
            "The Realtime API beta shape is no longer supported: remove the "
            "'OpenAI-Beta: realtime=v1' header and send GA session fields."))
        await self.ws.close(1008, "beta_api_shape_disabled")

    async def _refuse_model(self) -> None:
        error = ClientError("model_not_found", f"The model `{self.model}` does not exist or you do "
                            "not have access to it.")
        await self._send_error(error)
        await self.ws.close(REFUSED_CLOSE_CODE, f"{error.type}.{error.code}")

    async def _greet(self) -> None:
        fault = self.fault
        if fault == "stall":
            return
        if fault == "garbage":
            await self.ws.send("this is not JSON {")
            await self.send_unchecked({"note": "this event has no type"})
            return
        await self.send({"type": "session.created", "session": self.config})

    async def _receive(self, message: str | bytes) -> None:
        """Parse, record and answer one client frame; every failure becomes an error event."""
        # A wedged peer (stall, garbage) reads and records but never answers, not even errors.
        wedged = self.fault in ("stall", "garbage")
        event = None
        try:
            event = self._parse(message)
            if self.fake.record_audio or event["type"] != "input_audio_buffer.append":
                await self._record(event)
            if wedged:
                return
            if event["type"] == "session.update":
                check_session_update(event.get("session"))  # the beta shape, named as such
            problem = check_client_event(event)
            if problem is not None:
                self.refused.append((event, problem))
                raise ClientError(problem.code, problem.message, problem.param)
            handler = self._handlers().get(event.get("type"))
            if handler is None:
                raise ClientError("invalid_value", f"Invalid value: {event.get('type')!r}: "
                                  "not a supported client event type.", "type")
            await handler(event)
        except ClientError as error:
            if not wedged:
                await self._send_error(error, event)
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("fake realtime session %d: handler failed", self.index)
            await self._send_error(ClientError("server_error", "The fake model failed.",
                                               type="server_error"), event)

    def _parse(self, message: str | bytes) -> dict:
        if isinstance(message, bytes):
            raise ClientError("invalid_json", "Binary frames are not supported: send each "
                              "event as JSON in a text frame.")
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError:
            raise ClientError("invalid_json", "The event is not valid JSON.") from None
        if not isinstance(event, dict):
            raise ClientError("invalid_json", "The event must be a JSON object.")
        if not isinstance(event.get("type"), str):
            raise ClientError("missing_required_parameter",
                              "Missing required parameter: 'type'.", "type")
        return event

    async def _record(self, event: dict) -> None:
        self.events_in.append(event)
        self._by_type.setdefault(event["type"], []).append(event)
        async with self._changed:
            self._changed.notify_all()

    def _handlers(self) -> dict[str, Callable[[dict], Any]]:
        return {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_audio_append,
            "input_audio_buffer.commit": self._on_audio_commit,
            "input_audio_buffer.clear": self._on_audio_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.truncate": self._on_truncate,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
        }

    async def _send_error(self, error: ClientError, event: dict | None = None) -> None:
        await self.send({"type": "error", "error": {
            "type": error.type, "code": error.code, "message": error.message,
            "param": error.param, "event_id": (event or {}).get("event_id"),
        }})

    async def _wait(self, found: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    return await self._changed.wait_for(found)
        except TimeoutError:
            types = [e.get("type") for e in self.events_in]
            raise TimeoutError(f"no {what} within {timeout} s; received {types}") from None

    # ------------------------------------------------------------ session.update

    async def _on_session_update(self, event: dict) -> None:
        if self.fault == "no_session_updated":
            return  # the client has to notice the silence by itself
        if self.fault == "error_on_update":
            raise ClientError("invalid_request_error", "The fake model refuses every update.")
        session = event.get("session")
        check_session_update(session)
        self.session_config = session
        self.config = merge(self.config, session)
        await self.send({"type": "session.updated", "session": self.config})

    def _turn_detection(self) -> dict | None:
        return ((self.config.get("audio") or {}).get("input") or {}).get("turn_detection")

    # ------------------------------------------------------------ input audio and VAD

    async def _on_audio_append(self, event: dict) -> None:
        try:
            audio = base64.b64decode(event.get("audio", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ClientError("invalid_value", "'audio' is not valid base64.", "audio") from None
        self._uncommitted += len(audio)
        self._received += len(audio)
        if self.fake.record_audio:
            self.audio_in.extend(audio)
            async with self._changed:
                self._changed.notify_all()
        self._vad_pending.extend(audio)
        while len(self._vad_pending) >= VAD_CHUNK:
            chunk = bytes(self._vad_pending[:VAD_CHUNK])
            del self._vad_pending[:VAD_CHUNK]
            self._vad_pos += VAD_CHUNK
            if self._turn_detection() is not None:
                await self._vad_step(chunk)

    async def _vad_step(self, chunk: bytes) -> None:
        """Advance the speech / silence state machine by one 20 ms chunk."""
        if is_speech(chunk):
            self._silence = 0
            self._speech_end = self._vad_pos
            if self._speech_item is None:
                await self._speech_started(self._vad_pos - len(chunk))
        elif self._speech_item is not None:
            self._silence += len(chunk)
            if self._silence >= self.fake.silence_ms * BYTES_PER_MS:
                await self._speech_stopped()

    async def _speech_started(self, start: int) -> None:
        self._speech_item, self._speech_start = new_id("item"), start
        await self.send({"type": "input_audio_buffer.speech_started",
                         "audio_start_ms": start // BYTES_PER_MS, "item_id": self._speech_item})
        interrupts = self._turn_detection().get("interrupt_response") is not False
        if interrupts and self._response is not None:
            self._response.cancel("turn_detected")

    async def _speech_stopped(self) -> None:
        item_id, self._speech_item = self._speech_item, None
        await self.send({"type": "input_audio_buffer.speech_stopped",
                         "audio_end_ms": self._speech_end // BYTES_PER_MS, "item_id": item_id})
        await self._commit_user_turn(item_id, (self._speech_end - self._speech_start)
                                     // BYTES_PER_MS)
        wants_reply = self._turn_detection().get("create_response", True) is not False
        # Like the real API, an auto response is skipped while one is still active.
        if wants_reply and self._response is None:
            self._start_response()

    async def _commit_user_turn(self, item_id: str, speech_ms: int) -> None:
        """The events that follow a commit: committed, the user item, its transcription."""
        self._uncommitted = 0
        previous = self._last_item_id
        item = {"id": item_id, "object": "realtime.item", "type": "message",
                "status": "completed", "role": "user",
                "content": [{"type": "input_audio", "transcript": None}]}
        self._remember(item)
        await self.send({"type": "input_audio_buffer.committed",
                         "previous_item_id": previous, "item_id": item_id})
        await self.send({"type": "conversation.item.added", "previous_item_id": previous,
                         "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": previous,
                         "item": item})
        transcript = f"caller said {speech_ms} ms of audio"
        where = {"item_id": item_id, "content_index": 0}
        if self.fake.transcription_fault:
            await self.send({"type": "conversation.item.input_audio_transcription.failed",
                             **where, "error": TRANSCRIPTION_ERROR})
            return
        await self.send({"type": "conversation.item.input_audio_transcription.delta",
                         **where, "delta": transcript})
        await self.send({"type": "conversation.item.input_audio_transcription.completed",
                         **where, "transcript": transcript,
                         "usage": {"type": "duration", "seconds": speech_ms / 1000}})

    async def _on_audio_commit(self, event: dict) -> None:
        ms = self._uncommitted // BYTES_PER_MS
        if ms < MIN_COMMIT_MS:
            raise ClientError("input_audio_buffer_commit_empty",
                              f"Error committing input audio buffer: buffer too small. "
                              f"Expected at least {MIN_COMMIT_MS}ms of audio, but buffer "
                              f"only has {ms}ms of audio.")
        item_id, self._speech_item = self._speech_item or new_id("item"), None
        await self._commit_user_turn(item_id, ms)

    async def _on_audio_clear(self, event: dict) -> None:
        self._uncommitted, self._speech_item, self._silence = 0, None, 0
        self._vad_pending.clear()
        await self.send({"type": "input_audio_buffer.cleared"})

    # ------------------------------------------------------------ conversation items

    def _remember(self, item: dict) -> None:
        self._items[item["id"]] = item
        self._last_item_id = item["id"]

    async def _on_item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise ClientError("missing_required_parameter",
                              "Missing required parameter: 'item'.", "item")
        kind = item.get("type")
        if kind == "function_call_output":
            self._check_function_output(item)
        elif kind not in ("message", "function_call"):
            raise ClientError("invalid_value", f"Invalid value: {kind!r}.", "item.type")
        item = {**item, "id": item.get("id") or new_id("item"), "object": "realtime.item",
                "status": "completed"}
        if kind == "function_call_output":
            self.function_outputs.append(item)
        previous = self._last_item_id
        self._remember(item)
        await self.send({"type": "conversation.item.added", "previous_item_id": previous,
                         "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": previous,
                         "item": item})

    def _check_function_output(self, item: dict) -> None:
        if item.get("call_id") not in self._call_ids:
            raise ClientError("invalid_value", f"Tool call ID {item.get('call_id')!r} not "
                              "found in conversation.", "item.call_id")
        if not isinstance(item.get("output"), str):
            raise ClientError("invalid_type", "Invalid type for 'item.output': expected a "
                              "string.", "item.output")

    async def _on_truncate(self, event: dict) -> None:
        self.truncates.append(event)
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        if item_id not in self._items:
            raise ClientError("invalid_value", f"Item with item_id {item_id!r} not found.",
                              "item_id")
        if not isinstance(end_ms, int) or end_ms < 0:
            raise ClientError("invalid_value", "'audio_end_ms' must be a non-negative integer.",
                              "audio_end_ms")
        produced = self.produced_ms(item_id)
        if end_ms > produced:
            raise ClientError("invalid_value", f"Audio content of {produced} ms is already "
                              f"shorter than {end_ms} ms", "audio_end_ms")
        await self.send({"type": "conversation.item.truncated", "item_id": item_id,
                         "content_index": event.get("content_index", 0),
                         "audio_end_ms": end_ms})

    # ------------------------------------------------------------ responses

    async def _on_response_create(self, event: dict) -> None:
        if self._response is not None:
            raise ClientError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: "
                f"{self._response.id}. Wait until the response is finished before creating "
                "a new one.")
        self._start_response((event.get("response") or {}).get("instructions"))

    async def _on_response_cancel(self, event: dict) -> None:
        if self._response is None:
            raise ClientError("response_cancel_not_active",
                              "Cancellation failed: no active response found.")
        self._response.cancel("client_cancelled")

    def _start_response(self, instructions: str | None = None) -> None:
        if self.fault == "stall_after_greeting" and self._answered >= 1:
            return  # the stuck model: input accepted, no answer ever
        self.response_instructions.append(self.config.get("instructions", "") if instructions is None
                                          else instructions)
        response = _Response(new_id("resp"), self._responses)
        self._responses += 1
        self._response = response
        response.task = asyncio.create_task(self._produce(response))

    async def _produce(self, response: _Response) -> None:
        call = self.fake.function_call_for(response.index)
        fault = self.fake.response_fault_for(response.index, self.index)
        try:
            await self.send({"type": "response.created", "response": {
                "id": response.id, "object": "realtime.response", "status": "in_progress",
                "status_details": None, "output": [], "usage": None}})
            if fault in FAILED_RESPONSES:
                await self._fail(response, fault)
                return
            if call is not None:
                item = await self._produce_function_call(response, *call)
            else:
                item = await self._produce_audio(response, cut=fault is not None)
            await self._finish(response, item, fault)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("fake realtime session %d: response failed", self.index)
        finally:
            if self._response is response:
                self._response = None

    async def _produce_function_call(self, response: _Response, name: str,
                                     arguments: str) -> dict:
        item = {"id": new_id("item"), "object": "realtime.item", "type": "function_call",
                "status": "in_progress", "call_id": new_id("call"), "name": name,
                "arguments": ""}
        where = {"response_id": response.id, "item_id": item["id"], "output_index": 0,
                 "call_id": item["call_id"]}
        await self._add_output_item(response, item)
        await self.send({"type": "response.function_call_arguments.delta", **where,
                         "delta": arguments})
        await self.send({"type": "response.function_call_arguments.done", **where,
                         "name": name, "arguments": arguments})
        # Known before the client can read output_item.done and answer with an output.
        self._call_ids.add(item["call_id"])
        return {**item, "arguments": arguments, "status": "completed"}

    async def _fail(self, response: _Response, fault: str) -> None:
        """A failed response, as the API reports a rate limit or an outage: no output, the
        error in status_details (and, for a rate limit, none left in rate_limits.updated).
        It fails after one chunk's time (scaled by ``pace``): active meanwhile, as a real one is."""
        loop = asyncio.get_running_loop()
        await response.pause_until(loop.time() + self.fake.chunk_ms / 1000 * self.fake.pace)
        self._response = None
        if fault == "rate_limit":
            await self.send({"type": "rate_limits.updated", "rate_limits": [
                {"name": "requests", "limit": 5000, "remaining": 0, "reset_seconds": 1.2},
                {"name": "tokens", "limit": 40000, "remaining": 0, "reset_seconds": 1.2}]})
        await self.send({"type": "response.done", "response": {
            "id": response.id, "object": "realtime.response", "status": "failed",
            "status_details": {"type": "failed", "error": FAILED_RESPONSES[fault]},
            "output": [], "output_modalities": ["audio"], "usage": None}})
        self._answered += 1

    async def _produce_audio(self, response: _Response, cut: bool = False) -> dict:
        """The reply's audio; ``cut``: only its first half (an incomplete response)."""
        fake = self.fake
        audio = fake.reply_audio_for(self.index, response.index)
        chunk_bytes = max(fake.chunk_ms * BYTES_PER_MS, 1)
        chunks = [audio[i:i + chunk_bytes] for i in range(0, len(audio), chunk_bytes)]
        if cut:
            chunks = chunks[:max(len(chunks) // 2, 1)]
        texts = split_evenly(fake.reply_text, len(chunks))
        item = {"id": new_id("item"), "object": "realtime.item", "type": "message",
                "status": "in_progress", "role": "assistant", "content": []}
        where = {"response_id": response.id, "item_id": item["id"], "output_index": 0,
                 "content_index": 0}
        self._produced[item["id"]] = 0
        await self._add_output_item(response, item)
        await self.send({"type": "response.content_part.added", **where,
                         "part": {"type": "audio", "transcript": ""}})
        spoken = await self._stream_audio(response, where, chunks, texts)
        transcript = "".join(spoken)
        await self.send({"type": "response.output_audio.done", **where})
        await self.send({"type": "response.output_audio_transcript.done", **where,
                         "transcript": transcript})
        part = {"type": "audio", "transcript": transcript}
        await self.send({"type": "response.content_part.done", **where, "part": part})
        status = "incomplete" if response.cancelled or cut else "completed"
        return {**item, "status": status,
                "content": [{"type": "output_audio", "transcript": transcript}]}

    async def _stream_audio(self, response: _Response, where: dict, chunks: list[bytes],
                            texts: list[str]) -> list[str]:
        """Send audio and transcript deltas, paced, until done or cancelled; the text sent."""
        spoken: list[str] = []
        seconds = self.fake.chunk_ms / 1000 * self.fake.pace
        start = asyncio.get_running_loop().time()
        for k, (chunk, text) in enumerate(zip(chunks, texts)):
            if k:
                await response.pause_until(start + k * seconds)
            if response.cancelled:
                break
            self._produced[where["item_id"]] += len(chunk)
            await self.send({"type": "response.output_audio.delta", **where,
                             "delta": base64.b64encode(chunk).decode()})
            if text:
                spoken.append(text)
                await self.send({"type": "response.output_audio_transcript.delta", **where,
                                 "delta": text})
        return spoken

    async def _add_output_item(self, response: _Response, item: dict) -> None:
        previous = self._last_item_id
        self._remember(item)
        await self.send({"type": "response.output_item.added", "response_id": response.id,
                         "output_index": 0, "item": item})
        await self.send({"type": "conversation.item.added", "previous_item_id": previous,
                         "item": item})

    async def _finish(self, response: _Response, item: dict, incomplete: str | None = None) -> None:
        """output_item.done, conversation.item.done, response.done, then the noise or fault.
        ``incomplete``: the reason the response stopped short (max_output_tokens, content_filter)."""
        self._items[item["id"]] = item
        await self.send({"type": "response.output_item.done", "response_id": response.id,
                         "output_index": 0, "item": item})
        await self.send({"type": "conversation.item.done", "item": item})
        status = "cancelled" if response.cancelled else "incomplete" if incomplete else "completed"
        details = ({"type": "cancelled", "reason": response.cancel_reason} if response.cancelled
                   else {"type": "incomplete", "reason": incomplete} if incomplete else None)
        transcript = "".join(c.get("transcript") or "" for c in item.get("content", []))
        # Inactive before response.done leaves: a client may answer it with response.create
        # before this task runs again.
        self._response = None
        await self.send({"type": "response.done", "response": {
            "id": response.id, "object": "realtime.response", "status": status,
            "status_details": details, "output": [item],
            "output_modalities": ["audio"],
            "usage": usage(self._received // BYTES_PER_MS,
                           self.produced_ms(item["id"]), transcript)}})
        self._answered += 1
        if self.fault == "drop_after_greeting" and self._answered == 1:
            # send() returned only once response.done reached the kernel (write_limit=0),
            # so cutting now loses nothing that was sent.
            self.abort()
            return
        await self.send({"type": "rate_limits.updated", "rate_limits": [
            {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
            {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5}]})


# ---------------------------------------------------------------- the server


class FakeRealtime:
    """A loopback Realtime GA server. Start with ``await start()`` or ``async with``.

    ``reply_audio``: bytes for every reply, or ``f(session_index, response_index) -> bytes``
    (both 0-based; response_index counts every response of the session, function calls
    included), or None for default_reply_audio. ``pace`` scales the wait between audio
    chunks: 0 sends as fast as possible, 1.0 in real time. ``function_calls`` are
    (name, arguments JSON) pairs: response number ``first_call_response + k`` of each
    session emits the k-th call instead of audio; later responses are audio again.
    ``record_audio=False`` keeps neither input_audio_buffer.append events in events_in nor
    their bytes in audio_in (VAD still runs): for long benchmarks, where they add up.

    Responses that end badly, as real ones do: ``response_fault`` applies to every response
    of every session, ``response_faults`` maps a response index to its fault; either names
    one of RESPONSE_FAULTS: ``server_error`` and ``rate_limit`` (``response.done`` status
    failed, with status_details.error), ``max_output_tokens`` and ``content_filter``
    (status incomplete after half the audio). ``transcription_fault=True`` answers every
    caller turn with ``conversation.item.input_audio_transcription.failed``.
    ``session_faults`` maps a session index to a fault of SESSION_FAULTS for it alone.
    ``models``: the models served (None: any); a session for another is refused after the
    handshake, as the API refuses a model that does not exist.

    Strictness: every client event is checked against the official SDK's types; a field they
    do not know, or a wrong type, gets the ``error`` the real API sends (and is listed in the
    session's ``refused``). Every server event is checked the same way before it leaves: one
    the SDK would refuse raises FakeBug and is listed in ``invalid_sent``.
    """

    def __init__(self, *, api_key: str = "test-key", reply_audio: ReplyAudio = None,
                 reply_text: str = "Hello from the fake model.", chunk_ms: int = 100,
                 pace: float = 0.0, silence_ms: int = 400,
                 function_calls: Sequence[tuple[str, str]] = (), first_call_response: int = 0,
                 fault: str | None = None, record_audio: bool = True,
                 response_fault: str | None = None, response_faults: Mapping[int, str] | None = None,
                 transcription_fault: bool = False, session_faults: Mapping[int, str] | None = None,
                 models: Collection[str] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault={fault!r}: expected None or one of {sorted(FAULTS)}")
        for kind in (session_faults or {}).values():
            if kind not in SESSION_FAULTS:
                raise ValueError(f"session fault {kind!r}: expected one of {sorted(SESSION_FAULTS)}")
        for kind in [response_fault, *(response_faults or {}).values()]:
            if kind is not None and kind not in RESPONSE_FAULTS:
                raise ValueError(f"response fault {kind!r}: expected one of {sorted(RESPONSE_FAULTS)}")
        if chunk_ms <= 0:
            raise ValueError(f"chunk_ms={chunk_ms!r}: expected a positive number of ms")
        self.api_key, self.reply_audio, self.reply_text = api_key, reply_audio, reply_text
        self.chunk_ms, self.pace, self.silence_ms = chunk_ms, pace, silence_ms
        self.function_calls = list(function_calls)
        self.first_call_response = first_call_response
        self.fault, self.record_audio = fault, record_audio
        self.response_fault, self.response_faults = response_fault, dict(response_faults or {})
        self.transcription_fault = transcription_fault
        self.session_faults = dict(session_faults or {})
        self.models = None if models is None else frozenset(models)
        self.invalid_sent: list[tuple[dict, Any]] = []  # server events the SDK refused (bugs)
        self.host, self.port = host, port
        self.connections = 0
        self.sessions: list[FakeSession] = []
        self._sessions_changed = asyncio.Condition()
        self._server: Server | asyncio.Server | None = None
        self._raw: dict[asyncio.Task, asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}"

    async def start(self) -> FakeRealtime:
        """Listen; `port` then holds the real port (port 0 picks a free one)."""
        if self.fault == "no_handshake":
            self._server = await asyncio.start_server(self._swallow, self.host, self.port)
        else:
            self._server = await serve(
                self._handle, self.host, self.port, process_request=self._check_request,
                max_size=MAX_MESSAGE, compression=None, close_timeout=1,
                # send() then returns only once the frame reached the kernel, so abort()
                # right after a send never discards what was "sent".
                write_limit=0)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("fake realtime listening on %s (fault=%s)", self.url, self.fault)
        return self

    async def close(self) -> None:
        """Stop listening and close every connection (WebSockets with 1001). Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in self._raw.values():
            writer.close()
        if self._raw:
            await asyncio.wait(list(self._raw))
        await server.wait_closed()

    async def __aenter__(self) -> FakeRealtime:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_for_session(self, n: int = 1, timeout: float = 5.0) -> FakeSession:
        """The n-th accepted session (1-based), once it exists."""
        try:
            async with asyncio.timeout(timeout):
                async with self._sessions_changed:
                    await self._sessions_changed.wait_for(lambda: len(self.sessions) >= n)
        except TimeoutError:
            raise TimeoutError(f"no session #{n} within {timeout} s "
                               f"({len(self.sessions)} sessions, "
                               f"{self.connections} connections)") from None
        return self.sessions[n - 1]

    def reply_audio_for(self, session_index: int, response_index: int) -> bytes:
        """The audio a response will carry (what tests compare the deltas with)."""
        if self.reply_audio is None:
            return default_reply_audio(session_index, response_index)
        if callable(self.reply_audio):
            return bytes(self.reply_audio(session_index, response_index))
        return bytes(self.reply_audio)

    def fault_for(self, session_index: int) -> str | None:
        """The connection fault of one session: its own (``session_faults``), else ``fault``."""
        own = self.session_faults.get(session_index)
        return own if own in FAULTS else self.fault

    def response_fault_for(self, response_index: int, session_index: int | None = None) -> str | None:
        own = self.session_faults.get(session_index)
        if own in RESPONSE_FAULTS:
            return own
        return self.response_faults.get(response_index, self.response_fault)

    def function_call_for(self, response_index: int) -> tuple[str, str] | None:
        k = response_index - self.first_call_response
        return self.function_calls[k] if 0 <= k < len(self.function_calls) else None

    # ------------------------------------------------------------ connection handling

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Count every handshake; refuse a wrong path or key before the upgrade."""
        self.connections += 1
        if urlsplit(request.path).path != PATH:
            return connection.respond(404, f"Not found: use {PATH}\n")
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            body = orjson.dumps({"error": {
                "message": "Incorrect API key provided. You can find your API key at "
                           "https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
            return Response(401, "Unauthorized", Headers([("Content-Type", "application/json"),
                                                          ("Content-Length", str(len(body)))]), body)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        session = FakeSession(self, ws, len(self.sessions))
        async with self._sessions_changed:
            self.sessions.append(session)
            self._sessions_changed.notify_all()
        logger.info("fake realtime session %d opened (model=%s)", session.index, session.model)
        try:
            await session.run()
        finally:
            logger.info("fake realtime session %d closed (code=%s)", session.index,
                        ws.close_code)

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """no_handshake: hold the TCP connection, read and ignore, never answer."""
        self.connections += 1
        task = asyncio.current_task()
        self._raw[task] = writer
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            del self._raw[task]
            writer.close()


# ---------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Loopback OpenAI Realtime (GA) peer.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="wait between audio chunks × chunk length (1 = real time)")
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument("--silence-ms", type=int, default=400)
    parser.add_argument("--reply-text", default="Hello from the fake model.")
    parser.add_argument("--function-call", nargs=2, action="append", default=[],
                        metavar=("NAME", "ARGUMENTS_JSON"))
    parser.add_argument("--first-call-response", type=int, default=0)
    parser.add_argument("--fault", choices=sorted(FAULTS))
    parser.add_argument("--response-fault", choices=sorted(RESPONSE_FAULTS),
                        help="every response ends this way")
    parser.add_argument("--response-fault-at", nargs=2, action="append", default=[],
                        metavar=("INDEX", "FAULT"), help="response number INDEX (0-based) ends this way")
    parser.add_argument("--transcription-fault", action="store_true",
                        help="every caller turn's transcription fails")
    parser.add_argument("--model", action="append", dest="models",
                        help="a model served (repeat for more; default: any)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeRealtime(
        api_key=args.api_key, reply_text=args.reply_text, chunk_ms=args.chunk_ms,
        pace=args.pace, silence_ms=args.silence_ms,
        function_calls=[tuple(call) for call in args.function_call],
        first_call_response=args.first_call_response, fault=args.fault,
        response_fault=args.response_fault,
        response_faults={int(index): kind for index, kind in args.response_fault_at},
        transcription_fault=args.transcription_fault, models=args.models,
        host=args.host, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM as well as Ctrl-C, so a benchmark script can stop the peer cleanly (1001s).
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with fake:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()

"""The offline agent: answers calls without OPENAI_API_KEY, behind the model interface.

It speaks the same Realtime GA events as the real model, so the bridge, barge-in, transcripts
and the frontend work unchanged. It greets with a recorded sentence, detects the caller's
speech by energy, and after each pause plays the caller's last utterance back, with
transcript events that say so. It has no voice of its own beyond the greeting: a response
asked for later (after a keypress, or the wrap-up) is an empty one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
from pathlib import Path
from typing import Any

import orjson

from bridge import mulaw

GREETING = (Path(__file__).parent / "assets" / "offline_greeting.ulaw").read_bytes()
GREETING_TEXT = ("Hello, this is the Callgate offline agent. There is no AI model connected, "
                 "so I will play back whatever you say. Go ahead.")
SPEECH_LEVEL = 400.0       # mean μ-law magnitude above which a 20 ms frame is speech
END_OF_TURN_MS = 600       # this much quiet ends the caller's turn
PLAYBACK_PAUSE_S = 0.5     # the "pause" before playing the utterance back
MAX_UTTERANCE_MS = 15_000  # longer speech is cut (bounded memory)
CHUNK_BYTES = 800          # 100 ms per audio delta, like the real model
PACE = 0.5                 # send audio at twice real time: ahead of playout, never minutes ahead

_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_offline{next(_ids)}"


class OfflineAgent:
    """One call's offline 'model'. ``send`` takes client events; ``recv`` returns server events (None once closed)."""

    def __init__(self) -> None:
        self._out: asyncio.Queue[str | None] = asyncio.Queue()
        self._utterance = bytearray()
        self._speaking = False
        self._quiet_ms = 0
        self._speech_item = ""
        self._responding: asyncio.Task | None = None
        self._greeted = False
        self._closed = False
        self._emit("session.created", session={"id": _id("sess"), "type": "realtime", "model": "offline"})

    def _emit(self, kind: str, **fields: Any) -> None:
        if not self._closed:
            self._out.put_nowait(orjson.dumps({"type": kind, "event_id": _id("event"), **fields}).decode())

    # --- client events ----------------------------------------------------------------------

    async def send(self, frame: str) -> None:
        event = orjson.loads(frame)
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            try:
                self._hear(base64.b64decode(event.get("audio", ""), validate=True))
            except binascii.Error:
                pass  # a frame that is not whole base64: the real model would ignore it too
        elif kind == "session.update":
            self._emit("session.updated", session=event.get("session", {}))
        elif kind == "conversation.item.create":
            item = event.get("item") or {}
            self._emit("conversation.item.added", item={**item, "id": item.get("id") or _id("item")})
        elif kind == "response.create":
            if self._responding is not None and not self._responding.done():
                self._emit("error", error={"type": "invalid_request_error",
                                           "code": "conversation_already_has_active_response",
                                           "message": "a response is in progress",
                                           "event_id": event.get("event_id")})
            elif not self._greeted:
                self._greeted = True
                self._respond(GREETING, GREETING_TEXT)
            else:
                self._respond(b"", "")
        elif kind == "response.cancel":
            self._cancel_response()
        elif kind == "conversation.item.truncate":
            self._emit("conversation.item.truncated", item_id=event.get("item_id"),
                       content_index=event.get("content_index", 0), audio_end_ms=event.get("audio_end_ms", 0))

    def _hear(self, audio: bytes) -> None:
        for start in range(0, len(audio), 160):
            frame = audio[start:start + 160]
            loud = mulaw.mean_magnitude(frame) > SPEECH_LEVEL
            if loud and not self._speaking:
                self._speaking = True
                self._speech_item = _id("item")
                self._utterance.clear()
                self._cancel_response()
                self._emit("input_audio_buffer.speech_started", item_id=self._speech_item, audio_start_ms=0)
            if not self._speaking:
                continue
            if len(self._utterance) < MAX_UTTERANCE_MS * mulaw.BYTES_PER_MS:
                self._utterance += frame
            self._quiet_ms = 0 if loud else self._quiet_ms + len(frame) // mulaw.BYTES_PER_MS
            if self._quiet_ms >= END_OF_TURN_MS:
                self._end_of_turn()

    def _end_of_turn(self) -> None:
        self._speaking = False
        self._quiet_ms = 0
        utterance = bytes(self._utterance)
        seconds = len(utterance) / mulaw.BYTES_PER_SECOND
        self._emit("input_audio_buffer.speech_stopped", item_id=self._speech_item, audio_end_ms=int(seconds * 1000))
        text = f"(offline agent: {seconds:.1f} s of speech; there is no transcription offline)"
        self._emit("conversation.item.input_audio_transcription.completed", item_id=self._speech_item,
                   content_index=0, transcript=text)
        self._respond(utterance, "(offline agent) Playing back what you said.", pause=PLAYBACK_PAUSE_S)

    # --- responses --------------------------------------------------------------------------

    def _respond(self, audio: bytes, text: str, pause: float = 0.0) -> None:
        self._cancel_response()
        self._responding = asyncio.get_running_loop().create_task(self._speak(audio, text, pause))

    def _cancel_response(self) -> None:
        if self._responding is not None and not self._responding.done():
            self._responding.cancel()

    async def _speak(self, audio: bytes, text: str, pause: float) -> None:
        response_id, item_id = _id("resp"), _id("item")
        status = "completed"
        try:
            await asyncio.sleep(pause)
            self._emit("response.created", response={"id": response_id, "status": "in_progress"})
            if not audio:
                return
            self._emit("response.output_audio_transcript.delta", response_id=response_id, item_id=item_id,
                       output_index=0, content_index=0, delta=text)
            for start in range(0, len(audio), CHUNK_BYTES):
                chunk = audio[start:start + CHUNK_BYTES]
                self._emit("response.output_audio.delta", response_id=response_id, item_id=item_id,
                           output_index=0, content_index=0, delta=base64.b64encode(chunk).decode())
                await asyncio.sleep(len(chunk) / mulaw.BYTES_PER_SECOND * PACE)
            self._emit("response.output_audio.done", response_id=response_id, item_id=item_id)
            self._emit("response.output_audio_transcript.done", response_id=response_id, item_id=item_id,
                       output_index=0, content_index=0, transcript=text)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            self._emit("response.done", response={"id": response_id, "status": status})

    # --- the connection ---------------------------------------------------------------------

    async def recv(self) -> str | None:
        return await self._out.get()

    async def close(self) -> None:
        self._cancel_response()
        if self._responding is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._responding
        self._closed = True
        self._out.put_nowait(None)


class OfflineConnector:
    name = "offline"

    async def connect(self) -> OfflineAgent:
        return OfflineAgent()

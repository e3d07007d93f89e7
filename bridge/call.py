"""One call's life: the Twilio media stream on one side, the model on the other.

    run() → open the model (caller audio is buffered meanwhile) → session.update → wait for
    session.updated → greeting → two pumps, caller_to_model and model_to_caller, plus the
    time limit; the first of them to finish ends the call → finish(), exactly once.

Responses: the bridge asks for the greeting, the answer to a tool's output or a keypress, and
the wrap-up; server VAD starts the others. One response is active at a time, so an ask waits
for the active one to finish (``bridge/responses.py``). A response that fails is asked for
again after each back-off of RESPONSE_RETRY_DELAYS_S; when the last fails, or the connection
breaks, the caller hears a recorded apology and the call ends as ``model_failed``.

Barge-in: after every 100 ms or so of audio sent to Twilio we send a named mark
(``bridge/playout.py``); Twilio echoes a mark when the audio before it has played, so echoed
marks count the bytes actually heard per model item. When the caller starts speaking while
audio is unheard we send ``clear`` and truncate the playing item at min(played, produced) ms.
Marks that Twilio echoes for the audio it cleared are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from bridge import events, functions, mulaw, realtime, twilio
from bridge.playout import Playout
from bridge.realtime_client import ModelConnection, ModelConnector, ModelError
from bridge.responses import ASK_PREFIX, ITEM_EVENT_PREFIX, MAX_SENDS, Asker, Outcome
from config import CLOSE_TIMEOUT_S
from ratelimits import Bucket
from scenarios import Scenario

log = logging.getLogger("callgate.call")

PRE_READY_FRAMES = 500  # caller audio kept while the model opens: 10 s of 20 ms frames
MAX_BAD_MODEL_FRAMES = 5  # a model that sends this many unreadable frames is broken
DRAIN_TIMEOUT_S = 15.0  # longest wait for a goodbye to finish playing before hanging up
CALLER_IDLE_TIMEOUT_S = 5.0  # no frame at all from Twilio this long: the stream is dead
WRAP_UP_MESSAGE = (
    "The call's time is nearly up. Thank the caller, say goodbye in one short sentence, "
    "and do not ask anything more."
)
GREETING_MESSAGE = "The call has just connected. Greet the caller now with these words, then wait for them: {}"
DTMF_MESSAGE = "(The caller pressed the key {} on their keypad.)"
CUT_OFF_MESSAGE = "Your last reply was cut off. Finish it in one short sentence."
FILTERED_MESSAGE = ("Your last reply was stopped by the content filter. Apologise in a few words and "
                    "bring the conversation back to the purpose of this call.")
# A failed response is asked for again after these pauses; when the last retry fails too,
# the caller hears APOLOGY and the call ends (a rate limit or an outage rarely clears fast).
RESPONSE_RETRY_DELAYS_S = (0.5, 2.0)
MAX_FILTERED_RESPONSES = 3  # content-filtered replies in one call before it is ended
MAX_DTMF_BEFORE_READY = 20  # keypresses kept while the model opens
# Twilio sends 50 media frames a second; a stream sending far more is not a phone line.
MAX_MEDIA_PER_S, MAX_MEDIA_BURST = 100, 500
# What the caller hears before a call the model cannot carry is hung up.
APOLOGY = (Path(__file__).parent / "assets" / "model_failed.ulaw").read_bytes()
APOLOGY_REASONS = frozenset({"model_failed", "model_unavailable", "content_filter"})
# What a call's tasks may end with that the call handles (and logs as a warning) itself.
EXPECTED_FAILURES = (ModelError, TimeoutError, ConnectionResetError)
APOLOGY_CHUNK = mulaw.BYTES_PER_SECOND  # 1 s of audio per media message
APOLOGY_MARK = "callgate-apology"
APOLOGY_GRACE_S = 3.0  # beyond its length, the longest wait for the apology to play


@dataclass(frozen=True)
class CallSetup:
    call_sid: str
    stream_sid: str
    scenario: Scenario
    config: dict[str, str]
    voice: str
    # The stream's start moved the call's record to connected already (sql/calls_stream_start.sql):
    # the bridge only announces it.
    connected_recorded: bool = False


@dataclass
class CallServices:
    """What a call needs from the application; one instance serves every call."""

    connector: ModelConnector
    bus: events.EventBus
    hangup: Callable[[str], Awaitable[None]]      # REST hang-up; "already ended" is success
    # (call_sid, status, reason) into the calls table; True when there is news to announce: the
    # status moved forward, or a final status already recorded (by Twilio's callback) just got
    # its reason. Statuses never go back, so a late or duplicate one is not announced.
    record_status: Callable[[str, str, str | None], Awaitable[bool]]
    transcription_model: str
    session_duration_s: float
    wrap_up_s: float
    ready_timeout_s: float
    observe_frame: Callable[[str, float], None] = lambda direction, seconds: None
    # the Media Stream's start to the model ready for audio, for /metrics
    observe_setup: Callable[[float], None] = lambda seconds: None
    # (status, code or reason) of each failed or incomplete response, for /metrics
    count_response_failure: Callable[[str, str | None], None] = lambda status, code: None
    # why a frame from Twilio's side was dropped (malformed, binary, too_fast), for /metrics
    count_rejected_frame: Callable[[str], None] = lambda reason: None


class Call:
    # Slots, not a __dict__: a live call's object is ~1.5 KiB smaller (bench/calls.py: RSS per call).
    __slots__ = ("twilio_ws", "setup", "call_sid", "_services", "_bus", "_model", "_ready", "_pre_ready", "_playout",
                 "_checked_item", "_end_requested", "_wrap_up_timer", "_watch_timer",
                 "_end_after_goodbye", "_asker", "_asks_dropped", "_goodbye_asked",
                 "_goodbye_response", "_failures", "_filtered", "_cut_off", "_gave_up",
                 "_dtmf_before_ready", "_rejected", "_aux_tasks", "_awaiting_response",
                 "_last_frame", "_in_model_send", "end_reason", "_finished", "started")

    def __init__(self, twilio_ws: web.WebSocketResponse, setup: CallSetup, services: CallServices) -> None:
        self.twilio_ws = twilio_ws
        self.setup = setup
        self.call_sid = setup.call_sid
        self._services = services
        self._bus = services.bus
        self._model: ModelConnection | None = None
        self._ready = False
        # Caller audio that came before the model was ready; None once it is (its ~0.7 KiB freed).
        self._pre_ready: collections.deque[str] | None = collections.deque(maxlen=PRE_READY_FRAMES)
        self._playout = Playout()
        self._checked_item: str | None = None  # the last item id found safe to put in a mark
        # Resolved to end the call now (a request, the watchdog, the time limit): a future and
        # timers, not a task each, keep a live call small (bench/calls.py: RSS per call).
        self._end_requested: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wrap_up_timer: asyncio.TimerHandle | None = None
        self._watch_timer: asyncio.TimerHandle | None = None
        self._end_after_goodbye: str | None = None  # set by the end_call tool: why the call ends
        self._asker = Asker()
        self._asks_dropped = 0
        self._goodbye_asked = False           # the response we asked for is the goodbye...
        self._goodbye_response: str | None = None  # ...and its id, once it started
        self._failures = 0                    # responses failed in a row
        self._filtered = 0                    # responses stopped by the content filter
        self._cut_off = False                 # the last response ran out of output tokens
        self._gave_up = False                 # the model cannot carry the call: end it
        self._dtmf_before_ready: list[str] = []
        self._rejected: set[str] = set()  # reasons for dropped Twilio frames, logged once each
        self._aux_tasks: set[asyncio.Task] = set()
        # When we began waiting for the model to start a response (None: not waiting).
        self._awaiting_response: float | None = None
        self._last_frame = time.monotonic()  # from Twilio
        self._in_model_send = False  # caller audio waiting on the model's socket
        self.end_reason: str | None = None
        self._finished = False
        self.started = time.monotonic()

    # --- the story ---------------------------------------------------------------------------

    async def run(self) -> str:
        """Run the call to its end; returns why it ended. Never raises for call failures.
        If the handler running it is cancelled, the call is still finalised before this returns."""
        if self.setup.connected_recorded:
            self._bus.publish(events.status_changed(self.call_sid, "connected"))
        else:
            await self._announce("connected")
        caller = asyncio.create_task(self.caller_to_model(), name=f"{self.call_sid}:caller_to_model")
        end_request = self._end_requested
        tasks: set[asyncio.Task] = {caller}
        try:
            opening = asyncio.create_task(self._open_model(), name=f"{self.call_sid}:open_model")
            tasks.add(opening)
            done, _ = await asyncio.wait({caller, end_request, opening}, return_when=asyncio.FIRST_COMPLETED)
            if opening in done and opening.exception() is None:
                tasks.discard(opening)
                tasks.add(asyncio.create_task(self.model_to_caller(), name=f"{self.call_sid}:model_to_caller"))
                self._start_timers()
                await asyncio.wait(tasks | {end_request}, return_when=asyncio.FIRST_COMPLETED)
            elif opening in done:
                self._set_reason("model_unavailable")
                exc = opening.exception()
                log.warning("call %s: model did not open: %s", self.call_sid,
                            "no answer in time" if isinstance(exc, TimeoutError) else exc)
            # (Whichever pump noticed the model's failure first: the caller may still be there.)
            if self.end_reason in APOLOGY_REASONS and not self.twilio_ws.closed:
                await self._apologise(tasks | self._aux_tasks)
        finally:
            for timer in (self._wrap_up_timer, self._watch_timer):
                if timer is not None:
                    timer.cancel()
            for task in tasks | self._aux_tasks:  # helpers report their own errors
                task.cancel()
            finishing = asyncio.create_task(self._finish(tasks | self._aux_tasks, tasks),
                                            name=f"{self.call_sid}:finish")
            try:
                await asyncio.shield(finishing)
            except asyncio.CancelledError:
                # The handler was cancelled (its peer went away): the call must still be
                # finalised, and whoever awaits this handler must not see it as done before.
                await finishing
                raise
        return self.end_reason or "ended"

    def request_end(self, reason: str) -> None:
        """End the call now (frontend call.end, shutdown)."""
        self._set_reason(reason)
        if not self._end_requested.done():
            self._end_requested.set_result(None)

    def request_end_after_goodbye(self, reason: str) -> None:
        """End the call once the agent's answer to this request has played (the end_call
        tool): the response that follows the tool's output is the goodbye."""
        self._end_after_goodbye = reason

    def _set_reason(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason

    # --- opening the model ----------------------------------------------------------------

    async def _open_model(self) -> None:
        async with asyncio.timeout(self._services.ready_timeout_s):
            self._model = await self._services.connector.connect()
            scenario = self.setup.scenario
            await self._expect("session.created")
            await self._model.send(realtime.encode(realtime.session_update(
                instructions=scenario.instructions(self.setup.config),
                voice=self.setup.voice,
                tools=functions.schemas(scenario.tools),
                transcription_model=self._services.transcription_model,
            )))
            await self._expect("session.updated")
        # Greeting first, then the caller's buffered audio: the agent speaks first on a call.
        # The greeting is a system note, not response.instructions, which would replace the
        # scenario's instructions (its persona and rules) for that response.
        greeting = GREETING_MESSAGE.format(scenario.greeting(self.setup.config))
        await self._add_and_ask(realtime.system_text(greeting, self._asker.new_item_id()))
        for digit in self._dtmf_before_ready:
            await self._add_and_ask(realtime.user_text(DTMF_MESSAGE.format(digit), self._asker.new_item_id()))
        self._dtmf_before_ready.clear()
        # Last, and with no await between emptying the buffer and _ready: audio that arrives
        # during these sends is buffered, then sent here, in order.
        while self._pre_ready:
            await self._model.send(realtime.append_audio(self._pre_ready.popleft()))
        self._ready = True
        self._pre_ready = None
        took = time.monotonic() - self.started
        self._services.observe_setup(took)
        log.info("call %s: model ready (%s) after %.0f ms", self.call_sid, self._services.connector.name, took * 1000)

    async def _expect(self, wanted: str) -> None:
        bad = 0
        while (frame := await self._model.recv()) is not None:
            event = realtime.decode(frame)
            if event is None:
                bad += 1
                if bad >= MAX_BAD_MODEL_FRAMES:
                    raise ModelError("model sends unreadable frames")
                continue
            if event["type"] == wanted:
                return
            if event["type"] == "error":
                raise ModelError(f"model refused the session: {_error_text(event.get('error') or {})}")
        raise ModelError(f"model closed before {wanted}")

    # --- caller → model -------------------------------------------------------------------

    async def caller_to_model(self) -> None:
        """Read Twilio's frames until ``stop`` or the socket closes."""
        try:
            await self._read_twilio()
        except ModelError as exc:
            log.warning("call %s: %s", self.call_sid, exc)
            self._set_reason("model_failed")

    async def _read_twilio(self) -> None:
        observe = self._services.observe_frame
        media_budget = Bucket(MAX_MEDIA_PER_S, MAX_MEDIA_BURST)
        async for msg in self.twilio_ws:
            self._last_frame = now = time.monotonic()  # the watchdog notices a leg gone quiet
            started = time.perf_counter()
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.BINARY:
                    self._reject("binary", "a binary frame")
                continue
            try:
                event = twilio.parse(msg.data)
            except twilio.ProtocolError as exc:
                self._reject("malformed", f"a malformed frame ({exc})")
                continue
            if isinstance(event, twilio.Media):
                if not realtime.is_base64(event.payload):
                    self._reject("malformed", "a media payload that is not base64")
                    continue
                if not media_budget.take(now):
                    self._reject("too_fast", f"media faster than {MAX_MEDIA_PER_S} frames a second")
                    continue
                if self._ready:
                    self._in_model_send = True
                    await self._model.send(realtime.append_audio(event.payload))
                    self._in_model_send = False
                    observe("caller_to_model", time.perf_counter() - started)
                else:
                    self._pre_ready.append(event.payload)  # relayed (and counted) once ready
            elif isinstance(event, twilio.Mark):
                self._playout.heard(event.name)
            elif isinstance(event, twilio.Dtmf):
                log.info("call %s: keypad press", self.call_sid)  # never the digit: PINs, card numbers
                # The model answers a text item only when asked: a keypress needs its answer.
                if self._ready:
                    await self._add_and_ask(realtime.user_text(DTMF_MESSAGE.format(event.digit),
                                                               self._asker.new_item_id()))
                elif len(self._dtmf_before_ready) < MAX_DTMF_BEFORE_READY:
                    self._dtmf_before_ready.append(event.digit)
            elif isinstance(event, twilio.Stop):
                self._set_reason("caller_hangup")
                return
        self._set_reason("stream_closed")

    def _reject(self, reason: str, what: str) -> None:
        """A frame from Twilio's side that is not relayed: counted (/metrics), and logged once
        per call and reason (a stream that sends garbage must not flood the log)."""
        self._services.count_rejected_frame(reason)
        if reason not in self._rejected:
            self._rejected.add(reason)
            log.warning("call %s: %s from the stream, dropped (and any more like it)", self.call_sid, what)

    # --- model → caller -------------------------------------------------------------------

    async def model_to_caller(self) -> None:
        """Turn model events into audio for Twilio and call events for subscribers, until the
        model closes, breaks, or cannot carry the call any more."""
        bad = 0
        observe = self._services.observe_frame
        try:
            recv = self._model.recv
            while (frame := await recv()) is not None:
                started = time.perf_counter()
                event = realtime.decode(frame)
                if event is None:
                    bad += 1
                    if bad >= MAX_BAD_MODEL_FRAMES:
                        self._set_reason("model_failed")
                        log.warning("call %s: model sends unreadable frames", self.call_sid)
                        return
                    continue
                if event["type"] == "response.output_audio.delta":  # most frames: no dispatch
                    await self._play(event)
                    observe("model_to_caller", time.perf_counter() - started)
                    continue
                await self._on_model_event(event)
                if self._gave_up:
                    return
        except ModelError as exc:
            log.warning("call %s: %s", self.call_sid, exc)
        except ConnectionResetError:
            self._set_reason("stream_closed")  # Twilio's side went away mid-send
            return
        self._set_reason("model_failed")

    async def _on_model_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "response.output_audio.delta":
            await self._play(event)
        elif kind == "input_audio_buffer.speech_started":
            self._asker.caller_speaking(True)
            await self._barge_in()
        elif kind in realtime.TRANSCRIPT_EVENTS:
            role, stage, field_name = realtime.TRANSCRIPT_EVENTS[kind]
            item_id, text = str(event.get("item_id", "")), str(event.get(field_name, ""))
            self._bus.publish(events.transcript_delta(self.call_sid, item_id, role, text) if stage == "delta"
                              else events.transcript_done(self.call_sid, item_id, role, text))
        elif kind == realtime.TRANSCRIPTION_FAILED:
            # The caller's words could not be transcribed: the turn still happened (the model
            # heard the audio), so followers are told, and the operator sees why.
            error = event.get("error") or {}
            log.warning("call %s: transcription of the caller failed (%s, %s)", self.call_sid,
                        error.get("code"), error.get("type"))
            self._bus.publish(events.transcript_done(self.call_sid, str(event.get("item_id", "")), "user", "",
                                                     failed=True))
        elif kind == "response.output_item.done":
            item = event.get("item") or {}
            if item.get("type") == "function_call":
                await self._run_function(item)
        elif kind in ("conversation.item.added", "conversation.item.created"):
            self._asker.item_settled(str((event.get("item") or {}).get("id", "")))
        elif kind == "response.created":
            self._awaiting_response = None
            response_id = str((event.get("response") or {}).get("id", ""))
            if self._asker.created(response_id) and self._goodbye_asked:
                self._goodbye_asked, self._goodbye_response = False, response_id
        elif kind == "response.output_audio.done":
            await self._mark_tail()
        elif kind == "response.done":
            self._awaiting_response = None
            await self._mark_tail()
            await self._on_response_done(Outcome.of(event))
        elif kind in ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed"):
            # Server VAD answers a finished turn by itself: a response should start shortly,
            # and it answers any ask of ours that waited while the caller spoke.
            self._asker.caller_speaking(False)
            if self._awaiting_response is None:
                self._awaiting_response = time.monotonic()
        elif kind == "error":
            await self._on_error(event.get("error") or {})

    async def _on_response_done(self, outcome: Outcome) -> None:
        """Every status the API defines: completed and cancelled (barge-in) need nothing;
        failed is asked for again after a back-off, then the call is given up; incomplete
        (out of output tokens, or the content filter) gets one note to the model."""
        is_goodbye = outcome.response_id == self._goodbye_response
        if outcome.status in ("failed", "incomplete"):
            self._services.count_response_failure(outcome.status, outcome.error_code or outcome.reason)
        if outcome.failed:
            self._failures += 1
            log.warning("call %s: response failed (%s, %s), %d in a row", self.call_sid,
                        outcome.error_code, outcome.error_type, self._failures)
            if is_goodbye:  # the retry is the goodbye again
                self._goodbye_asked, self._goodbye_response = True, None
            # Held first: an ask that waited for this response goes out with the retry.
            self._retry_or_give_up()
            await self._send_ask(self._asker.done(outcome.response_id))
            return
        self._failures = 0
        if outcome.status == "incomplete":
            await self._on_incomplete(outcome)
        else:
            self._cut_off = False
        if is_goodbye:
            self._goodbye_response = None
            if outcome.status == "cancelled":
                # The caller talked over the goodbye: the answer to that is the goodbye now.
                self._goodbye_asked = True
            else:
                self._spawn(self._end_when_played(self._goodbye_reason), "end_after_goodbye")
        await self._send_ask(self._asker.done(outcome.response_id))

    async def _on_incomplete(self, outcome: Outcome) -> None:
        if outcome.reason == "content_filter":
            self._filtered += 1
            log.warning("call %s: a reply was stopped by the content filter (%d in this call)",
                        self.call_sid, self._filtered)
            if self._filtered >= MAX_FILTERED_RESPONSES:
                self._give_up("content_filter")
                return
            await self._add_and_ask(realtime.system_text(FILTERED_MESSAGE, self._asker.new_item_id()))
        elif outcome.reason == "max_output_tokens":
            # Once: a continuation cut off again is left as it is, not chased in a loop.
            log.info("call %s: a reply ran out of output tokens", self.call_sid)
            if not self._cut_off:
                self._cut_off = True
                await self._add_and_ask(realtime.system_text(CUT_OFF_MESSAGE, self._asker.new_item_id()))
                return
        self._cut_off = False

    async def _on_error(self, error: dict[str, Any]) -> None:
        code, event_id = error.get("code"), error.get("event_id")
        if isinstance(event_id, str) and event_id.startswith(ITEM_EVENT_PREFIX):
            # One of our items was refused: it will never be added, so no ask waits for it.
            log.warning("call %s: the model refused a conversation item: %s", self.call_sid, _error_text(error))
            self._asker.item_settled(event_id.removeprefix(ITEM_EVENT_PREFIX))
            return
        ours = isinstance(event_id, str) and event_id.startswith(ASK_PREFIX)
        if code == realtime.ACTIVE_RESPONSE and ours:
            self._asker.refused(event_id)  # asked again when the active response is done
        elif ours:
            # Our response.create itself was refused for another reason (a rate limit, an
            # outage): like a failed response.
            self._failures += 1
            log.warning("call %s: response refused (%s, %s), %d in a row", self.call_sid, code,
                        error.get("type"), self._failures)
            self._asker.refused(event_id)
            self._retry_or_give_up()
        elif code not in realtime.BENIGN_ERROR_CODES:
            log.warning("call %s: model error: %s", self.call_sid, _error_text(error))

    def _retry_or_give_up(self) -> None:
        if self._failures > len(RESPONSE_RETRY_DELAYS_S):
            self._give_up("model_failed")
            return
        self._awaiting_response = None  # the watchdog waits again from the retry's own ask
        self._asker.retry_later()
        self._spawn(self._retry_after(RESPONSE_RETRY_DELAYS_S[self._failures - 1]), "retry_response")

    async def _retry_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(ModelError):  # a broken model ends the call through its own pump
            await self._send_ask(self._asker.release())

    def _give_up(self, reason: str) -> None:
        """The model cannot carry this call: end it (the caller hears the apology first)."""
        log.warning("call %s: giving up on the model: %s", self.call_sid, reason)
        self._set_reason(reason)
        self._asker.cancel()
        self._gave_up = True

    @property
    def _goodbye_reason(self) -> str:
        return self._end_after_goodbye or "agent_ended"

    async def _play(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        payload = event.get("delta")
        p = self._playout
        if not isinstance(item_id, str) or not isinstance(payload, str) or item_id in p.interrupted:
            return
        if item_id != self._checked_item:  # (an item has hundreds of deltas: check its id once)
            if not twilio.safe_id(item_id):
                log.warning("call %s: audio delta for a malformed item id dropped", self.call_sid)
                return
            self._checked_item = item_id
        if not realtime.is_base64(payload):
            log.warning("call %s: malformed audio delta dropped", self.call_sid)
            return
        stream_sid = self.setup.stream_sid
        tail = p.flush(item_id)  # the previous item's last audio gets its own mark
        if tail is not None:
            await self.twilio_ws.send_str(twilio.mark(stream_sid, tail))
        await self.twilio_ws.send_str(twilio.media(stream_sid, payload))
        name = p.sent(item_id, int(event.get("content_index", 0) or 0), realtime.base64_len(payload))
        if name is not None:
            await self.twilio_ws.send_str(twilio.mark(stream_sid, name))

    async def _mark_tail(self) -> None:
        """A response's audio is complete: its last chunks get their mark now (the goodbye's
        end is known by it), not when more audio comes."""
        name = self._playout.flush()
        if name is not None:
            await self.twilio_ws.send_str(twilio.mark(self.setup.stream_sid, name))

    async def _barge_in(self) -> None:
        cut = self._playout.interrupt()
        if cut is None:
            return  # nothing is playing: the caller is just speaking
        item_id, content_index, heard_ms = cut
        await self.twilio_ws.send_str(twilio.clear(self.setup.stream_sid))
        await self._model.send(realtime.encode(realtime.truncate(item_id, content_index, heard_ms)))
        log.info("call %s: barge-in, %s truncated at %d ms", self.call_sid, item_id, heard_ms)

    async def _run_function(self, item: dict[str, Any]) -> None:
        name, call_id = str(item.get("name", "")), item.get("call_id")
        if not isinstance(call_id, str):
            return
        arguments = item.get("arguments") if isinstance(item.get("arguments"), str) else "{}"
        output = await functions.run(name, arguments, _ToolContext(self))
        self._bus.publish(events.function_call(self.call_sid, name, arguments, output))
        if self._end_after_goodbye is not None:
            self._goodbye_asked = True  # the answer to end_call's output
        # Asked now, while the response that made the call is still active, the answer would
        # be refused: the asker sends it once that response is done.
        await self._add_and_ask(realtime.function_output(call_id, output, self._asker.new_item_id()))

    async def _add_and_ask(self, item_event: dict[str, Any]) -> None:
        """Add a conversation item, then ask for a response that sees it. The item's event_id
        names it, so an error about it is known for what it is."""
        item_id = item_event["item"]["id"]
        await self._model.send(realtime.encode({**item_event, "event_id": ITEM_EVENT_PREFIX + item_id}))
        await self._send_ask(self._asker.ask(item_id))

    async def _send_ask(self, event_id: str | None) -> None:
        if self._asker.dropped > self._asks_dropped:
            self._asks_dropped = self._asker.dropped
            log.warning("call %s: an ask for a response went unanswered %d times: dropped", self.call_sid, MAX_SENDS)
        if event_id is None:
            return
        await self._model.send(realtime.encode(realtime.response_create(event_id)))
        if self._awaiting_response is None:
            self._awaiting_response = time.monotonic()

    def _spawn(self, coro, name: str) -> None:
        """A helper task that the call's end cancels."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.call_sid}:{name}")
        self._aux_tasks.add(task)
        task.add_done_callback(self._helper_done)

    def _helper_done(self, task: asyncio.Task) -> None:
        self._aux_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s: %s failed", self.call_sid, task.get_name(), exc_info=task.exception())

    async def _end_when_played(self, reason: str) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await self._playout.played_out.wait()
        self.request_end(reason)

    # --- the time limit ---------------------------------------------------------------------

    def _start_timers(self) -> None:
        s, loop = self._services, asyncio.get_running_loop()
        self._wrap_up_timer = loop.call_later(max(s.session_duration_s - s.wrap_up_s, 0), self._spawn_wrap_up)
        self._watch_timer = loop.call_later(self._watch_every(), self._watchdog)

    def _spawn_wrap_up(self) -> None:
        self._spawn(self._time_limit(), "time_limit")

    async def _time_limit(self) -> None:
        s = self._services
        log.info("call %s: time nearly up, asking the agent to wrap up", self.call_sid)
        # The goodbye is asked for now, and waits if the agent is mid-reply; once it has
        # played the call ends. The limit itself still holds if the goodbye never comes.
        if self._end_after_goodbye is None:
            self._end_after_goodbye = "time_limit"
        self._goodbye_asked = True
        with contextlib.suppress(ModelError):  # a broken model ends the call through its own pump
            await self._add_and_ask(realtime.system_text(WRAP_UP_MESSAGE, self._asker.new_item_id()))
        await asyncio.sleep(min(s.wrap_up_s, s.session_duration_s))
        self.request_end("time_limit")

    def _watch_every(self) -> float:
        return min(self._services.ready_timeout_s / 4, CALLER_IDLE_TIMEOUT_S / 4, 1.0)

    def _watchdog(self) -> None:
        """End the call when a side goes quiet. Twilio streams 50 frames a second, silence
        included, so a leg with no frame for CALLER_IDLE_TIMEOUT_S is gone. The model is
        stuck when a response asked for (or due after the caller's turn) has not started
        within the ready timeout; without this the caller would sit in silence until the
        time limit. One timer for the call, not one per frame: it runs, then sets itself again."""
        limit = self._services.ready_timeout_s
        now = time.monotonic()
        if now - self._last_frame > CALLER_IDLE_TIMEOUT_S:
            if self._in_model_send:  # not Twilio's silence: the model stopped taking audio
                log.warning("call %s: the model has not taken audio for %.0f s", self.call_sid,
                            CALLER_IDLE_TIMEOUT_S)
                self.request_end("model_failed")
            else:
                log.warning("call %s: no frame from Twilio for %.0f s", self.call_sid, CALLER_IDLE_TIMEOUT_S)
                self.request_end("stream_closed")
            return
        since = self._awaiting_response
        if since is not None and now - since > limit:
            log.warning("call %s: the model has not answered for %.1f s", self.call_sid, limit)
            self.request_end("model_failed")
            return
        self._watch_timer = asyncio.get_running_loop().call_later(self._watch_every(), self._watchdog)

    # --- the end ----------------------------------------------------------------------------

    async def _apologise(self, tasks: set[asyncio.Task]) -> None:
        """The model cannot carry the call: stop everything else, tell the caller, and wait
        (bounded) until Twilio says it has played, so hanging up does not cut it short."""
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)  # their errors are reported by _finish (helpers': as they end)
        stream_sid = self.setup.stream_sid
        try:
            if self._playout.playing:
                await self.twilio_ws.send_str(twilio.clear(stream_sid))  # no half reply first
            for start in range(0, len(APOLOGY), APOLOGY_CHUNK):
                chunk = base64.b64encode(APOLOGY[start:start + APOLOGY_CHUNK]).decode()
                await self.twilio_ws.send_str(twilio.media(stream_sid, chunk))
            await self.twilio_ws.send_str(twilio.mark(stream_sid, APOLOGY_MARK))
            async with asyncio.timeout(len(APOLOGY) / mulaw.BYTES_PER_SECOND + APOLOGY_GRACE_S):
                async for msg in self.twilio_ws:
                    try:
                        event = twilio.parse(msg.data) if msg.type == WSMsgType.TEXT else None
                    except twilio.ProtocolError:
                        continue
                    if isinstance(event, twilio.Stop) or (isinstance(event, twilio.Mark)
                                                           and event.name == APOLOGY_MARK):
                        return
        except (TimeoutError, ConnectionResetError):
            return  # the caller is gone, or Twilio is not answering: hang up anyway

    async def _finish(self, tasks: set[asyncio.Task], pumps: set[asyncio.Task]) -> None:
        """Wait for every task of the call to end (errors of the ``pumps`` are logged here,
        a helper's by ``_helper_done``), then close the model, announce, close Twilio's
        socket and hang up."""
        if self._finished:
            return
        self._finished = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in pumps:
            exc = None if task.cancelled() else task.exception()
            # The model failing to open, or breaking, was said in one warning line already; only
            # what nobody expected is an error with its traceback.
            if exc is not None and not isinstance(exc, EXPECTED_FAILURES):
                log.error("call %s: %s failed", self.call_sid, task.get_name(), exc_info=exc)
        reason = self.end_reason or "ended"
        if self._model is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._model.close()
        # Announced before Twilio's socket closes: closing it ends the call at Twilio, whose
        # "completed" callback would otherwise often be recorded first, without our reason.
        await self._announce("ended", reason)
        if not self.twilio_ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.twilio_ws.close()
        # Not after the caller hung up (Twilio's stop: the call is over at Twilio); on every
        # other end the call may still be up there, and "already ended" counts as success.
        if reason != "caller_hangup":
            with contextlib.suppress(Exception):
                await self._services.hangup(self.call_sid)
        log.info("call %s ended: %s after %.1f s", self.call_sid, reason, time.monotonic() - self.started)

    async def _announce(self, status: str, reason: str | None = None) -> None:
        try:
            moved = await self._services.record_status(self.call_sid, status, reason)
        except Exception:  # noqa: BLE001 - the call's own end must not depend on bookkeeping
            log.exception("call %s: status %s not recorded", self.call_sid, status)
            moved = True
        if moved:
            self._bus.publish(events.status_changed(self.call_sid, status, reason))


class _ToolContext:
    """What a function tool may see and do of its call."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self.call_sid = call.call_sid

    def request_end(self, reason: str) -> None:
        self._call.request_end_after_goodbye(reason)


def _error_text(error: dict[str, Any]) -> str:
    return f"{error.get('code') or error.get('type')}: {error.get('message', '')}"[:300]

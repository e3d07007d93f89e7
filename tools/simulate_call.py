"""Play Twilio for one call against a running Callgate server, on loopback.

A ``SimulatedCall`` does what Twilio does for a call, in Twilio's wire format:

1. ``webhook()`` posts the voice webhook form, signed with ``X-Twilio-Signature`` over
   the server's public URL, and parses the TwiML answer;
2. ``connect()`` opens the bidirectional Media Stream named in ``<Connect><Stream>``
   (signing the handshake over the stream URL) and sends ``connected`` and ``start``;
3. ``play()`` sends the caller's audio as 160-byte μ-law ``media`` frames every 20 ms,
   then silence, as a phone line does;
4. meanwhile a reader plays the server's audio out at the phone's pace, echoes each
   ``mark`` when playout reaches it, honours ``clear`` and records protocol violations;
5. ``stop()`` ends the call the way Twilio does (``stop``, then a normal close), and
   ``drop()`` the way a network failure does (no stop, no close frame).

``speed`` scales every clock (sending and playout) so tests run faster than real time.
``run()`` does all the steps and returns a ``CallReport``; the command line prints it:

    python tools/simulate_call.py --server http://127.0.0.1:8081 --auth-token TOKEN \\
        --from +14155550100 --to +14155550199 --audio tools/audio/hello.ulaw

Audio helpers: ``load_audio(path)`` reads raw μ-law; ``quiet(ms, seed)`` is unique audio no
voice detector hears; ``tone(ms, freq)`` synthesises a μ-law sine (a stand-in for caller speech that an energy VAD detects) with a pure-Python
encoder, since ``audioop`` is gone from Python 3.13.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import math
import random
import secrets
import sys
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import websockets
import yarl
from twilio.request_validator import RequestValidator

# Run as a script, this folder (tools/) is on sys.path, the repository root is not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bridge import mulaw  # noqa: E402
from bridge.mulaw import decode as mulaw_to_linear  # noqa: E402, F401 - part of this module's API
from bridge.mulaw import encode as linear_to_mulaw  # noqa: E402

SAMPLE_RATE = mulaw.BYTES_PER_SECOND  # μ-law: one byte a sample
BYTES_PER_MS = mulaw.BYTES_PER_MS
FRAME_MS = 20
FRAME_BYTES = FRAME_MS * BYTES_PER_MS  # 160: the size of every media frame Twilio sends
MULAW_SILENCE = mulaw.SILENCE
MAX_BUFFERED_BYTES = 10 * 60 * SAMPLE_RATE  # Twilio discards beyond 10 minutes (31931)
DTMF_DIGITS = frozenset("0123456789*#")
DEFAULT_AUDIO = Path(__file__).resolve().parent / "audio" / "hello.ulaw"



# -- audio -----------------------------------------------------------------------------


def load_audio(path: str | Path) -> bytes:
    """Raw μ-law 8 kHz mono audio from a file (no header)."""
    return Path(path).read_bytes()


def tone(ms: int, freq: float = 440, amplitude: float = 0.5) -> bytes:
    """``ms`` milliseconds of a μ-law sine at ``freq`` Hz, ``amplitude`` of full scale."""
    peak = amplitude * 32767
    return bytes(
        linear_to_mulaw(round(peak * math.sin(2 * math.pi * freq * n / SAMPLE_RATE)))
        for n in range(ms * BYTES_PER_MS)
    )


def silence(ms: int) -> bytes:
    """``ms`` milliseconds of μ-law silence."""
    return bytes([MULAW_SILENCE]) * (ms * BYTES_PER_MS)


def quiet(ms: int, seed: int = 0) -> bytes:
    """``ms`` of audio unique to ``seed``, too quiet for any voice detector (μ-law codes near
    silence): a caller whose every frame can be told apart, who never takes a turn."""
    rng = random.Random(seed)
    return bytes(rng.choice((0xF8, 0xF9, 0xFA, 0xFB, 0x78, 0x79, 0x7A, 0x7B)) for _ in range(ms * BYTES_PER_MS))


def frames(audio: bytes) -> list[bytes]:
    """Audio cut into 160-byte frames, the last one padded with silence."""
    chunks = [audio[i:i + FRAME_BYTES] for i in range(0, len(audio), FRAME_BYTES)]
    if chunks and len(chunks[-1]) < FRAME_BYTES:
        chunks[-1] = chunks[-1].ljust(FRAME_BYTES, bytes([MULAW_SILENCE]))
    return chunks


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


# -- TwiML -----------------------------------------------------------------------------


@dataclass
class TwimlResult:
    """The server's answer to the voice webhook, with the TwiML verbs Callgate uses."""

    status: int
    body: str
    verbs: list[str] = field(default_factory=list)  # top-level verb names, in order
    stream_url: str | None = None  # <Connect><Stream url=...>
    parameters: dict[str, str] = field(default_factory=dict)  # its <Parameter> children
    say: str | None = None  # text of the <Say> verbs, joined
    hangup: bool = False
    verbs_after_connect: list[str] = field(default_factory=list)  # should be empty
    parse_error: str | None = None


def parse_twiml(status: int, body: str) -> TwimlResult:
    """Read a webhook answer; a body that is not TwiML leaves the verb fields empty."""
    result = TwimlResult(status=status, body=body)
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        result.parse_error = str(exc)
        return result
    if root.tag != "Response":
        result.parse_error = f"root element is <{root.tag}>, not <Response>"
        return result
    said = []
    for verb in root:
        if "Connect" in result.verbs:
            result.verbs_after_connect.append(verb.tag)
        result.verbs.append(verb.tag)
        if verb.tag == "Connect":
            stream = verb.find("Stream")
            if stream is not None:
                result.stream_url = stream.get("url")
                result.parameters = {p.get("name", ""): p.get("value", "")
                                     for p in stream.findall("Parameter")}
        elif verb.tag == "Say":
            said.append((verb.text or "").strip())
        elif verb.tag == "Hangup":
            result.hangup = True
    result.say = " ".join(said) if said else None
    return result


# -- playout ---------------------------------------------------------------------------


class Playout:
    """Twilio's playout of the server's audio to the caller.

    Audio and marks queue in arrival order. Audio plays at 8 bytes per ms × ``speed``
    on the monotonic clock, one frame (or the rest of a chunk) at a time; a mark is
    reached when everything queued before it has played. ``clear()`` drops what has
    not played and hands back the marks that were pending, which Twilio echoes at once.
    """

    def __init__(self, speed: float, reached_mark: Callable[[str], Awaitable[None]],
                 progressed: Callable[[], Awaitable[None]]) -> None:
        self.speed = speed
        self.played = 0  # bytes actually played (cleared audio never counts)
        self._queue: deque[bytearray | str] = deque()  # audio chunks; a str is a mark name
        self._buffered = 0
        self._generation = 0  # bumped by clear(), so a piece cut short is not counted
        self._arrived = asyncio.Event()
        self._cleared = asyncio.Event()
        self._reached_mark = reached_mark
        self._progressed = progressed

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet played."""
        return self._buffered

    def add_audio(self, audio: bytes) -> None:
        self._queue.append(bytearray(audio))
        self._buffered += len(audio)
        self._arrived.set()

    def add_mark(self, name: str) -> None:
        self._queue.append(name)
        self._arrived.set()

    def clear(self) -> list[str]:
        """Drop unplayed audio; return the pending marks' names, in order."""
        pending = [item for item in self._queue if isinstance(item, str)]
        self._queue.clear()
        self._buffered = 0
        self._generation += 1
        self._cleared.set()
        return pending

    async def run(self) -> None:
        """Play until cancelled."""
        loop = asyncio.get_running_loop()
        piece_end: float | None = None  # when the previous piece ended; None when idle
        while True:
            if not self._queue:
                piece_end = None  # idle: the next audio starts when it arrives
                self._arrived.clear()
                await self._arrived.wait()
                continue
            head = self._queue[0]
            if isinstance(head, str):
                self._queue.popleft()
                await self._reached_mark(head)
                continue
            size = min(FRAME_BYTES, len(head))
            # Scheduled from the previous piece's end, not from "now": no drift.
            due = (piece_end or loop.time()) + size / (SAMPLE_RATE * self.speed)
            generation = self._generation
            await self._sleep_unless_cleared(due)
            if generation != self._generation:
                piece_end = None  # cut short by a clear: none of this piece played
                continue
            piece_end = due
            del head[:size]
            self.played += size
            self._buffered -= size
            if not head:
                self._queue.popleft()
            await self._progressed()

    async def _sleep_unless_cleared(self, due: float) -> None:
        self._cleared.clear()
        try:
            async with asyncio.timeout_at(due):
                await self._cleared.wait()
        except TimeoutError:
            pass


# -- the call --------------------------------------------------------------------------


@dataclass
class CallReport:
    """What happened on one simulated call."""

    call_sid: str
    twiml: TwimlResult
    bytes_sent: int
    bytes_received: int
    bytes_played: int
    marks_echoed: list[tuple[str, int]]
    clears: int
    close_code: int | None
    close_reason: str | None
    errors: list[str]
    duration_s: float

    def format(self) -> str:
        ms = 1 / BYTES_PER_MS
        lines = [
            f"call {self.call_sid}: {self.duration_s:.2f} s",
            f"  webhook: HTTP {self.twiml.status}, verbs {self.twiml.verbs or '-'}",
        ]
        if self.twiml.stream_url:
            lines.append(f"  stream: {self.twiml.stream_url} parameters {self.twiml.parameters}")
        if self.twiml.say is not None:
            lines.append(f"  say: {self.twiml.say!r} hangup={self.twiml.hangup}")
        if self.twiml.verbs_after_connect:
            lines.append(f"  verbs after </Connect>: {self.twiml.verbs_after_connect}")
        lines += [
            f"  sent {self.bytes_sent} bytes ({self.bytes_sent * ms:.0f} ms) of caller audio",
            f"  received {self.bytes_received} bytes ({self.bytes_received * ms:.0f} ms), "
            f"played {self.bytes_played} ({self.bytes_played * ms:.0f} ms)",
            f"  marks echoed {len(self.marks_echoed)}, clears {self.clears}",
            f"  closed: code {self.close_code} reason {self.close_reason!r}",
            f"  protocol errors: {len(self.errors)}",
            *(f"    - {error}" for error in self.errors),
        ]
        return "\n".join(lines)


class SimulatedCall:
    """Twilio's side of one call: the voice webhook, then the Media Stream.

    ``server_url`` is where requests go; ``public_url`` is the URL the server believes it
    has (its PUBLIC_URL), over which signatures are computed. ``auth_token`` None sends
    no signatures; ``shared_key`` signs as an account with a Webhooks rule does, with that
    key and ``algorithm`` (HMAC_SHA1 or HMAC_SHA256), naming both in
    X-Twilio-Webhooks-Signature-Settings. ``speed`` scales both the sending of caller audio and the playout of
    the server's audio (4.0: a 20 ms frame every 5 ms). ``audio`` (raw μ-law) defaults
    to the committed ``tools/audio/hello.ulaw``; pass ``b""`` for a silent caller.

    ``closed_code``/``closed_reason`` are those of the server's close frame (1006 when
    the connection was lost or dropped). ``send_dtmf`` and ``stop`` on a closed stream
    are harmless for ``stop`` and raise websockets' ConnectionClosed for ``send_dtmf``.
    Call ``close()`` (or use ``async with``) to release the socket and HTTP session.
    """

    def __init__(self, server_url: str, *, public_url: str | None = None,
                 auth_token: str | None = None, call_sid: str | None = None,
                 account_sid: str | None = None, from_: str = "+14155550100",
                 to: str = "+14155550199", direction: str = "inbound",
                 audio: bytes | None = None, speed: float = 1.0, tail_silence_ms: int = 1000,
                 extra_params: dict[str, str] | None = None,
                 shared_key: str | None = None, algorithm: str = "HMAC_SHA1") -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if tail_silence_ms < 0:
            raise ValueError(f"tail_silence_ms must be >= 0, got {tail_silence_ms}")
        self.server_url = server_url.rstrip("/")
        self.public_url = (public_url or server_url).rstrip("/")
        self.auth_token = auth_token
        self.call_sid = call_sid or new_sid("CA")
        self.account_sid = account_sid or new_sid("AC")
        self.stream_sid = new_sid("MZ")
        self.from_ = from_
        self.to = to
        self.direction = direction
        self.audio = load_audio(DEFAULT_AUDIO) if audio is None else audio
        self.speed = speed
        self.tail_silence_ms = tail_silence_ms
        self.extra_params = dict(extra_params or {})

        self.twiml: TwimlResult | None = None
        self.stream_url: str | None = None
        self.events: list[dict[str, Any]] = []  # every JSON message from the server, in order
        self.errors: list[str] = []  # protocol violations by the server
        self.received_audio = bytearray()
        self.marks_echoed: list[tuple[str, int]] = []  # (name, played_bytes at the echo)
        self.clears = 0
        self.sent_bytes = 0  # caller audio sent in media frames, tail silence included
        self.closed_code: int | None = None
        self.closed_reason: str | None = None

        # An account with a Webhooks rule signs with the rule's shared key (HMAC-SHA1 or -SHA256)
        # and says so in a header; without one, with the auth token and HMAC-SHA1.
        key = shared_key if shared_key is not None else auth_token
        self._validator = RequestValidator(key) if key is not None else None
        self._algorithm = algorithm
        self._signature_headers = ({"X-Twilio-Webhooks-Signature-Settings":
                                    f"key=webhooks_sharedkey_simulated,algorithm={algorithm}"}
                                   if shared_key is not None else {})
        self._session: aiohttp.ClientSession | None = None
        self._ws: websockets.ClientConnection | None = None
        self._tasks: list[asyncio.Task] = []
        self._reader: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._playout = Playout(speed, self._echo_mark, self._notify)
        self._closed = False
        self._sequence = 0  # sequenceNumber of the last message sent
        self._chunk = 0  # chunk number of the last media frame sent
        self._next_media_ms = 0  # media timestamp of the next frame
        self._started_at = 0.0  # loop time when the stream started (the media clock's zero)

    @property
    def played_bytes(self) -> int:
        """Server audio actually played to the caller so far (cleared audio excluded)."""
        return self._playout.played

    @property
    def closed(self) -> bool:
        """True once the Media Stream socket has closed, whoever closed it."""
        return self._closed

    async def __aenter__(self) -> SimulatedCall:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the voice webhook -------------------------------------------------------------

    def webhook_form(self) -> dict[str, str]:
        """The voice webhook's form fields, as Twilio posts them."""
        form = {
            "CallSid": self.call_sid,
            "AccountSid": self.account_sid,
            "From": self.from_,
            "To": self.to,
            "Caller": self.from_,
            "Called": self.to,
            "Direction": self.direction,
            # An inbound call is still ringing when Twilio asks for TwiML; an API-placed
            # call has been answered.
            "CallStatus": "ringing" if self.direction == "inbound" else "in-progress",
            "ApiVersion": "2010-04-01",
        }
        form.update(self.extra_params)
        return form

    async def webhook(self, path: str = "/twiml") -> TwimlResult:
        """POST the voice webhook to ``server_url + path``, signed over ``public_url + path``."""
        form = self.webhook_form()
        headers = {"User-Agent": "TwilioProxy/1.1",
                   "I-Twilio-Idempotency-Token": str(uuid.uuid4())}
        if self._validator is not None:
            headers["X-Twilio-Signature"] = self._validator.compute_signature(
                self.public_url + path, form, self._algorithm)
            headers.update(self._signature_headers)
        if self._session is None:
            # Twilio gives a webhook 15 s before it gives up.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        # Twilio requests the URL exactly as configured, escapes and all (and signs that):
        # encoded=True keeps aiohttp from requoting it (%2C would become a comma).
        async with self._session.post(yarl.URL(self.server_url + path, encoded=True), data=form,
                                      headers=headers) as response:
            self.twiml = parse_twiml(response.status, await response.text())
        return self.twiml

    # -- the Media Stream --------------------------------------------------------------

    def socket_url(self, stream_url: str) -> str:
        """Where to open the stream: the server's own host and port, the stream URL's path.

        PUBLIC_URL may name a host that does not resolve here, so only its path is used.
        """
        server = urlsplit(self.server_url)
        scheme = "wss" if server.scheme == "https" else "ws"
        return urlunsplit((scheme, server.netloc, urlsplit(stream_url).path or "/", "", ""))

    async def connect(self, stream_url: str | None = None,
                      parameters: dict[str, str] | None = None, *,
                      start_call_sid: str | None = None, send_start: bool = True,
                      open_timeout: float = 5, headers: dict[str, str] | None = None) -> None:
        """Open the Media Stream and send ``connected`` and ``start``.

        ``stream_url`` and ``parameters`` default to the TwiML's; ``parameters`` becomes
        ``start.customParameters`` and ``start_call_sid`` overrides ``start.callSid``
        (tests use both to present bad tokens). ``send_start=False`` sends only
        ``connected``. The handshake is signed over ``stream_url`` exactly as given;
        ``headers`` are added to it (say Fly-Client-IP, as Fly's proxy adds).
        Raises websockets' InvalidStatus if the server refuses the upgrade.
        """
        stream_url = stream_url or (self.twiml.stream_url if self.twiml else None)
        if not stream_url:
            raise ValueError("no stream URL: call webhook() first, or pass stream_url")
        if parameters is None:
            parameters = dict(self.twiml.parameters) if self.twiml else {}
        self.stream_url = stream_url
        self._check_stream_url(stream_url)
        headers = dict(headers or {})
        if self._validator is not None:
            headers["X-Twilio-Signature"] = self._validator.compute_signature(stream_url, {}, self._algorithm)
            headers.update(self._signature_headers)
        self._ws = await websockets.connect(
            self.socket_url(stream_url), additional_headers=headers,
            user_agent_header="Twilio.TmeWs/1.0", compression=None, proxy=None,
            open_timeout=open_timeout, close_timeout=2, ping_interval=None,
            max_size=16 * 2**20)
        self._started_at = asyncio.get_running_loop().time()  # until start resets it
        self._reader = asyncio.create_task(self._read(), name=f"reader-{self.call_sid}")
        player = asyncio.create_task(self._playout.run(), name=f"playout-{self.call_sid}")
        self._tasks = [self._reader, player]
        await self._ws.send(json.dumps({"event": "connected", "protocol": "Call",
                                        "version": "1.0.0"}))
        if send_start:
            await self.send_start(parameters, call_sid=start_call_sid)

    def _check_stream_url(self, stream_url: str) -> None:
        parts = urlsplit(stream_url)
        if parts.query:
            self.errors.append(f"31920: stream URL carries a query string, which Twilio "
                               f"strips: {stream_url}")
        if parts.scheme != "wss":
            self.errors.append(f"31922: stream URL must be wss://, got {stream_url}")

    async def send_start(self, parameters: dict[str, str] | None = None, *,
                         call_sid: str | None = None) -> None:
        """Send ``start``; the media clock (timestamps, pacing) starts now."""
        self._started_at = asyncio.get_running_loop().time()
        await self._send_event("start", start={
            "streamSid": self.stream_sid,
            "accountSid": self.account_sid,
            "callSid": call_sid or self.call_sid,
            "tracks": ["inbound"],
            "customParameters": dict(parameters or {}),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE,
                            "channels": 1},
        })

    async def play(self, audio: bytes | None = None, *, tail_silence_ms: int | None = None,
                   max_ms: float | None = None) -> int:
        """Send caller audio as 160-byte media frames, then tail silence; return bytes sent.

        Each frame leaves when its 20 ms have passed on the media clock (scaled by
        ``speed``), as a phone line delivers it. ``audio`` defaults to the call's,
        ``tail_silence_ms`` to the call's. ``max_ms`` stops after that much call time
        (a caller hanging up mid-sentence). Stops quietly if the socket closes.
        """
        audio = self.audio if audio is None else audio
        tail_ms = self.tail_silence_ms if tail_silence_ms is None else tail_silence_ms
        loop = asyncio.get_running_loop()
        # After a pause the media clock has moved on: timestamps jump, as Twilio's do.
        elapsed_ms = (loop.time() - self._started_at) * 1000 * self.speed
        self._next_media_ms = max(self._next_media_ms, int(elapsed_ms // FRAME_MS) * FRAME_MS)
        first_ms = self._next_media_ms
        sent = 0
        for frame in frames(audio) + frames(silence(tail_ms)):
            if self._closed or (max_ms is not None and self._next_media_ms - first_ms >= max_ms):
                break
            timestamp = self._next_media_ms
            self._next_media_ms += FRAME_MS
            await asyncio.sleep(max(0.0, self._media_time(self._next_media_ms) - loop.time()))
            try:
                await self._send_media(frame, timestamp)
            except websockets.ConnectionClosed:
                break
            sent += len(frame)
        return sent

    def _media_time(self, media_ms: float) -> float:
        """Loop time at which the media clock reads ``media_ms``."""
        return self._started_at + media_ms / 1000 / self.speed

    async def _send_media(self, frame: bytes, timestamp: int) -> None:
        self._chunk += 1
        await self._send_event("media", media={
            "track": "inbound",
            "chunk": str(self._chunk),
            "timestamp": str(timestamp),
            "payload": base64.b64encode(frame).decode("ascii"),
        })
        self.sent_bytes += len(frame)

    async def send_dtmf(self, digit: str) -> None:
        """Send a ``dtmf`` event for one key press."""
        if digit not in DTMF_DIGITS:
            raise ValueError(f"digit must be one of 0-9 * #, got {digit!r}")
        await self._send_event("dtmf", dtmf={"track": "inbound_track", "digit": digit})

    async def stop(self) -> None:
        """End the call as Twilio does: ``stop``, then a normal close. Waits for the close."""
        if self._ws is None:
            return
        try:
            await self._send_event("stop", stop={"accountSid": self.account_sid,
                                                 "callSid": self.call_sid})
            await self._ws.close()
        except websockets.ConnectionClosed:
            pass  # the server closed first: nothing more to say
        await self._reader_done()

    async def close_stream(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket with no ``stop`` first (a Twilio side that goes away without one);
        waits for the close."""
        if self._ws is None:
            return
        await self._ws.close(code, reason)
        await self._reader_done()

    async def send_raw(self, frame: str | bytes) -> None:
        """Send any frame as it is: to misbehave on purpose (garbage, a second ``stop``)."""
        await self._ws.send(frame)

    async def drop(self) -> None:
        """Lose the connection: abort TCP with no ``stop`` and no close frame."""
        if self._ws is None:
            return
        self._ws.transport.abort()
        await self._reader_done()

    async def close(self) -> None:
        """Release everything; a stream still open is dropped (as by ``drop()``)."""
        if self._ws is not None and not self._closed:
            self._ws.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, path: str = "/twiml", *, hangup_after_ms: float | None = None
                  ) -> CallReport:
        """The whole call: webhook, then (if the TwiML streams) connect, play, stop."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        twiml = await self.webhook(path)
        if twiml.stream_url:
            await self.connect()
            await self.play(max_ms=hangup_after_ms)
            if not self._closed:
                await self.stop()
        return self.report(loop.time() - began)

    def report(self, duration_s: float = 0.0) -> CallReport:
        return CallReport(
            call_sid=self.call_sid,
            twiml=self.twiml or TwimlResult(status=0, body=""),
            bytes_sent=self.sent_bytes,
            bytes_received=len(self.received_audio),
            bytes_played=self.played_bytes,
            marks_echoed=list(self.marks_echoed),
            clears=self.clears,
            close_code=self.closed_code,
            close_reason=self.closed_reason,
            errors=list(self.errors),
            duration_s=duration_s,
        )

    # -- waiting ------------------------------------------------------------------------

    async def wait_for_audio(self, nbytes: int, timeout: float = 5) -> int:
        """Wait until ``nbytes`` of server audio have arrived; return the total."""
        await self._wait(lambda: len(self.received_audio) >= nbytes, timeout)
        return len(self.received_audio)

    async def wait_for_played(self, nbytes: int, timeout: float = 5) -> int:
        """Wait until ``nbytes`` of server audio have played; return the total."""
        await self._wait(lambda: self.played_bytes >= nbytes, timeout)
        return self.played_bytes

    async def wait_for_mark(self, count: int = 1, timeout: float = 5) -> list[tuple[str, int]]:
        """Wait until ``count`` marks have been echoed; return them all."""
        await self._wait(lambda: len(self.marks_echoed) >= count, timeout)
        return list(self.marks_echoed)

    async def wait_for_event(self, predicate: Callable[[dict[str, Any]], bool],
                             timeout: float = 5) -> dict[str, Any]:
        """The first server message matching ``predicate``, waiting for it."""
        def first() -> dict[str, Any] | None:
            return next((event for event in self.events if predicate(event)), None)

        return await self._wait(first, timeout)

    async def wait_closed(self, timeout: float = 5) -> int | None:
        """Wait until the socket has closed; return the close code."""
        await self._wait(lambda: self._closed, timeout)
        return self.closed_code

    async def _wait(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Raises TimeoutError when ``predicate`` stays false for ``timeout`` seconds."""
        async with self._changed:
            async with asyncio.timeout(timeout):
                return await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- sending and reading -----------------------------------------------------------

    async def _send_event(self, event: str, **body: Any) -> None:
        """Send one message numbered in send order, as Twilio numbers its messages."""
        if self._ws is None:
            raise RuntimeError("not connected: call connect() first")
        async with self._send_lock:  # the number order must be the wire order
            self._sequence += 1
            message = {"event": event, "sequenceNumber": str(self._sequence),
                       "streamSid": self.stream_sid, **body}
            await self._ws.send(json.dumps(message))

    async def _echo_mark(self, name: str) -> None:
        """Tell the server its mark was reached (played through, or cleared)."""
        played = self.played_bytes
        try:
            await self._send_event("mark", mark={"name": name})
        except websockets.ConnectionClosed:
            return
        self.marks_echoed.append((name, played))
        await self._notify()

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                await self._handle(message)
                await self._notify()
        except websockets.ConnectionClosed:
            pass  # abnormal closes (1006, dropped TCP) end here; the code is kept below
        finally:
            self.closed_code = self._ws.close_code
            self.closed_reason = self._ws.close_reason
            self._closed = True
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()  # the call is over: nothing more plays
            await self._notify()

    async def _reader_done(self) -> None:
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _handle(self, message: str | bytes) -> None:
        """One server → Twilio message; a violation is recorded and the message ignored."""
        if isinstance(message, bytes):
            self._violation(f"31950: binary frame of {len(message)} bytes; Twilio takes text "
                            "frames only")
            return
        try:
            data = json.loads(message)
        except ValueError:
            self._violation(f"message is not JSON: {message[:80]!r}")
            return
        if not isinstance(data, dict):
            self._violation(f"message is not a JSON object: {message[:80]!r}")
            return
        self.events.append(data)
        event = data.get("event")
        handler = {"media": self._on_media, "mark": self._on_mark,
                   "clear": self._on_clear}.get(event)
        if handler is None:
            self._violation(f"unknown event {event!r}")
        elif "streamSid" not in data:
            self._violation(f"{event} without streamSid")
        elif data["streamSid"] != self.stream_sid:
            self._violation(f"{event} for streamSid {data['streamSid']!r}, "
                            f"this stream is {self.stream_sid!r}")
        else:
            await handler(data)

    def _violation(self, what: str) -> None:
        self.errors.append(what)

    async def _on_media(self, data: dict[str, Any]) -> None:
        payload = (data.get("media") or {}).get("payload")
        try:
            audio = base64.b64decode(payload, validate=True)
        except (TypeError, binascii.Error):
            self._violation(f"media without a valid base64 payload: {str(payload)[:40]!r}")
            return
        if self._playout.buffered + len(audio) > MAX_BUFFERED_BYTES:
            self._violation("31931: more than 10 minutes of audio buffered; discarded")
            return
        self.received_audio += audio
        self._playout.add_audio(audio)

    async def _on_mark(self, data: dict[str, Any]) -> None:
        name = (data.get("mark") or {}).get("name")
        if not isinstance(name, str) or not name:
            self._violation("31951: mark without a name")
            return
        self._playout.add_mark(name)

    async def _on_clear(self, data: dict[str, Any]) -> None:
        self.clears += 1
        for name in self._playout.clear():  # Twilio echoes marks pending at a clear at once
            await self._echo_mark(name)


# -- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Play Twilio for one call against a "
                                                 "running Callgate server.")
    parser.add_argument("--server", default="http://127.0.0.1:8081",
                        help="where to send requests (default %(default)s)")
    parser.add_argument("--public-url", default=None,
                        help="the server's PUBLIC_URL, signed over (default: --server)")
    parser.add_argument("--auth-token", default=None,
                        help="TWILIO_AUTH_TOKEN to sign with (default: send no signatures)")
    parser.add_argument("--account-sid", default=None)
    parser.add_argument("--call-sid", default=None)
    parser.add_argument("--from", dest="from_", default="+14155550100")
    parser.add_argument("--to", default="+14155550199")
    parser.add_argument("--direction", default="inbound", choices=["inbound", "outbound-api"])
    parser.add_argument("--audio", default=str(DEFAULT_AUDIO),
                        help="raw μ-law 8 kHz caller audio (default %(default)s)")
    parser.add_argument("--speed", type=float, default=1.0, help="clock factor, 1 = real time")
    parser.add_argument("--tail-silence-ms", type=int, default=1000)
    parser.add_argument("--hangup-after-ms", type=float, default=None,
                        help="hang up after this much call time, even mid-audio")
    parser.add_argument("--path", default="/twiml", help="webhook path (default %(default)s)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra webhook form field (repeatable)")
    parser.add_argument("--shared-key", default=None,
                        help="sign as an account with a Webhooks rule: with this shared key")
    parser.add_argument("--algorithm", default="HMAC_SHA1", choices=["HMAC_SHA1", "HMAC_SHA256"],
                        help="the Webhooks rule's algorithm (with --shared-key)")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    extra = dict(item.split("=", 1) for item in args.param)
    call = SimulatedCall(args.server, public_url=args.public_url, auth_token=args.auth_token,
                         call_sid=args.call_sid, account_sid=args.account_sid,
                         from_=args.from_, to=args.to, direction=args.direction,
                         audio=load_audio(args.audio), speed=args.speed,
                         tail_silence_ms=args.tail_silence_ms, extra_params=extra,
                         shared_key=args.shared_key, algorithm=args.algorithm)
    async with call:
        report = await call.run(args.path, hangup_after_ms=args.hangup_after_ms)
    print(report.format())
    return 1 if report.errors or report.twiml.status != 200 else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if any("=" not in item for item in args.param):
        sys.exit("--param takes NAME=VALUE")
    try:
        sys.exit(asyncio.run(_main(args)))
    except (OSError, aiohttp.ClientError, websockets.WebSocketException) as exc:
        sys.exit(f"simulate_call: {exc}")


if __name__ == "__main__":
    main()

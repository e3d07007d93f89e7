"""Benchmark of the audio relay: N simultaneous calls through a real Callgate, on loopback.

The hot path of a call is the relay: Twilio sends a 20 ms μ-law frame 50 times a second and
the bridge turns each one into an ``input_audio_buffer.append`` for the model; the model
streams ``response.output_audio.delta`` chunks back and the bridge turns each one into a
Twilio ``media`` message (plus a ``mark``, which Twilio echoes). This script runs the real
application (``server.create_app``) on a loopback port with a real PostgreSQL, and puts the
project's loopback peers on both sides of it:

    SimulatedCall ×N (Twilio) ⇄ Callgate /twiml + /call ⇄ FakeRealtime (OpenAI Realtime)
                                      └─ REST hang-ups → FakeTwilioApi

Run from the repository root:

    .venv/bin/python bench/relay.py                          # sweep: 1, 10, 25, 50 calls
    .venv/bin/python bench/relay.py --calls 10 --seconds 10  # one round
    .venv/bin/python bench/relay.py --inline                 # everything in one process
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/relay.py

Without DATABASE_URL it starts the project's embedded PostgreSQL in a temporary folder; with
it, it creates a scratch database ``bench_<random>`` there and drops it at the end. It stops
by itself (every step has a deadline) and prints progress on stderr, the table on stdout.

Where things run. The server always runs in this process (``web.AppRunner`` on 127.0.0.1,
port 0), with the fake Twilio REST API. By default the peers that generate the load run in
two child processes (this script again, with ``--role``): one runs the fake model
(FakeRealtime, real-time pace), the other the N simulated callers; so this process's CPU
time is the server's own. ``--inline`` runs the peers in this process and event loop
instead: simpler, but then the server, N callers and the fake model share one thread, and
the CPU column counts all three. Either way the machine has 2 cores, shared by the server,
the peers and PostgreSQL, and everything is on loopback: read the latencies as upper bounds
on what the relay itself adds, inflated by scheduling noise (real Twilio and OpenAI add tens
to hundreds of ms each on the network).

One round per call count: every call does the webhook, opens its Media Stream and waits for
the model's greeting audio; then, all at once, every caller plays ``--seconds`` of quiet
audio in real time (unique frames, too quiet for the fake's voice detector, so no turn is
taken) while the model streams one long reply in real time (``--chunk-ms`` chunks, 20 ms by
default: 50 a second each way per call). Only that common window is counted; frames still in
flight at its end get ``--grace`` seconds to arrive, then every call hangs up. (Before the
window a caller sends no media, unlike Twilio, which streams silence; the marks it echoes
for the greeting keep its stream alive meanwhile.)

Columns:

    up        caller → model: from SimulatedCall sending a ``media`` frame to FakeRealtime
              reading the ``input_audio_buffer.append`` that carries the same payload
    down      model → caller: from FakeRealtime sending a ``response.output_audio.delta``
              to SimulatedCall reading the Twilio ``media`` message with the same payload
    f/s       frames delivered per second of the window, all calls together (the target is
              50 × calls each way with 20 ms chunks)
    p50/p99/max   latency in ms over every frame of every call in the window
    lost      frames sent in the window and not delivered within the grace period (up/down)
    CPU srv   CPU time of this process (the server; with --inline, everything) over the
              window, as a share of one core
    callers, model   the same for the two peer processes (not shown with --inline)

Under the table, per round: counts (with the server's own frame counters), call setup time,
the server's own handling time per frame from its ``callgate_relay_latency_seconds``
histogram (arrival to relay sent on; p99 as a bucket bound), the server loop's lag (how late
a 10 ms timer fires in the server process: time it could not run), the load average and the
machine's busy CPU over the window: other processes on the machine show there and in the
latencies.

Stamping: each caller frame carries a unique payload (call and frame number spelt in quiet
μ-law codes), each model chunk likewise (session and chunk number in its first bytes). Each
party records payload prefix → time.perf_counter() (CLOCK_MONOTONIC on Linux, one clock for
every process) when it sends or reads a frame, and the script joins the records at the end.
The hooks are subclasses of the peers: ``SimulatedCall._send_media`` / ``_handle`` /
``_on_media``, and ``FakeSession.send`` / ``_receive`` (installed by overriding
``FakeRealtime._handle``, which constructs the session); the peers' files are unchanged.
A receive stamp is taken when the peer's reader gets the message, before it parses it.
The peer processes run with Python's cyclic garbage collector off (their records only grow
during a round, and its full collections stalled them for 200-300 ms at 50 calls); the server
process keeps the default GC, so its own pauses are part of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import logging
import math
import os
import random
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

# The project is not installed: import it from the repository root, inserted first.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import orjson  # noqa: E402
from aiohttp import web  # noqa: E402

from appkeys import LIFECYCLE, METRICS  # noqa: E402
from bench.common import run_database  # noqa: E402
from config import Settings  # noqa: E402
from server import create_app  # noqa: E402
from tools.fake_realtime import FakeRealtime, FakeSession  # noqa: E402
from tools.fake_twilio_api import FakeTwilioApi  # noqa: E402
from tools.simulate_call import FRAME_BYTES, SimulatedCall  # noqa: E402

log = logging.getLogger("bench.relay")

PUBLIC_URL = "https://callgate.test"
AUTH_TOKEN = "twilio-bench-token"
MODEL_KEY = "bench-model-key"
PHONE_KEY = "bench-phone-key-0123456789abcdef0123456789"
QUIET_CODES = (0xF8, 0xF9, 0xFA, 0xFB, 0x78, 0x79, 0x7A, 0x7B)  # μ-law near silence: no VAD
KEY_CHARS = 24  # base64 prefix kept per frame: 18 bytes, covering the unique header
SETUP_TIMEOUT_S = 30.0  # every call must be connected and hearing the greeting by then
TEARDOWN_TIMEOUT_S = 15.0
LINE_LIMIT = 2**27  # the peers' final records travel as one JSON line each


def now() -> float:
    return time.perf_counter()


# --- stamping ---------------------------------------------------------------------------------


@dataclass
class Stamps:
    """One party's records: payload prefix → perf_counter() when sent / when read."""

    sent: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    violations: list[str] = field(default_factory=list)  # callers: Twilio protocol errors seen

    def send(self, payload: str) -> None:
        self.sent[payload[:KEY_CHARS]] = now()

    def receive(self, payload: str, at: float) -> None:
        key = payload[:KEY_CHARS]
        if key in self.received:
            self.duplicates += 1
        else:
            self.received[key] = at

    def to_json(self) -> dict:
        return {"sent": self.sent, "received": self.received, "duplicates": self.duplicates,
                "violations": self.violations}

    @classmethod
    def from_json(cls, data: dict) -> Stamps:
        return cls(data["sent"], data["received"], data["duplicates"], data["violations"])


class BenchSession(FakeSession):
    """A FakeSession that stamps audio: deltas as they leave, appends as they arrive."""

    async def send(self, event: dict) -> None:
        if event.get("type") == "response.output_audio.delta":
            self.fake.stamps.send(event["delta"])
        await super().send(event)

    async def _receive(self, message: str | bytes) -> None:
        at = now()  # before any parsing: the moment the fake's reader got the frame
        if isinstance(message, str) and '"input_audio_buffer.append"' in message:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                self.fake.stamps.receive(orjson.loads(message).get("audio"), at)
        await super()._receive(message)


class BenchRealtime(FakeRealtime):
    """FakeRealtime whose sessions are BenchSessions (a copy of FakeRealtime._handle)."""

    def __init__(self, stamps: Stamps, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stamps = stamps  # sent: model chunks; received: caller frames

    async def _handle(self, ws) -> None:
        session = BenchSession(self, ws, len(self.sessions))
        async with self._sessions_changed:
            self.sessions.append(session)
            self._sessions_changed.notify_all()
        await session.run()


class BenchCall(SimulatedCall):
    """A SimulatedCall that stamps its media frames out and the server's media frames in."""

    def __init__(self, stamps: Stamps, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stamps = stamps  # sent: caller frames; received: model chunks
        self._rx_at = 0.0

    async def _send_media(self, frame: bytes, timestamp: int) -> None:
        self.stamps.send(base64.b64encode(frame[:KEY_CHARS]).decode("ascii"))
        await super()._send_media(frame, timestamp)

    async def _handle(self, message: str | bytes) -> None:
        self._rx_at = now()  # before JSON parsing: the moment the reader got the message
        await super()._handle(message)

    async def _on_media(self, data: dict) -> None:
        payload = (data.get("media") or {}).get("payload")
        if isinstance(payload, str):
            self.stamps.receive(payload, self._rx_at)
        await super()._on_media(data)


# --- audio ------------------------------------------------------------------------------------


def caller_audio(call_index: int, seconds: float) -> bytes:
    """``seconds`` of quiet μ-law whose every 20 ms frame is unique: its first 16 bytes spell
    (call, frame) in base 8 with the quiet codes; the rest is random quiet noise."""
    rng = random.Random(call_index)
    out = bytearray()
    for frame in range(round(seconds * 1000 / 20)):
        value = (call_index << 24) | frame
        head = bytes(QUIET_CODES[(value >> (3 * k)) & 7] for k in range(16))
        out += head + bytes(rng.choices(QUIET_CODES, k=FRAME_BYTES - len(head)))
    return bytes(out)


def reply_audio(chunk_bytes: int, seconds: float) -> Callable[[int, int], bytes]:
    """The model's reply, ``f(session_index, response_index)``: ``seconds`` long, every chunk
    unique (session and chunk numbers in its first 8 bytes, μ-law silence after)."""
    chunks = math.ceil(seconds * 8000 / chunk_bytes)
    filler = b"\xff" * (chunk_bytes - 8)

    def make(session_index: int, response_index: int) -> bytes:
        if response_index:
            return b"\xff" * chunk_bytes  # no later turn is expected; keep any tiny
        return b"".join(struct.pack(">II", session_index, k) + filler for k in range(chunks))

    return make


# --- the peers (run here with --inline, or in child processes) -------------------------------


def make_model(args: argparse.Namespace, stamps: Stamps) -> BenchRealtime:
    # The reply must outlast the setup of every call plus the counted window and the grace.
    reply_s = args.seconds + SETUP_TIMEOUT_S + args.grace + 5
    return BenchRealtime(stamps, api_key=MODEL_KEY, pace=1.0, chunk_ms=args.chunk_ms,
                         record_audio=False, reply_audio=reply_audio(args.chunk_ms * 8, reply_s))


class CallRefused(Exception):
    pass


async def drive_callers(server_url: str, account_sid: str, n: int, first_number: int,
                        args: argparse.Namespace, stamps: Stamps,
                        report: Callable[[dict], None]) -> None:
    """N simulated calls: set up, play together for the window, wait the grace, hang up.

    ``report`` gets {"event": "setup", "ms": [...]}, then "start" and "end" (with "t", the
    window's bounds on perf_counter), then "grace_over"."""
    audio = [caller_audio(i, args.seconds) for i in range(n)]
    calls = [BenchCall(stamps, server_url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                       account_sid=account_sid, from_=f"+1415555{first_number + i:04d}",
                       to="+14155550199", audio=b"", speed=1.0, tail_silence_ms=0)
             for i in range(n)]
    ready, go = asyncio.Event(), asyncio.Event()
    setup_ms: list[float] = []

    async def one(i: int) -> None:
        call = calls[i]
        began = now()
        twiml = await call.webhook()
        if not twiml.stream_url:
            raise CallRefused(f"call {i} ({call.from_}) refused: HTTP {twiml.status} {twiml.say!r}")
        await call.connect()
        await call.wait_for_audio(1, timeout=SETUP_TIMEOUT_S)  # the model is ready and speaking
        setup_ms.append((now() - began) * 1000)
        if len(setup_ms) == n:
            ready.set()
        await go.wait()
        await call.play(audio[i], tail_silence_ms=0)

    progress(f"[{n} calls] setting up (webhook, stream, model greeting) ...")
    tasks = [asyncio.create_task(one(i), name=f"bench-call-{i}") for i in range(n)]
    try:
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({waiter, *tasks}, timeout=SETUP_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            raise TimeoutError(f"only {len(setup_ms)} of {n} calls were set up within {SETUP_TIMEOUT_S:g} s")
        report({"event": "setup", "ms": setup_ms})
        progress(f"[{n} calls] all connected (setup p50 {sorted(setup_ms)[n // 2]:.0f} ms); "
                 f"relaying {args.seconds:g} s ...")
        report({"event": "start", "t": now()})
        go.set()
        async with asyncio.timeout(args.seconds + 60):
            await asyncio.gather(*tasks)
        report({"event": "end", "t": now()})
        await asyncio.sleep(args.grace)  # frames in flight at the end of the window
        report({"event": "grace_over"})
        progress(f"[{n} calls] window done; hanging up ...")
        await asyncio.gather(*(call.stop() for call in calls), return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call in calls:
            await call.close()
            stamps.violations += [f"{call.call_sid}: {error}" for error in call.errors]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def emit(message: dict) -> None:
    """A child's message to the parent: one JSON line on stdout."""
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.flush()


async def model_role(args: argparse.Namespace) -> None:
    """Child: run the fake model; on "dump" (stdin), send the records and stop."""
    stamps = Stamps()
    async with make_model(args, stamps) as model:
        emit({"url": model.url})
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        line = await reader.readline()
        if line.strip() == b"dump":
            emit({"stamps": stamps.to_json()})


async def callers_role(args: argparse.Namespace) -> None:
    """Child: drive the N calls against --server, reporting each step on stdout."""
    stamps = Stamps()
    try:
        await drive_callers(args.server, args.account_sid, args.calls[0], args.first_number, args,
                            stamps, emit)
    except Exception as exc:
        emit({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        raise
    emit({"event": "stamps", "stamps": stamps.to_json()})


# --- the database -----------------------------------------------------------------------------


# --- CPU --------------------------------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of process ``pid`` from /proc."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


class CpuMeter:
    """CPU seconds of some processes, and of the whole machine ("machine"), between
    ``start()`` and ``stop()``; the 1-minute load average when started."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {**pids, "machine": -1}
        self.first: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.load = math.nan

    def _read(self) -> dict[str, float]:
        return {name: machine_busy_seconds() if pid == -1 else cpu_seconds(pid)
                for name, pid in self.pids.items()}

    def start(self) -> None:
        self.load = os.getloadavg()[0]
        self.first = self._read()

    def stop(self) -> None:
        self.used = {name: value - self.first.get(name, math.nan) for name, value in self._read().items()}


# --- one round --------------------------------------------------------------------------------


@dataclass
class Round:
    calls: int
    window_s: float
    cpu_s: dict[str, float]  # "server" (this process), and "callers", "model" when separate
    up_sent: int
    up_latencies: list[float]
    down_sent: int
    down_latencies: list[float]
    unexpected: int  # frames read that nobody sent (or read twice)
    server_relay: dict[str, float]  # the server's relay metrics over the window (see server_relay)
    setup_ms: list[float]
    load: float  # 1-minute load average when the window began
    violations: list[str]
    loop_lag: list[float]  # the server process's timer lateness samples, sorted

    @property
    def up_lost(self) -> int:
        return self.up_sent - len(self.up_latencies)

    @property
    def down_lost(self) -> int:
        return self.down_sent - len(self.down_latencies)

    def cpu_share(self, name: str) -> float:
        return self.cpu_s.get(name, math.nan) / self.window_s if self.window_s else math.nan


def join(callers: Stamps, model: Stamps, start: float, end: float) -> tuple[list[float], int, list[float], int, int]:
    """Latencies and sent counts per direction; down counts chunks the model sent in the window."""
    up = sorted(model.received[k] - t for k, t in callers.sent.items() if k in model.received)
    down_keys = [k for k, t in model.sent.items() if start <= t <= end]
    down = sorted(callers.received[k] - model.sent[k] for k in down_keys if k in callers.received)
    unexpected = (sum(1 for k in model.received if k not in callers.sent)
                  + sum(1 for k in callers.received if k not in model.sent)
                  + callers.duplicates + model.duplicates)
    return up, len(callers.sent), down, len(down_keys), unexpected


def settings_for(dsn: str, twilio_api: FakeTwilioApi, model_url: str, calls: int,
                 seconds: float) -> Settings:
    session_ms = max(300_000, int((seconds + SETUP_TIMEOUT_S + 120) * 1000))
    return Settings.from_env({
        "DATABASE_URL": dsn, "PHONE_ENCRYPTION_KEY": PHONE_KEY, "PORT": "0",
        "PUBLIC_URL": PUBLIC_URL,
        "TWILIO_ACCOUNT_SID": twilio_api.account_sid, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": twilio_api.base_url,
        "OPENAI_API_KEY": MODEL_KEY, "OPENAI_REALTIME_URL": model_url,
        "RATE_LIMIT_PHONE_MAX_CALLS": "10000",
        "RATE_LIMIT_MAX_CONCURRENT_CALLS": str(max(10, 2 * calls)),
        "RATE_LIMIT_SESSION_DURATION": str(session_ms),  # the time limit stays out of the way
    })


@contextlib.asynccontextmanager
async def serving(dsn: str, model_url: str, n: int, args: argparse.Namespace
                  ) -> AsyncIterator[tuple[web.Application, str, str]]:
    """The real app on 127.0.0.1:0 with the fake Twilio REST API: (app, url, account sid)."""
    async with FakeTwilioApi(auth_token=AUTH_TOKEN) as twilio_api:
        settings = settings_for(dsn, twilio_api, model_url, n, args.seconds)
        app = create_app(settings)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            yield app, f"http://127.0.0.1:{runner.addresses[0][1]}", twilio_api.account_sid
            await wait_calls_ended(app)
        finally:
            await runner.cleanup()


DIRECTIONS = {"caller_to_model": "up", "model_to_caller": "down"}


def server_relay(app: web.Application) -> dict[str, float]:
    """The server's own relay metrics, flattened: "<direction>:frames" (the frame counter) and,
    when the server has the histogram, "<direction>:count" / ":sum" / ":le=<bound>" for its
    time from a frame's arrival to its relay being sent on."""
    registry = app[METRICS].registry
    out: dict[str, float] = {}
    for direction in DIRECTIONS:
        out[f"{direction}:frames"] = registry.get_sample_value(
            "callgate_relay_frames_total", {"direction": direction}) or 0.0
    for metric in registry.collect():
        if metric.name != "callgate_relay_latency_seconds":
            continue
        for sample in metric.samples:
            direction = sample.labels.get("direction")
            if sample.name.endswith("_count"):
                out[f"{direction}:count"] = sample.value
            elif sample.name.endswith("_sum"):
                out[f"{direction}:sum"] = sample.value
            elif sample.name.endswith("_bucket"):
                out[f"{direction}:le={sample.labels['le']}"] = sample.value
    return out


def handling_ms(relay: dict[str, float], direction: str) -> tuple[float, str] | None:
    """(mean ms, the bucket bound under which 99 % fall) of the server's own handling time."""
    count = relay.get(f"{direction}:count")
    if not count:
        return None
    prefix = f"{direction}:le="
    bounds = sorted(((float(k[len(prefix):]), v) for k, v in relay.items() if k.startswith(prefix)))
    p99 = next((bound for bound, cumulative in bounds if cumulative >= 0.99 * count), math.inf)
    return relay[f"{direction}:sum"] / count * 1000, ("≤ %g" % (p99 * 1000)) if p99 != math.inf else "> max bucket"


async def wait_calls_ended(app: web.Application) -> None:
    """Give the bridge time to finish its calls (model closed, REST hang-up, record written)."""
    deadline = now() + TEARDOWN_TIMEOUT_S
    while app[LIFECYCLE].calls and now() < deadline:
        await asyncio.sleep(0.05)
    if app[LIFECYCLE].calls:
        log.warning("%d call(s) still live after %g s; shutting down anyway", len(app[LIFECYCLE].calls),
                    TEARDOWN_TIMEOUT_S)


class LagMonitor:
    """How late this process's event loop wakes a 10 ms timer: the time the server could not
    run (busy with other work, or the process waiting for a core)."""

    PERIOD_S = 0.01

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.lags.sort()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.PERIOD_S
            await asyncio.sleep(self.PERIOD_S)
            self.lags.append(loop.time() - due)


class Window:
    """What the callers report, turned into the window's bounds, CPU and server counters."""

    def __init__(self, app_ref: list, meter: CpuMeter) -> None:
        self._app_ref, self.meter = app_ref, meter
        self.lag = LagMonitor()
        self.start = self.end = math.nan
        self.setup_ms: list[float] = []
        self.frames_before: dict[str, float] = {}
        self.frames: dict[str, float] = {}

    def __call__(self, message: dict) -> None:
        event = message.get("event")
        if event == "setup":
            self.setup_ms = sorted(message["ms"])
        elif event == "start":
            self.meter.start()
            self.lag.start()
            self.start = message["t"]
            self.frames_before = server_relay(self._app_ref[0])
        elif event == "end":
            self.meter.stop()
            self.lag.stop()
            self.end = message["t"]
            after = server_relay(self._app_ref[0])
            self.frames = {d: after[d] - self.frames_before.get(d, 0.0) for d in after}
        elif event == "error":
            raise RuntimeError(f"callers: {message['message']}")

    def round(self, n: int, callers: Stamps, model: Stamps) -> Round:
        up, up_sent, down, down_sent, unexpected = join(callers, model, self.start, self.end)
        return Round(n, self.end - self.start, self.meter.used, up_sent, up, down_sent, down,
                     unexpected, self.frames, self.setup_ms, self.meter.load, callers.violations,
                     self.lag.lags)


async def run_round_inline(dsn: str, n: int, args: argparse.Namespace, first_number: int) -> Round:
    callers, model_stamps = Stamps(), Stamps()
    app_ref: list = []
    window = Window(app_ref, CpuMeter({"server": None}))
    async with make_model(args, model_stamps) as model:
        async with serving(dsn, model.url, n, args) as (app, url, account_sid):
            app_ref.append(app)
            await drive_callers(url, account_sid, n, first_number, args, callers, window)
    return window.round(n, callers, model_stamps)


async def run_round_processes(dsn: str, n: int, args: argparse.Namespace, first_number: int) -> Round:
    script = str(Path(__file__).resolve())
    common = ["--seconds", str(args.seconds), "--chunk-ms", str(args.chunk_ms), "--grace", str(args.grace)]
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(*argv: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, script, *argv, *common, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
        procs.append(proc)
        return proc

    async def read(proc: asyncio.subprocess.Process, timeout: float) -> dict | None:
        async with asyncio.timeout(timeout):
            line = await proc.stdout.readline()
        return orjson.loads(line) if line else None

    try:
        model_proc = await spawn("--role", "model")
        hello = await read(model_proc, 30)
        if not hello or "url" not in hello:
            raise RuntimeError("the fake model process did not start")
        app_ref: list = []
        async with serving(dsn, hello["url"], n, args) as (app, url, account_sid):
            app_ref.append(app)
            callers_proc = await spawn("--role", "callers", "--calls", str(n), "--server", url,
                                       "--account-sid", account_sid, "--first-number", str(first_number))
            window = Window(app_ref, CpuMeter({"server": None, "callers": callers_proc.pid,
                                               "model": model_proc.pid}))
            callers = None
            budget = SETUP_TIMEOUT_S + args.seconds + args.grace + 90
            while (message := await read(callers_proc, budget)) is not None:
                if message.get("event") == "stamps":
                    callers = Stamps.from_json(message["stamps"])
                else:
                    window(message)
            if await asyncio.wait_for(callers_proc.wait(), TEARDOWN_TIMEOUT_S) != 0 or callers is None:
                raise RuntimeError(f"the callers process failed (exit {callers_proc.returncode})")
        # After the server let go of every call, so the fake model's records are complete.
        model_proc.stdin.write(b"dump\n")
        await model_proc.stdin.drain()
        answer = await read(model_proc, 30)
        if not answer or "stamps" not in answer:
            raise RuntimeError("the fake model process sent no records")
        await asyncio.wait_for(model_proc.wait(), TEARDOWN_TIMEOUT_S)
        return window.round(n, callers, Stamps.from_json(answer["stamps"]))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()  # only our own children, by their handle
                await proc.wait()


# --- report -----------------------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (seconds), in ms."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] * 1000


def header(inline: bool) -> str:
    cpu = f"{'CPU':>5}" if inline else f"{'CPU srv':>7} {'callers':>7} {'model':>6}"
    return (f"{'calls':>5} | {'up f/s':>7} {'p50':>6} {'p99':>6} {'max':>6} | "
            f"{'down f/s':>8} {'p50':>6} {'p99':>6} {'max':>6} | {'lost up/down':>12} | {cpu}")


def row(r: Round, inline: bool) -> str:
    up, down = r.up_latencies, r.down_latencies
    if inline:
        cpu = f"{r.cpu_share('server'):>5.0%}"
    else:
        cpu = f"{r.cpu_share('server'):>7.0%} {r.cpu_share('callers'):>7.0%} {r.cpu_share('model'):>6.0%}"
    return (f"{r.calls:>5} | {len(up) / r.window_s:>7.0f} {percentile_ms(up, .5):>6.2f} "
            f"{percentile_ms(up, .99):>6.2f} {percentile_ms(up, 1):>6.1f} | "
            f"{len(down) / r.window_s:>8.0f} {percentile_ms(down, .5):>6.2f} "
            f"{percentile_ms(down, .99):>6.2f} {percentile_ms(down, 1):>6.1f} | "
            f"{f'{r.up_lost}/{r.down_lost}':>12} | {cpu}")


def details(r: Round, chunk_ms: int) -> str:
    text = (f"{r.calls:>5} calls: window {r.window_s:.2f} s; up {len(r.up_latencies)}/{r.up_sent} frames, "
            f"down {len(r.down_latencies)}/{r.down_sent} chunks delivered (target {50 * r.calls}/s and "
            f"{r.calls * 1000 / chunk_ms:.0f}/s); server counted {r.server_relay.get('caller_to_model:frames', 0):.0f} up, "
            f"{r.server_relay.get('model_to_caller:frames', 0):.0f} down; setup p50 "
            f"{percentile_ms([s / 1000 for s in r.setup_ms], .5):.0f} ms, max {r.setup_ms[-1]:.0f} ms")
    for direction, short in DIRECTIONS.items():
        handling = handling_ms(r.server_relay, direction)
        if handling is not None:
            text += f"; server handling {short} mean {handling[0]:.3f} ms, p99 {handling[1]} ms"
    lag = r.loop_lag
    text += (f"; server loop lag p50/p99/max {percentile_ms(lag, .5):.1f}/{percentile_ms(lag, .99):.1f}/"
             f"{percentile_ms(lag, 1):.0f} ms; load avg {r.load:.1f}, machine CPU busy "
             f"{r.cpu_share('machine'):.0%} of {os.cpu_count() * 100}%")
    if r.unexpected:
        text += f"; {r.unexpected} frames read that were not sent or read twice"
    if r.violations:
        text += f"; {len(r.violations)} Twilio protocol violations, e.g. {r.violations[0]}"
    return text


# --- main -------------------------------------------------------------------------------------


def parse_calls(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...: {text!r}") from None
    if not counts or any(c < 1 or c > 1000 for c in counts):
        raise argparse.ArgumentTypeError("call counts must be 1..1000")
    return counts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=parse_calls, default=[1, 10, 25, 50],
                        help="simultaneous calls: one value or a comma-separated sweep (default 1,10,25,50)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="counted seconds of caller audio per call (default 10)")
    parser.add_argument("--chunk-ms", type=int, default=20,
                        help="model audio chunk length, ms (default 20: 50 chunks/s per call)")
    parser.add_argument("--grace", type=float, default=2.0,
                        help="seconds allowed for frames in flight after the window (default 2)")
    parser.add_argument("--inline", action="store_true",
                        help="run the callers and the fake model in this process too")
    # Internal: how this script runs its own peer processes.
    parser.add_argument("--role", choices=["model", "callers"], help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--account-sid", help=argparse.SUPPRESS)
    parser.add_argument("--first-number", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < args.seconds <= 600 or not 3 <= args.chunk_ms <= 1000 or not 0 <= args.grace <= 60:
        parser.error("--seconds must be in (0, 600], --chunk-ms in [3, 1000], --grace in [0, 60]")
    if sum(args.calls) > 8000:
        parser.error("at most 8000 calls in all (distinct From numbers +1415555NNNN)")
    return args


async def main(args: argparse.Namespace) -> int:
    if args.role:
        # A peer process is a load generator: its records (and the peers' own logs of every
        # message) only grow during a round, and full collections of them stalled it for
        # 200-300 ms at 50 calls, which showed as relay latency. The server keeps its GC.
        gc.freeze()
        gc.disable()
    if args.role == "model":
        await model_role(args)
        return 0
    if args.role == "callers":
        await callers_role(args)
        return 0
    rounds: list[Round] = []
    progress("starting PostgreSQL ...")
    async with run_database(migrated=False) as (dsn, where):
        first_number = 1000  # distinct From numbers across rounds: +1415555NNNN
        for n in args.calls:
            run = run_round_inline if args.inline else run_round_processes
            budget = SETUP_TIMEOUT_S + args.seconds + args.grace + 3 * TEARDOWN_TIMEOUT_S + 90
            async with asyncio.timeout(budget):
                rounds.append(await run(dsn, n, args, first_number))
            first_number += n
            progress(f"{header(args.inline)}\n{row(rounds[-1], args.inline)}")

    placement = ("server, callers and fake model in ONE process and event loop" if args.inline else
                 "server in this process; callers and fake model in two child processes")
    print(f"Callgate relay benchmark: {args.seconds:g} s counted per round; caller frames 20 ms, "
          f"model chunks {args.chunk_ms} ms, both real time; {where}")
    print(f"{placement}; {os.cpu_count()} cores shared by all of them and PostgreSQL, all on loopback:")
    print("latencies (ms) are upper bounds on what the relay adds, plus scheduling noise.")
    print()
    print(header(args.inline))
    for r in rounds:
        print(row(r, args.inline))
    print()
    if args.inline:
        print("CPU: this process (server + callers + fake model) over the window, share of one core; "
              "near 100 % the one event loop is saturated.")
    else:
        print("CPU: each process over the window, share of one core (srv = the Callgate server alone; "
              "a process near 100 % is saturated).")
    print("Per round: frames delivered / sent in the window, the server's own relay counters, call setup "
          "time, the server's own handling time per frame (its relay latency histogram: arrival to relay "
          "sent on), how late the server's event loop woke a 10 ms timer (time it could not run), the "
          "1-minute load average at the window's start, and all cores' busy time over the window (this "
          "benchmark, PostgreSQL and any other process on the machine).")
    for r in rounds:
        print(details(r, args.chunk_ms))
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {arguments.role or 'server'} %(name)s: %(message)s")
    sys.exit(asyncio.run(main(arguments)))

"""Benchmark of whole calls through real processes: Callgate against a bare forwarder.

    callers (one process) ─ webhook, Media Stream ─▶ Callgate (python server.py, core 0)
                                                        │  Realtime GA, websockets client
                                                        ▼
                                                     echo model (one process)
    PostgreSQL, FakeTwilioApi, this script: core 1 with the callers and the model

``--baseline`` adds, in the same invocation and alternating with Callgate, a bare forwarder
on core 0: an aiohttp WebSocket server that, per connection, opens a websockets client
connection to the echo model and passes every frame between the two unparsed — the least a
relay built on the same libraries can do. Every round prints **Callgate ÷ forwarder**.

Run from the repository root (2 cores needed; ``taskset`` pins the server):

    .venv/bin/python bench/calls.py --calls 300 --baseline                 # one round each
    .venv/bin/python bench/calls.py --calls 300 --phase aligned --baseline
    .venv/bin/python bench/calls.py --series 200:400:50 --baseline         # walk N up
    .venv/bin/python bench/calls.py --burst 150 --calls 300 --cap 250      # set-up under a burst

What a round does: ``--calls`` N calls arrive evenly over ``--ramp`` seconds. Each call (for
Callgate) posts the signed voice webhook, opens the Media Stream the TwiML names with its
token, sends ``connected`` and ``start``, waits for the model's greeting audio (its set-up
time: webhook sent → first model audio heard), then sends a 20 ms μ-law frame every 20 ms
for ``--seconds``; the echo model sends each one back as a ``response.output_audio.delta``,
and the caller matches the payload it hears (the first 6 bytes are the call's and the frame's
number) and echoes every mark, as Twilio does once audio has played. Then ``stop``. A frame
not heard within ``--grace`` seconds of the call's last send is lost.

``--phase spread``: each call sends at its own offset in the 20 ms period (phones are not
synchronised); ``aligned``: every call sends in the same instant, the worst case for the tail.

Figures per round:
    p50/p99/max   round trip of every frame of every call (caller → relay → model → relay →
                  caller), ms; the ramp is included: set-up must not hurt live calls
    loss          frames not heard back / frames sent
    CPU/call-s    the relay's CPU seconds (all its processes) per second of live call, over
                  the window when every call is live
    set-up        p50/p99 of webhook → first model audio (Callgate only)
    RSS           idle before the calls; per live call (live − idle) / N; after the calls end
    peers         CPU share of the callers and model processes: if they approach 100 %, the
                  load generator, not the relay, sets the pace

Capacity: a round passes when p99 ≤ 20 ms and loss ≤ 0.1 %. ``--series a:b:step`` walks N from
a to b and stops at the first round that fails, for each relay.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import math
import os
import re
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is not installed: import it from the repository root

import aiohttp  # noqa: E402
import orjson  # noqa: E402
from aiohttp import web  # noqa: E402

from bench import wsraw  # noqa: E402
from tools.simulate_call import parse_twiml  # noqa: E402

PUBLIC_URL = "https://callgate.test"
AUTH_TOKEN = "bench-twilio-token"
MODEL_KEY = "bench-model-key"
PHONE_KEY = "bench-phone-key-0123456789abcdef0123456789"
FRAME_S = 0.020
FRAME_BYTES = 160
P99_LIMIT_MS = 20.0
LOSS_LIMIT = 0.001
SERVER_CORE, PEER_CORE = 0, 1
WEBHOOK_FORWARDER = "forwarder+webhook"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def install_uvloop(wanted: bool) -> None:
    if wanted:
        with contextlib.suppress(ImportError):
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --- the echo model ---------------------------------------------------------------------------

APPEND = b'{"type":"input_audio_buffer.append","audio":"'
DELTA = (b'{"type":"response.output_audio.delta","event_id":"event_echo","response_id":"resp_echo",'
         b'"item_id":"item_echo","output_index":0,"content_index":0,"delta":"')
GREETING = base64.b64encode(b"\xff" * FRAME_BYTES)


def _event(kind: str, **body) -> bytes:
    return orjson.dumps({"type": kind, "event_id": f"event_{kind}", **body})


class EchoModel(wsraw.ServerPeer):
    """Just enough of the Realtime GA server for a call on ``/v1/realtime``: the session, one
    short greeting per response.create, and every appended audio frame sent straight back as
    an audio delta. On ``/raw`` (the forwarder's far end): every frame back as it came."""

    responses = 0

    def opened(self, head: str) -> None:
        if self.path.startswith("/v1/realtime"):
            self.send(_event("session.created", session={"id": "sess_echo", "type": "realtime"}))

    def text(self, payload: bytes) -> None:
        if not self.path.startswith("/v1/realtime"):
            self.send(payload)
        elif payload.startswith(APPEND):
            self.send(DELTA + payload[len(APPEND):-2] + b'"}')
        else:
            event = orjson.loads(payload)
            kind = event.get("type")
            if kind == "session.update":
                self.send(_event("session.updated", session=event.get("session", {})))
            elif kind == "conversation.item.create":
                self.send(_event("conversation.item.added", item=event.get("item", {})))
            elif kind == "response.create":
                self.responses += 1
                rid, item = f"resp_{self.responses}", f"item_greet{self.responses}"
                self.send(_event("response.created", response={"id": rid, "status": "in_progress"}))
                self.send(_event("response.output_audio.delta", response_id=rid, item_id=item,
                                 output_index=0, content_index=0, delta=GREETING.decode()))
                self.send(_event("response.output_audio.done", response_id=rid, item_id=item,
                                 output_index=0, content_index=0))
                self.send(_event("response.done", response={"id": rid, "status": "completed"}))


# --- the bare forwarder -----------------------------------------------------------------------


async def forward(request: web.Request) -> web.WebSocketResponse:
    """The reference relay: Callgate's libraries, none of its work. Each frame is passed on
    unparsed."""
    import websockets
    caller = web.WebSocketResponse(max_msg_size=2**20, compress=False)
    await caller.prepare(request)
    async with websockets.connect(request.app["upstream"], compression=None, max_size=4 * 2**20) as model:
        async def up() -> None:
            async for msg in caller:
                await model.send(msg.data)

        async def down() -> None:
            async for frame in model:
                await caller.send_str(frame)

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
    return caller


async def webhook(request: web.Request) -> web.Response:
    """What any Twilio bridge must do before a call's stream: check the webhook's signature and
    answer with TwiML. No limiter, no cap, no token, no database: the floor of a webhook."""
    form = dict(await request.post())
    if not request.app["validator"].validate(PUBLIC_URL + "/twiml", form, request.headers.get("X-Twilio-Signature", "")):
        return web.Response(status=403)
    return web.Response(text=request.app["twiml"], content_type="text/xml")


async def serve_role(role: str, port: int, upstream: str, with_webhook: bool = False) -> None:
    loop = asyncio.get_running_loop()
    if role == "echo":
        server = await loop.create_server(EchoModel, "127.0.0.1", port, backlog=4096)
        cleanup = server.close
    else:
        app = web.Application()
        app["upstream"] = upstream
        app.router.add_get("/call", forward)
        if with_webhook:
            from twilio.request_validator import RequestValidator
            app["validator"] = RequestValidator(AUTH_TOKEN)
            app["twiml"] = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
                            f'<Stream url="ws://127.0.0.1:{port}/call" /></Connect></Response>')
            app.router.add_post("/twiml", webhook)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        cleanup = runner.cleanup
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    result = cleanup()
    if asyncio.iscoroutine(result):
        await result


# --- the callers ------------------------------------------------------------------------------


@dataclass
class CallRecord:
    setup_s: float = float("nan")
    sent: int = 0
    heard: int = 0
    refused: str | None = None


class Caller(wsraw.ClientPeer):
    """Twilio's side of one Media Stream: stamps each frame it sends, matches each it hears,
    echoes every mark at once (the audio 'played')."""

    def __init__(self, callers: Callers, index: int, record: CallRecord) -> None:
        super().__init__()
        self.callers, self.index, self.record = callers, index, record
        self.sent_at: dict[int, float] = {}
        self.greeted = asyncio.get_running_loop().create_future()
        self.upgraded = asyncio.get_running_loop().create_future()  # the server said 101
        self.started = 0.0
        self.seq = 0
        self.stream_sid = f"MZ{index:032x}"
        self._media_head = ('{"event":"media","streamSid":"' + self.stream_sid + '","sequenceNumber":"').encode()

    def opened(self, head: str) -> None:
        self.upgraded.set_result(None)

    def text(self, payload: bytes) -> None:
        if payload.startswith(b'{"event":"media"'):
            t = time.perf_counter()
            start = payload.index(b'"payload":"') + 11
            key = payload[start:start + 8]
            if key == GREETING[:8]:
                if not self.greeted.done():
                    self.record.setup_s = t - self.started
                    self.greeted.set_result(None)
                return
            number, seq = struct.unpack(">HI", base64.b64decode(key))
            sent = self.sent_at.pop(seq, None)
            if number == self.index and sent is not None:
                self.callers.latencies.append((t - sent) * 1000)
                self.record.heard += 1
        elif payload.startswith(b'{"event":"mark"'):
            self.send(payload)  # Twilio echoes a mark once the audio before it has played
        elif payload.startswith(b'{"event":"start"') and self.callers.cfg["target"] != "callgate":
            if not self.greeted.done():  # (the raw echo sends our own start back)
                self.record.setup_s = time.perf_counter() - self.started
                self.greeted.set_result(None)

    def send_media(self) -> None:
        seq = self.seq
        self.seq += 1
        payload = base64.b64encode(struct.pack(">HI", self.index, seq) + FILL)
        self.sent_at[seq] = time.perf_counter()
        self.send(b"".join((self._media_head, str(seq + 2).encode(), b'","media":{"track":"inbound","chunk":"',
                            str(seq + 1).encode(), b'","timestamp":"', str(seq * 20).encode(),
                            b'","payload":"', payload, b'"}}')))
        self.record.sent += 1


FILL = b"\xfa" * (FRAME_BYTES - 6)


class Callers:
    """N calls from one process: the webhook and the stream for Callgate, the stream alone for
    the forwarder. One timer every millisecond sends the frames due in that millisecond."""

    def __init__(self, cfg: dict) -> None:
        from twilio.request_validator import RequestValidator
        self.cfg = cfg
        self.records = [CallRecord() for _ in range(cfg["calls"])]
        self.latencies: list[float] = []
        self.validator = RequestValidator(AUTH_TOKEN)
        self.slots: list[list[Caller]] = [[] for _ in range(20)]  # by ms within the 20 ms period
        self.set_up = 0
        self.all_set_up = asyncio.Event()
        self.first_stop = asyncio.Event()

    def mark(self, line: str) -> None:
        print(f"{line} {time.monotonic():.6f}", flush=True)

    def _setup_done(self) -> None:
        self.set_up += 1
        if self.set_up == self.cfg["calls"]:
            self.all_set_up.set()

    def _tick(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        slot = self.slots[int(round(when * 1000)) % 20]
        for caller in list(slot):
            if caller.seq >= caller.frames or caller.transport.is_closing():
                slot.remove(caller)
                caller.done.set_result(None)
            else:
                caller.send_media()
        loop.call_at(when + 0.001, self._tick, when + 0.001)

    async def run(self) -> dict:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        first = math.ceil(loop.time() * 1000) / 1000 + 0.001
        loop.call_at(first, self._tick, first)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
            begin = loop.time() + 0.2
            tasks = [asyncio.create_task(self.call(http, i, begin + cfg["ramp"] * i / max(1, cfg["calls"])))
                     for i in range(cfg["calls"])]  # (call i is the run's call first + i)
            await self.all_set_up.wait()
            self.mark("steady")
            await self.first_stop.wait()
            self.mark("ending")
            await asyncio.gather(*tasks)
        latencies = sorted(self.latencies)
        setups = sorted(r.setup_s for r in self.records if r.setup_s == r.setup_s)
        refused: dict[str, int] = {}
        for r in self.records:
            if r.refused:
                refused[r.refused] = refused.get(r.refused, 0) + 1
        return {
            "sent": sum(r.sent for r in self.records), "heard": sum(r.heard for r in self.records),
            "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99), "max": latencies[-1] if latencies else None,
            "setup_p50": pct(setups, 0.5), "setup_p99": pct(setups, 0.99), "setup_max": setups[-1] if setups else None,
            "refused": refused, "answered": len(setups),
        }

    async def call(self, http: aiohttp.ClientSession, index: int, at: float) -> None:
        cfg = self.cfg
        record = self.records[index]
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, at - loop.time()))
        started = time.perf_counter()
        serial = cfg.get("first", 0) + index  # unique in the run: CallSid, number, address
        call_sid = f"CA{serial:032x}"
        # Twilio's media servers are many addresses: one per call, as Fly's proxy reports it.
        headers = {"Fly-Client-IP": f"10.{serial >> 16 & 255}.{serial >> 8 & 255}.{serial & 255}"}
        params: dict[str, str] = {}
        try:
            if cfg["target"] != "forwarder":  # Callgate, and the forwarder with a webhook
                form = {"CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "From": f"+1415555{serial % 10000:04d}",
                        "To": "+14155550199", "Direction": "inbound", "CallStatus": "ringing",
                        "ApiVersion": "2010-04-01"}
                signature = self.validator.compute_signature(PUBLIC_URL + "/twiml", form)
                async with http.post(cfg["url"] + "/twiml", data=form,
                                     headers={**headers, "X-Twilio-Signature": signature}) as resp:
                    twiml = parse_twiml(resp.status, await resp.text())
                if not twiml.stream_url:
                    record.refused = f"webhook {resp.status} {twiml.say or twiml.body[:60]}"
                    self._setup_done()
                    return
                params = twiml.parameters
                headers["X-Twilio-Signature"] = self.validator.compute_signature(twiml.stream_url, {})
            caller = Caller(self, index, record)
            caller.started, caller.frames, caller.done = started, int(cfg["seconds"] / FRAME_S), loop.create_future()
            await loop.create_connection(lambda: caller, "127.0.0.1", cfg["port"])
            caller.request(f"127.0.0.1:{cfg['port']}", "/call", headers)
            await asyncio.wait([caller.upgraded, caller.closed], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if not caller.upgraded.done():
                record.refused = f"stream {caller.status or 'closed'}"
                self._setup_done()
                return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            record.refused = type(exc).__name__
            self._setup_done()
            return
        try:
            stream_sid = caller.stream_sid
            caller.send(orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            caller.send(orjson.dumps({
                "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
                "start": {"streamSid": stream_sid, "accountSid": "AC" + "0" * 32, "callSid": call_sid,
                          "tracks": ["inbound"], "customParameters": params,
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
            }))
            done, _ = await asyncio.wait([caller.greeted, caller.closed], timeout=30,
                                         return_when=asyncio.FIRST_COMPLETED)
            self._setup_done()
            if caller.greeted not in done:
                record.refused = "no greeting"
                return
            # Aligned: every call sends in the same millisecond of the period; spread: its own.
            self.slots[0 if cfg["phase"] == "aligned" else index % 20].append(caller)
            await asyncio.wait([caller.done, caller.closed], return_when=asyncio.FIRST_COMPLETED)
            self.first_stop.set()
            # Frames still on their way get the grace period; then the caller hangs up.
            deadline = loop.time() + cfg["grace"]
            while caller.sent_at and loop.time() < deadline and not caller.closed.done():
                await asyncio.sleep(0.05)
            caller.send(orjson.dumps({"event": "stop", "streamSid": stream_sid, "stop": {"callSid": call_sid}}))
        finally:
            self.first_stop.set()
            caller.close()


def pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


async def run_callers(cfg: dict) -> None:
    gc.disable()  # the records only grow: full collections would stall the load, not the relay
    result = await Callers(cfg).run()
    print("result " + orjson.dumps(result).decode(), flush=True)


# --- the orchestrator -------------------------------------------------------------------------


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """pid and its descendants (the workers of a server started with several)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def core_times() -> dict[int, tuple[int, int]]:
    """core → (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *values = line.split()
            v = [int(x) for x in values]
            out[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))
    return out


def busy_share(before: dict, after: dict, core: int) -> float:
    busy = after[core][0] - before[core][0]
    return busy / max(1, after[core][1] - before[core][1])


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


class Child:
    """This script in another role, its stdout read line by line."""

    def __init__(self, name: str, *argv: str, core: int | None = None, env: dict | None = None,
                 script: list[str] | None = None) -> None:
        self.name, self.argv, self.core, self.env = name, argv, core, env
        self.script = script or [sys.executable, str(Path(__file__).resolve())]
        self.process: asyncio.subprocess.Process | None = None
        self.lines: asyncio.Queue[str] = asyncio.Queue()

    async def start(self, log: Path | None = None) -> None:
        core = self.core
        stderr = open(log, "ab") if log else None  # noqa: SIM115 - handed to the child
        self.process = await asyncio.create_subprocess_exec(
            *self.script, *self.argv, stdout=asyncio.subprocess.PIPE, stderr=stderr or asyncio.subprocess.DEVNULL,
            env=self.env, cwd=ROOT, limit=2**26,
            preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)
        if stderr:
            stderr.close()
        asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for line in self.process.stdout:
            await self.lines.put(line.decode().rstrip("\n"))

    async def expect(self, prefix: str, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.lines.get()
                if line.startswith(prefix):
                    return line

    @property
    def pids(self) -> list[int]:
        return tree(self.process.pid)

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def setup_quantiles(url: str) -> dict[str, tuple[float, float]]:
    """callgate_call_setup_seconds from /metrics: stage → (p50, p99), each the upper bound of
    the bucket it falls in (counted since the server started: the warm-up calls included)."""
    from prometheus_client.parser import text_string_to_metric_families
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        text = await resp.text()
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "callgate_call_setup_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets.setdefault(sample.labels["stage"], []).append(
                        (float(sample.labels["le"]), sample.value))
    out = {}
    for stage, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        if total:
            out[stage] = tuple(next(le for le, n in rows if n >= q * total) for q in (0.5, 0.99))
    return out


async def wait_http(url: str, timeout: float = 30) -> None:
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as resp:
                    if resp.status == 200 and (await resp.json()).get("status") == "ok":
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ok within {timeout} s")
            await asyncio.sleep(0.1)


@dataclass
class Round:
    target: str
    calls: int
    result: dict
    cpu_per_call_s: float
    server_share: float
    peers_share: float
    rss_idle: int
    rss_live: int
    rss_after: int
    admitted: int | None = None
    db_timeouts: int | None = None
    core_busy: tuple[float, float] = (0.0, 0.0)  # the relay's core, the load's core
    cpu_per_call: float = 0.0  # the relay's CPU from idle to idle again, per call
    server_setup: dict = field(default_factory=dict)  # stage → (p50, p99) bucket bounds, s

    @property
    def loss(self) -> float:
        return 1 - self.result["heard"] / max(1, self.result["sent"])

    @property
    def passed(self) -> bool:
        return (self.result["p99"] is not None and self.result["p99"] <= P99_LIMIT_MS and self.loss <= LOSS_LIMIT
                and not self.result["refused"])

    def line(self) -> str:
        r = self.result
        per_call = (self.rss_live - self.rss_idle) / max(1, self.calls) / 1024
        setup = (f"  set-up p50 {r['setup_p50'] * 1000:.1f} p99 {r['setup_p99'] * 1000:.1f} ms"
                 if self.target == "callgate" and r["setup_p50"] is not None else "")
        refused = f"  refused {r['refused']}" if r["refused"] else ""
        setup += f"  CPU per call, whole life {self.cpu_per_call * 1000:.1f} ms"
        if self.server_setup:  # the server's own view, as bucket bounds ("≤")
            setup += "  server-side " + ", ".join(f"{stage} p50 ≤{p50 * 1000:g} p99 ≤{p99 * 1000:g} ms"
                                                   for stage, (p50, p99) in sorted(self.server_setup.items()))
        return (f"{self.target:9} N={self.calls:<4} {'pass' if self.passed else 'FAIL'}  "
                f"p50 {r['p50'] or 0:.1f} p99 {r['p99'] or 0:.1f} max {r['max'] or 0:.0f} ms  "
                f"loss {self.loss * 100:.2f} %  CPU/call-s {self.cpu_per_call_s * 1000:.2f} ms "
                f"(server {self.server_share * 100:.0f} %, peers {self.peers_share * 100:.0f} %, "
                f"cores {self.core_busy[0] * 100:.0f}/{self.core_busy[1] * 100:.0f} % busy)  "
                f"RSS idle {self.rss_idle / 2**20:.0f} MiB, {per_call:.1f} KiB/call, "
                f"after {self.rss_after / 2**20:.0f} MiB{setup}{refused}")


class Bench:
    def __init__(self, args: argparse.Namespace, dsn: str, folder: Path) -> None:
        self.args, self.dsn, self.folder = args, dsn, folder
        self._next_call = 0

    def server_env(self, echo_port: int, twilio_url: str) -> dict[str, str]:
        from config import VARIABLES
        names = {v.name for v in VARIABLES}
        env = {k: v for k, v in os.environ.items() if k not in names}
        env |= {
            "PUBLIC_URL": PUBLIC_URL, "DATABASE_URL": self.dsn, "PHONE_ENCRYPTION_KEY": PHONE_KEY,
            "TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_API_BASE_URL": twilio_url, "TWILIO_PHONE_NUMBER_US": "+14155550000",
            "OPENAI_API_KEY": MODEL_KEY, "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{echo_port}/v1/realtime",
            "RATE_LIMIT_PHONE_MAX_CALLS": "1000", "RATE_LIMIT_MAX_CONCURRENT_CALLS": str(self.args.cap),
            "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", "EVENT_LOOP": self.args.loop,
            "TRUST_FLY_CLIENT_IP": "yes",  # the callers stand for Twilio's many media servers
        }
        for assignment in self.args.env:
            name, _, value = assignment.partition("=")
            env[name] = value
        return env

    async def round(self, target: str, calls: int, echo_port: int, twilio_url: str) -> Round:
        args = self.args
        port = free_port()
        log = self.folder / f"{target}-{calls}.log"
        if target == "callgate":
            server = Child(target, "--host", "127.0.0.1", "--port", str(port), *args.server_args,
                           core=SERVER_CORE, env=self.server_env(echo_port, twilio_url),
                           script=[sys.executable, *(["-m", "cProfile", "-o", args.cprofile] if args.cprofile else []),
                                   str(ROOT / "server.py")])
        else:
            server = Child(target, "--role", "forwarder", "--port", str(port),
                           "--upstream", f"ws://127.0.0.1:{echo_port}/raw", "--loop", args.loop,
                           *(["--webhook"] if target == WEBHOOK_FORWARDER else []), core=SERVER_CORE)
        await server.start(log)
        try:
            if target == "callgate":
                await wait_http(f"http://127.0.0.1:{port}/healthz")
            else:
                await server.expect("ready", 30)
            if args.warmup:
                # A few calls first, as a server in service has had: its pool open, its
                # statements prepared, its code paths imported. Not counted.
                await self._callers(target, args.warmup, port, ramp=1.0, seconds=1.0)
            await asyncio.sleep(args.settle)
            pids = server.pids
            rss_idle, cpu_idle = rss_bytes(pids), cpu_s(pids)
            callers = await self._start_callers(target, calls, port, ramp=args.ramp, seconds=args.seconds)
            peers = [callers.process.pid, self.echo.process.pid]
            timeout = args.ramp + 60
            await callers.expect("steady", timeout)
            cpu0, peer0, t0, cores0 = cpu_s(pids), cpu_s(peers), time.monotonic(), core_times()
            rss_live = rss_bytes(pids)
            await callers.expect("ending", args.seconds + 60)
            cpu1, peer1, t1, cores1 = cpu_s(pids), cpu_s(peers), time.monotonic(), core_times()
            line = await callers.expect("result", args.grace + 60)
            await callers.process.wait()
            result = orjson.loads(line.split(" ", 1)[1])
            # The calls' ends are written and their sockets closed by now; give the server a
            # moment to finish its own bookkeeping before reading what it kept.
            await asyncio.sleep(args.settle)
            rss_after, cpu_end = rss_bytes(pids), cpu_s(pids)
            window = max(1e-9, t1 - t0)
            answered = max(1, result["answered"])
            db_timeouts, server_setup = None, {}
            if target == "callgate":
                server_setup = await setup_quantiles(f"http://127.0.0.1:{port}/metrics")
                text = log.read_text(errors="replace")
                db_timeouts = len(re.findall(r"timed? ?out|TimeoutError|connection_lost", text, re.IGNORECASE))
            return Round(target, calls, result, (cpu1 - cpu0) / (answered * window), (cpu1 - cpu0) / window,
                         (peer1 - peer0) / window, rss_idle, rss_live, rss_after,
                         admitted=result["answered"], db_timeouts=db_timeouts,
                         core_busy=(busy_share(cores0, cores1, SERVER_CORE), busy_share(cores0, cores1, PEER_CORE)),
                         cpu_per_call=(cpu_end - cpu_idle) / max(1, calls), server_setup=server_setup)
        finally:
            await server.stop()

    async def _start_callers(self, target: str, calls: int, port: int, *, ramp: float, seconds: float) -> Child:
        cfg = {"calls": calls, "seconds": seconds, "ramp": ramp, "phase": self.args.phase, "grace": self.args.grace,
               "target": target, "url": f"http://127.0.0.1:{port}", "port": port, "first": self._next_call}
        self._next_call += calls  # every call of a run its own CallSid and number
        callers = Child("callers", "--role", "callers", "--config", orjson.dumps(cfg).decode(), core=PEER_CORE)
        await callers.start(self.folder / "callers.log")
        return callers

    async def _callers(self, target: str, calls: int, port: int, *, ramp: float, seconds: float) -> dict:
        callers = await self._start_callers(target, calls, port, ramp=ramp, seconds=seconds)
        line = await callers.expect("result", ramp + seconds + 60)
        await callers.process.wait()
        return orjson.loads(line.split(" ", 1)[1])

    async def run(self) -> int:
        from tools.fake_twilio_api import FakeTwilioApi
        echo_port = free_port()
        self.echo = Child("echo", "--role", "echo", "--port", str(echo_port), core=PEER_CORE)
        await self.echo.start(self.folder / "echo.log")
        await self.echo.expect("ready", 30)
        twilio_api = FakeTwilioApi(account_sid="AC" + "0" * 32, auth_token=AUTH_TOKEN)
        await twilio_api.start()
        try:
            return await self._rounds(echo_port, twilio_api.base_url)
        finally:
            await twilio_api.close()
            await self.echo.stop()

    async def _rounds(self, echo_port: int, twilio_url: str) -> int:
        args = self.args
        counts = ([args.calls] if not args.series else
                  list(range(args.series[0], args.series[1] + 1, args.series[2])))
        targets = (["callgate"] + (["forwarder"] if args.baseline else [])
                   + ([WEBHOOK_FORWARDER] if args.webhook_baseline else []))
        best: dict[str, int] = {}
        failed: set[str] = set()
        rounds: list[Round] = []
        for n, calls in enumerate(counts):
            order = targets if n % 2 == 0 else targets[::-1]  # alternate who goes first
            for target in order:
                if target in failed:
                    continue
                print(f"# {target}, {calls} calls ...", file=sys.stderr, flush=True)
                r = await self.round(target, calls, echo_port, twilio_url)
                rounds.append(r)
                print(r.line(), flush=True)
                if target == "callgate" and (args.burst or args.cap < 100000):
                    print(f"          admitted {r.admitted} of {calls} (cap {args.cap}); "
                          f"database timeouts in the log: {r.db_timeouts}", flush=True)
                if r.passed:
                    best[target] = calls
                elif args.series:
                    failed.add(target)
            if failed >= set(targets):
                break
        if args.baseline or args.webhook_baseline:
            self.ratios(rounds, best)
        return 0

    def ratios(self, rounds: list[Round], best: dict[str, int]) -> None:
        by = {(r.target, r.calls): r for r in rounds}
        for reference in ("forwarder", WEBHOOK_FORWARDER):
            if not any(t == reference for t, _ in by):
                continue
            print(f"\nCallgate ÷ {reference}, same run:")
            for (target, calls), r in by.items():
                f = by.get((reference, calls))
                if target == "callgate" and f and r.result["p99"] and f.result["p99"] and f.cpu_per_call_s:
                    print(f"  N={calls}: CPU per call-second {r.cpu_per_call_s / f.cpu_per_call_s:.2f}×, "
                          f"p99 {r.result['p99'] / f.result['p99']:.2f}×, "
                          f"RSS per live call {(r.rss_live - r.rss_idle) / max(1, f.rss_live - f.rss_idle):.2f}×, "
                          f"CPU per call, whole life {r.cpu_per_call * 1000:.1f} vs {f.cpu_per_call * 1000:.1f} ms")
            cg, fw = best.get("callgate", 0), best.get(reference, 0)
            print(f"  capacity (largest N passing): Callgate {cg}, {reference} {fw}"
                  + (f": {cg / fw:.2f}×" if fw else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["echo", "forwarder", "callers"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--config", default="{}")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0, help="media per call (s)")
    parser.add_argument("--ramp", type=float, default=2.0, help="calls arrive evenly over this many s")
    parser.add_argument("--burst", type=float, default=0.0, help="arrivals per second (sets --ramp)")
    parser.add_argument("--phase", choices=["spread", "aligned"], default="spread")
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=3.0, help="s after the calls before RSS is read")
    parser.add_argument("--warmup", type=int, default=10, help="calls before the counted ones (0: a cold server)")
    parser.add_argument("--cap", type=int, default=100000, help="RATE_LIMIT_MAX_CONCURRENT_CALLS")
    parser.add_argument("--baseline", action="store_true", help="the bare forwarder too, alternating")
    parser.add_argument("--webhook-baseline", action="store_true",
                        help="also the forwarder with a signature-checked webhook before each stream (the floor of set-up)")
    parser.add_argument("--webhook", action="store_true", help=argparse.SUPPRESS)  # the forwarder role's
    parser.add_argument("--series", type=lambda s: tuple(int(x) for x in s.split(":")), default=None,
                        help="a:b:step: walk N up, stop at the first failure")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="the relays' event loop: Callgate's EVENT_LOOP and the forwarder's")
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the Callgate process")
    parser.add_argument("--cprofile", metavar="FILE", help="run Callgate under cProfile, its stats to FILE")
    parser.add_argument("--server-args", nargs="*", default=[], help="extra arguments for server.py")
    args = parser.parse_args(argv)
    if args.role is None:
        print(f"# relays on {args.loop}", file=sys.stderr)
    if args.burst:
        args.ramp = args.calls / args.burst
    return args


async def amain(args: argparse.Namespace) -> int:
    if args.role in ("echo", "forwarder"):
        await serve_role(args.role, args.port, args.upstream, args.webhook)
        return 0
    if args.role == "callers":
        await run_callers(orjson.loads(args.config))
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 cores (one for the relay, one for everything else)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {PEER_CORE})  # PostgreSQL, started below, inherits it
    from bench.common import run_database
    with tempfile.TemporaryDirectory(prefix="callgate-calls-") as folder:
        async with run_database(migrated=False) as (dsn, where):
            print(f"# {where}; relay on core {SERVER_CORE}, everything else on core {PEER_CORE}; "
                  f"{args.seconds:.0f} s calls, {args.ramp:g} s ramp, {args.phase} phases", flush=True)
            try:
                return await Bench(args, dsn, Path(folder)).run()
            finally:
                if os.environ.get("BENCH_KEEP_LOGS"):  # a folder to copy the processes' logs to
                    for log in Path(folder).glob("*.log"):
                        (Path(os.environ["BENCH_KEEP_LOGS"]) / log.name).write_bytes(log.read_bytes())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The load (callers, model) always runs on uvloop when it can: the lighter the load
    # generator, the less it shares of the figures. A relay runs on the loop asked for.
    install_uvloop(args.role != "forwarder" or args.loop == "uvloop")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

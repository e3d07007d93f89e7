"""The stage every fault scenario plays on: real Callgate processes, a real PostgreSQL that
can be restarted, crashed or cut off, and the loopback peers for what this machine cannot
reach.

    PostgreSQL (embedded, its own temporary folder)
        ▲  TcpProxy (tools/tcp_proxy.py): forward, stall (a black hole), cut (resets)
        │
    Callgate ×N (``python server.py`` subprocesses, JSON logs to files)
        ▲  webhooks, Media Streams (SimulatedCall), /logs (Frontend), /healthz, /metrics
        │
    this process: the callers, the browsers, FakeTwilioApi (REST), FakeRealtime (model)

Everything on loopback. The database is always the embedded one, even with DATABASE_URL set:
the scenarios stop and crash it, which a shared server would not allow.

An ``Outcome`` collects what a scenario measured (``figures``, for docs/reliability.md) and
what it checked (``check``: each a sentence and whether it held); a scenario passes when every
check holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the project is not installed: import it from the repository root

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from twilio.request_validator import RequestValidator  # noqa: E402

from config import VARIABLES  # noqa: E402
from db.embedded import EmbeddedPostgres  # noqa: E402
from tools.fake_realtime import FakeRealtime  # noqa: E402
from tools.fake_twilio_api import FakeTwilioApi  # noqa: E402
from tools.simulate_call import SimulatedCall  # noqa: E402
from tools.tcp_proxy import TcpProxy, proxied  # noqa: E402

PUBLIC_URL = "https://callgate.test"
AUTH_TOKEN = "soak-twilio-token"
MODEL_KEY = "soak-model-key"
PHONE_KEY = "soak-phone-key-0123456789abcdef0123456789"
ADMIN_TOKEN = "soak-admin-token-0123456789abcdef"
CALLER_ID = "+14155550000"
START_TIMEOUT_S = 30.0


def now() -> float:
    return time.monotonic()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def number(i: int) -> str:
    """The i-th made-up caller (i < 10 000): valid US numbers, distinct per scenario."""
    return f"+1415555{i:04d}"


def random_address(rng: random.Random = random.Random()) -> str:
    """A client address for Fly-Client-IP (the servers trust it here), so that per-address
    limits do not throttle a load generator that stands for many browsers."""
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- outcomes ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    scenario: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def check(self, ok: bool, what: str) -> bool:
        self.checks.append((what, bool(ok)))
        print(f"  {'PASS' if ok else 'FAIL'}  {what}", file=sys.stderr, flush=True)
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks)

    def report(self) -> str:
        lines = [f"{self.scenario}: {'passed' if self.passed else 'FAILED'} "
                 f"({time.time() - self.started:.0f} s)"]
        lines += [f"  {name}: {value}" for name, value in self.figures.items()]
        lines += [f"  [{'x' if ok else ' '}] {what}" for what, ok in self.checks]
        return "\n".join(lines)


# --- PostgreSQL -------------------------------------------------------------------------------


class Postgres:
    """The embedded PostgreSQL in a temporary folder, on a fixed port across restarts."""

    def __init__(self, folder: Path) -> None:
        self.embedded = EmbeddedPostgres(folder / "pg")

    @property
    def dsn(self) -> str:
        return self.embedded.dsn

    async def start(self) -> None:
        await asyncio.to_thread(self.embedded.start)

    async def stop(self, mode: str = "fast") -> None:
        await asyncio.to_thread(self.embedded.stop, mode)


# --- Callgate processes -----------------------------------------------------------------------


class Server:
    """One Callgate process: ``python server.py`` with its own environment and log file."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name, self.env, self.log_path = name, env, log_path
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.listening_after = float("nan")  # seconds from start() to its first answer
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, until: str = "ok") -> float:
        """Start it; returns the seconds until it listened (``until="listening"``) or until
        /healthz said ok (``until="ok"``)."""
        began = now()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", str(self.port),
                env=self.env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} at start:\n"
                                   + self.log_path.read_text()[-3000:])
            if now() - began > START_TIMEOUT_S:
                raise TimeoutError(f"{self.name} not {until} within {START_TIMEOUT_S} s")
            status, body, _ = await self.healthz()
            if status and self.listening_after != self.listening_after:  # still NaN: the first answer
                self.listening_after = now() - began
            if status and (until == "listening" or body.get("status") == "ok"):
                return now() - began
            await asyncio.sleep(0.05)

    async def healthz(self) -> tuple[int, dict, float]:
        """(HTTP status, body, seconds it took); status 0 when nothing answered."""
        began = now()
        try:
            async with self._http.get(self.url + "/healthz") as response:
                return response.status, await response.json(), now() - began
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, {}, now() - began

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics: (name, sorted labels) → value."""
        async with self._http.get(self.url + "/metrics") as response:
            text = await response.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, tuple(sorted(labels.items()))), 0.0)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        """SIGTERM and wait (the drain is short on the stage), SIGKILL if it hangs."""
        if self.process is not None and self.process.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await self.wait(30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._http is not None:
            await self._http.close()
            self._http = None

    def log(self) -> list[dict]:
        """Its log so far, one dict per line (a line that is not JSON: level "raw")."""
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = None
            entries.append(entry if isinstance(entry, dict) else {"level": "raw", "msg": line})
        return entries

    def errors(self) -> list[str]:
        """ERROR lines, tracebacks and anything not logged as JSON: what an operator is woken by."""
        return [f"{e.get('level')} {e.get('logger', '')}: {e.get('msg', '')[:160]}"
                + (" [traceback]" if e.get("exc") else "")
                for e in self.log() if e.get("level") in ("error", "critical", "raw") or e.get("exc")]

    def warnings(self) -> list[str]:
        return [e.get("msg", "") for e in self.log() if e.get("level") == "warning"]


# --- browsers ---------------------------------------------------------------------------------


class Frontend:
    """One /logs client: every message it is sent is kept in ``received``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession) -> None:
        self.ws, self._session = ws, session
        self.received: list[dict] = []
        self.close_code: int | None = None
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, server: Server, address: str | None = None) -> Frontend:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(server.url + "/logs", timeout=aiohttp.ClientWSTimeout(ws_close=2),
                                          headers={"Fly-Client-IP": address or random_address()})
        except BaseException:
            await session.close()
            raise
        return cls(ws, session)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.received.append(orjson.loads(message.data))
                    async with self._changed:
                        self._changed.notify_all()
        finally:
            self.close_code = self.ws.close_code
            async with self._changed:
                self._changed.notify_all()

    async def send(self, message: dict) -> None:
        await self.ws.send_str(orjson.dumps(message).decode())

    async def wait_for(self, predicate: Callable[[dict], bool], *, after: int = 0, timeout: float = 10) -> dict:
        """The first message from index ``after`` on that ``predicate`` accepts."""
        def found() -> dict | None:
            return next((m for m in self.received[after:] if predicate(m)), None)

        async with self._changed:
            async with asyncio.timeout(timeout):
                await self._changed.wait_for(lambda: found() is not None or self.ws.closed)
        if (message := found()) is None:
            raise ConnectionError(f"/logs closed ({self.close_code}) before the answer")
        return message

    async def place(self, to: str, *, timeout: float = 15) -> tuple[dict, float]:
        """One call.start; its answer (queued with a token, an error, rate_limit_exceeded) and
        how long it took."""
        mark, began = len(self.received), now()
        await self.send({"type": "call.start", "phoneNumber": to, "scenarioId": "job-interview",
                         "config": {"jobTitle": "Engineer", "company": "Acme"}})
        reply = await self.wait_for(lambda m: "token" in m or m["type"] in ("error", "rate_limit_exceeded"),
                                    after=mark, timeout=timeout)
        return reply, now() - began

    async def follow_all(self) -> None:
        mark = len(self.received)
        await self.send({"type": "call.subscribe", "all": True, "adminToken": ADMIN_TOKEN})
        with contextlib.suppress(TimeoutError):  # no answer is the success; an error comes at once
            reply = await self.wait_for(lambda m: m["type"] == "error", after=mark, timeout=0.5)
            raise RuntimeError(f"could not follow every call: {reply}")

    def ended(self) -> dict[str, list[dict]]:
        """callSid → the ``ended`` events this client was sent for it."""
        ends: dict[str, list[dict]] = {}
        for m in self.received:
            if m.get("type") == "call.status_changed" and m.get("status") == "ended":
                ends.setdefault(m["callSid"], []).append(m)
        return ends

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._session.close()


# --- the stage --------------------------------------------------------------------------------


class Stage:
    """PostgreSQL behind a proxy, the peers, and the Callgate processes of one scenario."""

    def __init__(self, folder: Path, postgres: Postgres, proxy: TcpProxy, twilio_api: FakeTwilioApi,
                 model: FakeRealtime | None) -> None:
        self.folder, self.postgres, self.proxy = folder, postgres, proxy
        self.twilio_api, self.model = twilio_api, model
        self.servers: list[Server] = []
        self.calls: list[SimulatedCall] = []
        self.frontends: list[Frontend] = []

    def env(self, **changes: str) -> dict[str, str]:
        """The environment of a Callgate process: the machine's, without any Callgate setting,
        plus the stage's, plus ``changes``."""
        names = {v.name for v in VARIABLES}
        env = {k: v for k, v in os.environ.items() if k not in names}
        env |= {
            "PUBLIC_URL": PUBLIC_URL, "DATABASE_URL": self.proxy.dsn, "PHONE_ENCRYPTION_KEY": PHONE_KEY,
            "TWILIO_ACCOUNT_SID": self.twilio_api.account_sid, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_API_BASE_URL": self.twilio_api.base_url, "TWILIO_PHONE_NUMBER_US": CALLER_ID,
            "ADMIN_TOKEN": ADMIN_TOKEN, "LOG_FORMAT": "json", "TRUST_FLY_CLIENT_IP": "yes",
            "RATE_LIMIT_PHONE_MAX_CALLS": "1000", "RATE_LIMIT_MAX_CONCURRENT_CALLS": "100000",
            "SHUTDOWN_DRAIN_MS": "10000", "PYTHONUNBUFFERED": "1",
        }
        if self.model is not None:
            env |= {"OPENAI_API_KEY": MODEL_KEY, "OPENAI_REALTIME_URL": self.model.url}
        return env | changes

    async def server(self, *, until: str = "ok", **env: str) -> Server:
        """A new Callgate process, started."""
        name = f"callgate-{len(self.servers) + 1}"
        server = Server(name, self.env(**env), self.folder / f"{name}.log")
        self.servers.append(server)
        await server.start(until=until)
        return server

    def call(self, server: Server, from_: str, **kwargs: Any) -> SimulatedCall:
        """A caller dialling in through ``server`` (silent unless ``audio`` is given)."""
        kwargs.setdefault("audio", b"")
        kwargs.setdefault("tail_silence_ms", 0)
        call = SimulatedCall(server.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                             account_sid=self.twilio_api.account_sid, from_=from_, to=CALLER_ID, **kwargs)
        self.calls.append(call)
        return call

    def sign(self, path: str, form: dict[str, str]) -> str:
        """X-Twilio-Signature of a request to ``path`` with ``form``, as Twilio signs it."""
        return RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, form)

    async def frontend(self, server: Server, address: str | None = None) -> Frontend:
        client = await Frontend.open(server, address)
        self.frontends.append(client)
        return client

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Ask PostgreSQL directly (not through the proxy): what is really recorded."""
        conn = await asyncpg.connect(self.postgres.dsn, timeout=10)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def value(self, sql: str, *args: Any) -> Any:
        return (await self.query(sql, *args))[0][0]

    async def until(self, predicate: Callable[[], Any], timeout: float) -> bool:
        """Whether ``predicate()`` (awaited) became true within ``timeout`` s (polled every 0.1 s)."""
        deadline = now() + timeout
        while now() < deadline:
            if await predicate():
                return True
            await asyncio.sleep(0.1)
        return False

    def placed(self) -> list[str]:
        """CallSids Twilio's REST API placed."""
        return list(self.twilio_api.calls)

    def log_errors(self) -> list[str]:
        return [f"{s.name}: {line}" for s in self.servers for line in s.errors()]

    def numbers_in_logs(self, numbers: list[str]) -> list[str]:
        """Numbers of the scenario that a log line shows, in any usual format (+14155550123,
        4155550123, 415-555-0123, 555 0123, ...)."""
        text = "".join(s.log_path.read_text(errors="replace") for s in self.servers if s.log_path.exists())
        # Runs of digits with the separators people write between them, standing alone.
        runs = {re.sub(r"\D", "", m) for m in re.findall(r"(?<![\w.])\+?[\d][\d ().-]{5,}\d(?![\w])", text)}
        return [n for n in numbers if any(len(r) >= 7 and r in n.lstrip("+") for r in runs)]


@contextlib.asynccontextmanager
async def stage(*, model: FakeRealtime | None = None) -> AsyncIterator[Stage]:
    with tempfile.TemporaryDirectory(prefix="callgate-soak-") as folder:
        postgres = Postgres(Path(folder))
        await postgres.start()
        try:
            async with proxied(postgres.dsn) as proxy, FakeTwilioApi(auth_token=AUTH_TOKEN) as api:
                if model is not None:
                    model.api_key = MODEL_KEY  # what the servers are given
                    await model.start()
                s = Stage(Path(folder), postgres, proxy, api, model)
                try:
                    yield s
                finally:
                    for call in s.calls:
                        await call.close()
                    for client in s.frontends:
                        await client.close()
                    for server in s.servers:
                        await server.stop()
                    if model is not None:
                        await model.close()
                    keep = os.environ.get("SOAK_KEEP_LOGS")
                    if keep:
                        for server in s.servers:
                            if server.log_path.exists():
                                Path(keep).mkdir(parents=True, exist_ok=True)
                                (Path(keep) / server.log_path.name).write_bytes(server.log_path.read_bytes())
        finally:
            await postgres.stop()


class HealthWatch:
    """Asks /healthz every 0.2 s while it runs: how long each answer took, and what it said."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[tuple[float, int, str, float]] = []  # (when, HTTP status, status, seconds)
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            status, body, took = await self.server.healthz()
            self.samples.append((now(), status, body.get("status", ""), took))
            await asyncio.sleep(0.2)

    @property
    def slowest(self) -> float:
        return max((s[3] for s in self.samples), default=float("nan"))

    @property
    def unanswered(self) -> int:
        return sum(1 for s in self.samples if s[1] == 0)

    def statuses(self) -> list[str]:
        """The statuses seen, in order, repeats folded: ["ok", "degraded", "ok"]."""
        seen: list[str] = []
        for _, _, status, _ in self.samples:
            if status and (not seen or seen[-1] != status):
                seen.append(status)
        return seen

    def first(self, status: str, after: float) -> float | None:
        return next((t for t, _, s, _ in self.samples if t >= after and s == status), None)

"""WEB_CONCURRENCY / --workers: several server processes on one port, one embedded PostgreSQL.

A real supervisor (``python server.py --workers 2``) with its real workers: a call whose
webhook one worker answers and whose Media Stream the other takes works end to end, the
embedded database runs once, and SIGTERM stops everything.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, wait_until
from tools.simulate_call import SimulatedCall

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_URL = "https://callgate.test"
AUTH_TOKEN = "workers-test-token"



def postmasters(data_dir: Path) -> list[int]:
    """PostgreSQL servers running on ``data_dir``: processes whose command line names it and
    whose parent is not one of them (a backend just forked shows its parent's command line
    until it renames itself)."""
    found: dict[int, int] = {}  # pid → parent pid
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"postgres") and str(data_dir).encode() in b" ".join(argv):
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                found[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return [pid for pid, parent in found.items() if parent not in found]


class Supervisor:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.data_dir = tmp / "data"
        names = ("DATABASE_URL", "FLY_DATABASE_URL", "OPENAI_API_KEY", "WEB_CONCURRENCY")
        self.env = {k: v for k, v in os.environ.items() if k not in names} | {
            "CALLGATE_DATA_DIR": str(self.data_dir), "PUBLIC_URL": PUBLIC_URL,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "LOG_FORMAT": "json", "RATE_LIMIT_PHONE_MAX_CALLS": "100",
            "SHUTDOWN_DRAIN_MS": "2000",
        }
        self.lines: list[dict] = []
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "2", env=self.env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())
        await wait_until(lambda: sum("listening on" in line["msg"] for line in self.lines) == 2, timeout=60,
                         what="both workers listening")

    async def _read(self) -> None:
        async for raw in self.process.stderr:
            try:
                self.lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                self.lines.append({"msg": raw.decode(errors="replace"), "worker": None})

    def worker_of(self, needle: str) -> int | None:
        return next((line.get("worker") for line in self.lines if needle in line["msg"]), None)

    async def place_call(self, number: str) -> str:
        """A call from ``number``: webhook, stream, the caller hangs up once it streams; its
        CallSid once its end is logged."""
        call = SimulatedCall(f"http://127.0.0.1:{self.port}", public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                             audio=b"", from_=number)
        async with call:
            twiml = await call.webhook()
            assert twiml.stream_url, twiml.body
            await call.connect()
            sid = call.call_sid
            await wait_until(lambda: self.worker_of(f"call {sid}: stream") is not None, timeout=30,
                             what="the stream's start logged")
            await call.stop()
            await wait_until(lambda: self.worker_of(f"call {sid} ended") is not None, timeout=30,
                             what="the call's end logged")
        return sid

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await self._reader
        return code


@pytest.fixture
async def supervisor(tmp_path):
    sup = Supervisor(tmp_path)
    try:
        await sup.start()
        yield sup
    finally:
        if sup.process is not None and sup.process.returncode is None:
            sup.process.kill()
            await sup.process.wait()


async def test_a_call_crosses_workers_and_the_database_runs_once(supervisor):
    sup = supervisor
    assert {line.get("worker") for line in sup.lines if "listening on" in line["msg"]} == {1, 2}
    assert len(postmasters(sup.data_dir)) == 1  # started by the supervisor, not per worker
    assert sum("starting the embedded PostgreSQL" in line["msg"] for line in sup.lines) == 1

    # The kernel spreads connections over the workers: place calls until one's webhook and
    # its stream landed on different workers (each try is an even chance).
    crossed = None
    for attempt in range(40):
        sid = await sup.place_call(f"+1415555{attempt:04d}")
        webhook_worker, stream_worker = sup.worker_of(f"webhook {sid}"), sup.worker_of(f"call {sid}: stream")
        ended = next(line["msg"] for line in sup.lines if f"call {sid} ended" in line["msg"])
        assert "caller_hangup" in ended, ended
        if webhook_worker != stream_worker:
            crossed = (webhook_worker, stream_worker)
            break
    assert crossed is not None and set(crossed) == {1, 2}, "no call's webhook and stream were on different workers"

    assert await sup.stop() == 0
    assert postmasters(sup.data_dir) == []
    assert not [line for line in sup.lines if line.get("level") == "error"]


async def test_a_scrape_reaching_any_worker_answers_for_every_worker(supervisor):
    """/metrics on the shared port answers for both workers, each series labelled with its
    worker, whichever worker the kernel hands the scrape: the calls' totals are the same in
    every scrape (a worker answering for itself alone would show its own share)."""
    sup = supervisor
    for n in range(2):
        await sup.place_call(f"+1415556{n:04d}")
    for _ in range(12):
        async with aiohttp.ClientSession() as session:  # a new connection each time: any worker
            async with session.get(f"http://127.0.0.1:{sup.port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        cpu = {s.labels["worker"] for s in samples if s.name == "process_cpu_seconds_total"}
        calls = sum(s.value for s in samples if s.name == "callgate_calls_total")
        hits = sum(s.value for s in samples if s.name == "callgate_limiter_decisions_total" and s.labels["op"] == "hit")
        missing = next(s.value for s in samples if s.name == "callgate_metrics_workers_missing")
        assert (cpu, calls, hits, missing) == ({"1", "2"}, 2, 2, 0)
    assert await sup.stop() == 0

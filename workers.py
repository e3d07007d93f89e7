"""Several server processes on one port (WEB_CONCURRENCY or --workers N), so a machine with N
cores carries N times the calls: one Python process relays on one core at most.

The supervisor (this module, in the process the operator started) starts the embedded
PostgreSQL once when there is no DATABASE_URL, then N workers: ``python server.py`` again,
each binding the same address with SO_REUSEPORT (the kernel spreads new connections over
them) and given the database's DSN. Each worker is a Callgate instance like another machine
would be — its own id, heartbeat and share of the cap — so a webhook answered by one and the
media stream that follows on another work as they do across machines: the state is in
PostgreSQL. A scrape of ``/metrics`` on any of them answers for all (``worker_metrics.py``).
SIGTERM or SIGINT is passed on to every worker, which drains its calls; a worker
that dies otherwise is started again (after a pause, so a crash loop cannot spin).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from config import Settings
from db.embedded import EmbeddedPostgres
from worker_metrics import FOLDER_ENV

log = logging.getLogger("callgate.workers")

SERVER = Path(__file__).resolve().parent / "server.py"
RESTART_PAUSE_S = 1.0
WORKER_ENV = "CALLGATE_WORKER"  # set in a worker's environment: its number, from 1


async def supervise(settings: Settings, host: str, workers: int) -> int:
    env = dict(os.environ)
    env["WEB_CONCURRENCY"] = "1"  # a worker is one process
    env["PORT"] = str(settings.port)
    # Where each worker says on which loopback port its own metrics are (worker_metrics.py).
    folder = Path(tempfile.mkdtemp(prefix="callgate-workers-"))
    env[FOLDER_ENV] = str(folder)
    embedded = None
    if settings.dsn is None:
        embedded = EmbeddedPostgres(settings.data_dir.resolve() / "pg")
        log.info("no DATABASE_URL: starting the embedded PostgreSQL once for %d workers (data in %s)",
                 workers, embedded.data_dir)
        env["DATABASE_URL"] = await asyncio.to_thread(embedded.start)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("starting %d workers on %s:%d (SO_REUSEPORT)", workers, host, settings.port)
    try:
        results = await asyncio.gather(*(_worker(n, host, env, stopping) for n in range(1, workers + 1)))
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        shutil.rmtree(folder, ignore_errors=True)
    return max(results)


def _die_with_supervisor() -> None:
    """In the worker, before it runs: on Linux, SIGTERM (a drain) when the supervisor dies by
    SIGKILL or a crash, so no worker is left holding the port without anyone to stop it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


async def _worker(number: int, host: str, env: dict[str, str], stopping: asyncio.Event) -> int:
    """Run worker ``number`` until the supervisor stops; returns its last exit status."""
    while True:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(SERVER), "--host", host, "--reuse-port",
            env={**env, WORKER_ENV: str(number)}, stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_supervisor)
        began = time.monotonic()
        stop = asyncio.create_task(stopping.wait())
        exited = asyncio.create_task(process.wait())
        await asyncio.wait({stop, exited}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.is_set():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)  # it drains its calls, then exits
            code = await exited
            stop.cancel()
            return code
        stop.cancel()
        log.warning("worker %d exited with %s after %.0f s: starting it again", number, process.returncode,
                    time.monotonic() - began)
        try:
            await asyncio.wait_for(stopping.wait(), RESTART_PAUSE_S)
            return process.returncode or 0
        except TimeoutError:
            continue

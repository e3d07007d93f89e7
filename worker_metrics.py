"""``/metrics`` when several workers share the port (WEB_CONCURRENCY > 1, ``workers.py``).

A scrape reaches whichever worker the kernel picks, and each worker keeps its own registry:
answered alone, gauges would jump between workers' values and counters would seem to reset at
every other scrape, which makes ``rate()`` wrong. So each worker also serves its own metrics
on a private loopback port, and says which in the supervisor's folder (``<number>.port``); the
worker a scrape reaches asks the others and answers for all of them, each series with a
``worker`` label (``"1"``, ``"2"``, …). A worker that does not answer within PEER_TIMEOUT_S
(starting again after a crash, say) is left out of that scrape, and counted in
``callgate_metrics_workers_missing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

FOLDER_ENV = "CALLGATE_WORKERS_DIR"  # set by the supervisor for its workers
PEER_TIMEOUT_S = 1.0
OWN_PATH = "/metrics/worker"
MISSING = "callgate_metrics_workers_missing"


def parse(text: str) -> list[Metric] | None:
    """A worker's exposition, or None if it is not one (a port reused by something else)."""
    try:
        return list(text_string_to_metric_families(text))
    except Exception:  # noqa: BLE001 - whatever answered there, it is not a worker's metrics
        return None


def merge(workers: dict[str, list[Metric]], missing: int = 0) -> bytes:
    """One exposition of every worker's families, each sample labelled with its worker; a
    family keeps its help and type once."""
    families: dict[str, Metric] = {}
    for worker, parsed in workers.items():
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, "worker": worker}) for s in family.samples)
    gap = Metric(MISSING, "Workers that did not answer this scrape (their series are left out)", "gauge")
    gap.add_sample(MISSING, {}, missing)
    families[MISSING] = gap
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families.values()))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


class WorkerMetrics:
    """In worker ``number``: its own metrics on a private loopback port, published in
    ``folder``, and a scrape's answer for every worker."""

    def __init__(self, number: int, folder: Path, render_own: Callable[[], bytes]) -> None:
        self.number = number
        self._folder = folder
        self._render_own = render_own
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(OWN_PATH, self._own)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        # Written whole, then renamed: a peer never reads half a port number.
        draft = self._folder / f".{self.number}.port"
        draft.write_text(str(port))
        os.replace(draft, self._folder / f"{self.number}.port")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S))

    async def stop(self) -> None:
        with contextlib.suppress(OSError):
            (self._folder / f"{self.number}.port").unlink()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _own(self, request: web.Request) -> web.Response:
        return web.Response(body=self._render_own(), content_type="text/plain")

    async def render(self, own: bytes) -> bytes:
        """Every worker's metrics, this one's (``own``) among them."""
        peers = {}
        for path in self._folder.glob("*.port"):
            if path.stem.isdigit() and int(path.stem) != self.number:
                with contextlib.suppress(OSError, ValueError):
                    peers[path.stem] = int(path.read_text())
        answers = await asyncio.gather(*(self._fetch(port) for port in peers.values()))
        workers = {str(self.number): parse(own.decode()) or []}
        for worker, text in zip(peers, answers):
            parsed = parse(text) if text is not None else None
            if parsed is not None:
                workers[worker] = parsed
        return merge(dict(sorted(workers.items(), key=lambda item: int(item[0]))),
                     missing=len(peers) + 1 - len(workers))

    async def _fetch(self, port: int) -> str | None:
        try:
            async with self._session.get(f"http://127.0.0.1:{port}{OWN_PATH}") as resp:
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

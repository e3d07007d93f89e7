"""``/healthz`` (ours), ``/health`` (phone-screen's shape) and ``/metrics``.

They never touch Twilio or OpenAI, and never wait for PostgreSQL: whether it answers is what
the database gate last saw (a call, or its probe every 2 s; db/bounded.py), so they answer
in milliseconds during an outage too.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aiohttp import web

from appkeys import CALL_STORE, DATABASE, FRONTEND, LIFECYCLE, LIMITER, METRICS, SETTINGS, WORKER_METRICS
from config import VERSION
from metrics import CONTENT_TYPE_LATEST


async def _facts(request: web.Request) -> dict:
    # From the database gate: the last call or probe (every 2 s) said so. A health check never
    # waits for PostgreSQL, so an outage cannot make it time out.
    database_ok = request.app[DATABASE].gate.up
    return {
        "status": "ok" if database_ok else "degraded",
        "database": "ok" if database_ok else "unavailable",
        "activeCalls": request.app[LIFECYCLE].active_calls,
        "version": VERSION,
    }


async def healthz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response(await _facts(request))


async def health(request: web.Request) -> web.Response:
    """The same facts in the shape phone-screen's monitors read."""
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.draining:
        return web.json_response({"status": "draining"}, status=503)
    facts = await _facts(request)
    frontend = request.app[FRONTEND]
    cap = request.app[SETTINGS].max_connections_per_ip
    return web.json_response({
        "status": "healthy" if facts["status"] == "ok" else "degraded",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "uptime": round(time.time() - lifecycle.started_at, 1),
        "activeSessions": facts["activeCalls"],
        "database": facts["database"],
        "version": VERSION,
        # phone-screen's block. Callgate suspends no address: it refuses sockets past the
        # per-address cap, so "suspendedIPs" counts the addresses at their cap right now.
        "rateLimiting": {
            "activeConnections": len(frontend.sockets) + facts["activeCalls"],
            "activeCalls": facts["activeCalls"],
            "suspendedIPs": sum(1 for n in frontend.per_ip.values() if n >= cap),
        },
    })


def own_metrics(app: web.Application) -> bytes:
    """This process's metrics, its gauges read now."""
    m = app[METRICS]
    pool = app[DATABASE].pool
    m.pool_size.set(pool.get_size())
    m.pool_in_use.set(pool.get_size() - pool.get_idle_size())
    m.limiter_pending.set(app[LIMITER].pending)
    m.calls_owed.set(app[CALL_STORE].owed)
    m.instances_alive.set(app[CALL_STORE].instances_alive)
    m.database_up.set(1 if app[DATABASE].gate.up else 0)
    return m.render()


async def metrics(request: web.Request) -> web.Response:
    body = own_metrics(request.app)
    if WORKER_METRICS in request.app:  # one worker of several: the answer is for all of them
        body = await request.app[WORKER_METRICS].render(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

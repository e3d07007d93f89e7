"""Admin routes: bearer ``ADMIN_TOKEN``; disabled (403) while it is unset. Wrong tokens are
throttled per client address (a few a minute), here and for /logs' all-calls monitor."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from appkeys import CALL_STORE, FRONTEND, LIMITER, METRICS, SETTINGS
from handlers.clients import client_ip
from limiter.errors import LimiterUnavailable


def check_admin_token(app: web.Application, address: str, given: object) -> str | None:
    """None when ``given`` is ADMIN_TOKEN; else why not: ``disabled`` (no ADMIN_TOKEN),
    ``slow_down`` (too many wrong ones from this address lately: not even compared), ``wrong``."""
    token = app[SETTINGS].admin_token
    if not token:
        return "disabled"
    guesses = app[FRONTEND].admin_failures
    if not guesses.allows(address):
        return "slow_down"
    if isinstance(given, str) and secrets.compare_digest(given.encode(), token.value.encode()):
        return None
    guesses.take(address)
    return "wrong"


def _authorised(request: web.Request) -> None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    problem = check_admin_token(request.app, client_ip(request), value.strip() if scheme.lower() == "bearer" else None)
    if problem == "disabled":
        raise web.HTTPForbidden(text="admin routes are disabled: set ADMIN_TOKEN to enable them")
    if problem == "slow_down":
        raise web.HTTPTooManyRequests(text="too many wrong admin tokens from this address; wait a minute")
    if problem == "wrong":
        raise web.HTTPUnauthorized(text="send Authorization: Bearer <ADMIN_TOKEN>", headers={"WWW-Authenticate": "Bearer"})


def _decisions(app: web.Application) -> list[dict[str, Any]]:
    """This instance's limiter answers since it started (callgate_limiter_decisions_total)."""
    return [{**sample.labels, "count": int(sample.value)}
            for metric in app[METRICS].limiter_decisions.collect() for sample in metric.samples
            if sample.name.endswith("_total")]


def _this_instance(app: web.Application) -> dict[str, Any]:
    """What this instance knows without PostgreSQL: the operator needs it most during an outage."""
    limiter = app[LIMITER]
    return {
        "failMode": limiter.fail_mode,
        "pending": limiter.pending,
        "decisions": _decisions(app),
        "instancesAlive": app[CALL_STORE].instances_alive,
    }


async def stats(request: web.Request) -> web.Response:
    _authorised(request)
    local = _this_instance(request.app)
    try:
        return web.json_response({**await request.app[LIMITER].stats(), **local})
    except LimiterUnavailable:
        return web.json_response({"error": "database unavailable", "database": "unavailable", **local}, status=503)

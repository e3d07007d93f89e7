"""Admin routes: bearer ``ADMIN_TOKEN``; disabled (403) while it is unset."""

from __future__ import annotations

import secrets

from aiohttp import web

from appkeys import LIMITER, SETTINGS
from limiter.errors import LimiterUnavailable


def _authorised(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token
    if not token:
        raise web.HTTPForbidden(text="admin routes are disabled: set ADMIN_TOKEN to enable them")
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.value.encode()):
        raise web.HTTPUnauthorized(
            text="send Authorization: Bearer <ADMIN_TOKEN>", headers={"WWW-Authenticate": "Bearer"}
        )


async def stats(request: web.Request) -> web.Response:
    _authorised(request)
    try:
        return web.json_response(await request.app[LIMITER].stats())
    except LimiterUnavailable:
        return web.json_response({"error": "database unavailable"}, status=503)

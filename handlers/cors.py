"""CORS for the public read-only routes, so a frontend on another origin (phone-screen's webapp)
can read the scenarios, tools and health.

Only the origins in ALLOWED_ORIGINS get ``Access-Control-Allow-Origin`` (their own origin back,
never ``*``), and only on ``PUBLIC_READ_ROUTES``: everything else (webhooks, admin, the page)
stays same-origin. A preflight (``OPTIONS``) for a GET is answered here, before the route.
"""

from __future__ import annotations

from aiohttp import web

from appkeys import SETTINGS
from config import origin_in

PUBLIC_READ_ROUTES = frozenset({"/scenarios", "/tools", "/public-url", "/health", "/healthz"})
PREFLIGHT_MAX_AGE_S = 600


def _allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None or not origin_in(origin, request.app[SETTINGS].allowed_origins):
        return None
    return origin


@web.middleware
async def cors(request: web.Request, handler) -> web.StreamResponse:
    if request.path not in PUBLIC_READ_ROUTES:
        return await handler(request)
    origin = _allowed_origin(request)
    if request.method == "OPTIONS":
        if origin is None:
            return web.Response(status=403, text="origin not allowed: add it to ALLOWED_ORIGINS")
        if request.headers.get("Access-Control-Request-Method", "GET") not in ("GET", "HEAD"):
            return web.Response(status=405, text="these routes are read-only: GET only")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type, Accept",
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            "Vary": "Origin",
        })
    response = await handler(request)
    # The same URL answers differently per origin: caches must know.
    vary = response.headers.get("Vary")
    if not vary:
        response.headers["Vary"] = "Origin"
    elif "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin"
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
    return response

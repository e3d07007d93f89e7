"""The web page (``GET /``) and the public catalogue: ``/scenarios``, ``/tools``, ``/public-url``
(phone-screen's shapes: bare arrays, and ``{"publicUrl": ...}``)."""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

import scenarios
from appkeys import SETTINGS
from bridge import functions
from config import Settings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
INDEX_HTML = web.AppKey("index_html", str)

# The page loads only its own files (and Turnstile's, when configured) and is never framed.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' https://challenges.cloudflare.com; "
        "frame-src https://challenges.cloudflare.com; connect-src 'self'; img-src 'self' data:; "
        "style-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def render_index(settings: Settings) -> str:
    """The page, with the Turnstile site key on <body> when one is configured."""
    page = (STATIC_DIR / "index.html").read_text()
    if settings.turnstile_site_key:
        page = page.replace("\n<body>\n", f'\n<body data-turnstile-sitekey="{html.escape(settings.turnstile_site_key)}">\n', 1)
    return page


async def index(request: web.Request) -> web.Response:
    return web.Response(text=request.app[INDEX_HTML], content_type="text/html", headers=PAGE_HEADERS)


async def admin(request: web.Request) -> web.Response:
    """The operator's page: static; it asks for ADMIN_TOKEN itself and keeps it in the tab."""
    return web.Response(text=(STATIC_DIR / "admin.html").read_text(), content_type="text/html", headers=PAGE_HEADERS)


async def list_scenarios(request: web.Request) -> web.Response:
    """phone-screen's shape: a bare array, the default scenario first."""
    ordered = sorted(scenarios.SCENARIOS.values(), key=lambda s: s.id != scenarios.DEFAULT_SCENARIO)
    return web.json_response([s.schema() for s in ordered])


async def list_tools(request: web.Request) -> web.Response:
    """phone-screen's shape: a bare array of function schemas."""
    return web.json_response(functions.schemas())


async def public_url(request: web.Request) -> web.Response:
    return web.json_response({"publicUrl": request.app[SETTINGS].public_url})

"""Callgate: an AI voice agent on the phone.

``create_app(settings)`` builds the application for ``main()`` and for the tests alike: the
routes on one screen, and every resource with a start and an end in one cleanup context.

    python server.py                      # serve on 0.0.0.0:$PORT
    python server.py admin stats|reset NUMBER|cleanup|migrate
"""

from __future__ import annotations

import argparse
import asyncio
import html
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
from aiohttp import WSCloseCode, web

import logsetup
import scenarios
from appkeys import (
    BUS,
    CALL_SERVICES,
    CALL_STORE,
    CALLS,
    DATABASE,
    FANOUT,
    FRONTEND,
    HTTP,
    LIFECYCLE,
    LIMITER,
    METRICS,
    REFUSALS,
    SETTINGS,
    TOKEN_SECRET,
    TWILIO_REST,
    FrontendState,
    Lifecycle,
)
from bridge import functions, tokens
from bridge.call import CallServices
from bridge.events import STATUS_RANK, EventBus
from bridge.fanout import PgFanout
from bridge.model import ModelConnector, RealtimeConnector
from bridge.offline import OfflineConnector
from config import VERSION, ConfigError, Settings, help_text
from db.calls import CallStore, CallStoreUnavailable
from db.database import open_database
from db.migrate import migrate
from db.sql import Queries
from handlers import admin, cors, frontend, health
from handlers import twilio as twilio_handlers
from limiter.limiter import Limiter, Regions
from limiter.phone import PhoneKeyer
from limiter.rules import Rules
from logsetup import Throttled
from metrics import Metrics
from twilio_rest import TwilioRest

log = logging.getLogger("callgate")

WRAP_UP_S = 20.0  # the agent is asked to wrap up this long before the session limit
STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_HTML = web.AppKey("index_html", str)


def build_limiter(settings: Settings, db_pool, queries: Queries, metrics: Metrics | None = None) -> Limiter:
    return Limiter(
        db_pool,
        queries,
        PhoneKeyer(settings.phone_key.value, [k.value for k in settings.phone_previous_keys]),
        Rules(settings.phone_max_calls, settings.phone_window_ms, settings.phone_cooldown_ms),
        Regions(settings.default_region, settings.allowed_regions),
        fail_mode=settings.limiter_fail_mode,
        timeout=settings.limiter_timeout_ms / 1000,
        observe=metrics.observe_limiter if metrics else None,
    )


def model_connector(settings: Settings) -> ModelConnector:
    if settings.openai_api_key:
        return RealtimeConnector(settings.openai_realtime_url, settings.openai_realtime_model,
                                 settings.openai_api_key.value, settings.model_ready_timeout_ms / 1000)
    return OfflineConnector()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=64 * 1024, middlewares=[cors.cors])
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    app[BUS] = EventBus()
    app[CALLS] = {}
    app[FRONTEND] = FrontendState()
    app[REFUSALS] = Throttled(logging.getLogger("callgate.refused"))
    app[INDEX_HTML] = render_index(settings)
    app[TOKEN_SECRET] = tokens.derive_secret(settings.phone_key.value)
    connector = model_connector(settings)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        rest = app[TWILIO_REST] = TwilioRest(settings.twilio_account_sid,
                                             settings.twilio_auth_token.value if settings.twilio_auth_token else None,
                                             settings.twilio_api_base_url, settings.twilio_rest_timeout_ms / 1000)
        app[HTTP] = http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with open_database(settings) as db:
                app[DATABASE] = db
                queries = Queries.load()  # every sql/*.sql, read once and checked
                app[LIMITER] = limiter = build_limiter(settings, db.pool, queries, app[METRICS])
                app[CALL_STORE] = store = CallStore(db.pool, queries, settings.limiter_timeout_ms / 1000)
                app[CALL_SERVICES] = call_services(settings, app, connector, rest, store)
                app[FANOUT] = fanout = PgFanout(db.dsn, db.pool, queries, app[BUS])
                app[BUS].forward = fanout.offer
                duties = [asyncio.create_task(limiter.maintain(), name="limiter-maintenance"),
                          asyncio.create_task(tidy_calls(store), name="calls-maintenance"),
                          asyncio.create_task(fanout.run(), name="event-fanout")]
                try:
                    yield
                finally:
                    app[BUS].forward = None
                    for duty in duties:
                        duty.cancel()
                    await asyncio.gather(*duties, return_exceptions=True)
        finally:
            await rest.close()
            await http.close()

    async def last_calls(app: web.Application) -> None:
        # Runs when aiohttp shuts down, after it stopped reading from every connection: any
        # call still live (serve() drains them first) can only be ended now.
        await drain(app, timeout=0)

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(last_calls)

    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_route("*", "/twiml", twilio_handlers.twiml)
    app.router.add_post("/twilio/status", twilio_handlers.status_callback)
    app.router.add_get("/call", twilio_handlers.media_stream)
    app.router.add_get("/logs", frontend.logs)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/scenarios", list_scenarios)
    app.router.add_get("/tools", list_tools)
    app.router.add_get("/public-url", public_url)
    app.router.add_get("/admin/stats", admin.stats)
    return app


async def tidy_calls(store: CallStore, every: float = 300.0) -> None:
    """Background duty until cancelled: forget spent tokens, stale call requests, old calls."""
    while True:
        await asyncio.sleep(every)
        try:
            if deleted := await store.cleanup():
                log.info("calls cleanup deleted %d row(s)", deleted)
        except CallStoreUnavailable:
            continue


async def drain(app: web.Application, timeout: float) -> None:
    """Shutdown, first step, with the listener still open: /healthz answers 503 and new calls
    are refused with TwiML, while live calls keep relaying until they end or ``timeout``
    passes; then those left are ended (and hung up over REST) and awaited."""
    lifecycle, calls = app[LIFECYCLE], app[CALLS]
    lifecycle.draining = True
    # Browsers reconnect elsewhere at once on GOING_AWAY (1001); left open, they would hold
    # shutdown until its timeout and then see 1006.
    for ws in list(app[FRONTEND].sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
    loop = asyncio.get_running_loop()
    if calls:
        log.info("draining: %d live call(s), up to %.0f s", len(calls), timeout)
    deadline = loop.time() + timeout
    while calls and loop.time() < deadline:
        await asyncio.sleep(0.1)
    for call in list(calls.values()):
        call.request_end("shutdown")
    ending = loop.time() + 10  # finalising a call is bounded (model close, REST, database)
    while calls and loop.time() < ending:
        await asyncio.sleep(0.05)
    # Calls being placed or hung up for browsers: each is bounded by the REST timeout.
    background = list(app[FRONTEND].background)
    if background:
        await asyncio.wait(background, timeout=max(ending - loop.time(), 1))


async def serve(settings: Settings, host: str) -> None:
    """Run until SIGTERM or SIGINT, then drain (listener open), then shut down."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, settings.port).start()
    log.info("listening on %s:%d", host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: draining live calls for up to %.0f s", settings.shutdown_drain_ms / 1000)
        await drain(app, settings.shutdown_drain_ms / 1000)
    finally:
        await runner.cleanup()
    log.info("stopped")


def call_services(settings: Settings, app: web.Application, connector: ModelConnector, rest: TwilioRest,
                  store: CallStore) -> CallServices:
    async def record_status(call_sid: str, status: str, reason: str | None) -> bool:
        try:
            moved = await store.set_status(call_sid, status, STATUS_RANK[status], reason)
            if reason and not moved:
                # Twilio's "completed" came first: say why, once.
                return await store.set_end_reason(call_sid, reason)
            return moved
        except CallStoreUnavailable:
            log.warning("call %s: status %s not recorded (database unavailable)", call_sid, status)
            return True

    duration = settings.session_duration_ms / 1000
    return CallServices(
        connector=connector,
        bus=app[BUS],
        hangup=rest.hangup,
        record_status=record_status,
        transcription_model=settings.openai_transcription_model,
        session_duration_s=duration,
        wrap_up_s=min(WRAP_UP_S, duration / 4),
        ready_timeout_s=settings.model_ready_timeout_ms / 1000,
        observe_frame=app[METRICS].frame_observer(),
        count_response_failure=app[METRICS].count_response_failure,
    )


def render_index(settings: Settings) -> str:
    """The page, with the Turnstile site key on <body> when one is configured."""
    page = (STATIC_DIR / "index.html").read_text()
    if settings.turnstile_site_key:
        page = page.replace("\n<body>\n", f'\n<body data-turnstile-sitekey="{html.escape(settings.turnstile_site_key)}">\n', 1)
    return page


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


async def index(request: web.Request) -> web.Response:
    return web.Response(text=request.app[INDEX_HTML], content_type="text/html", headers=PAGE_HEADERS)


async def list_scenarios(request: web.Request) -> web.Response:
    """phone-screen's shape: a bare array, the default scenario first."""
    ordered = sorted(scenarios.SCENARIOS.values(), key=lambda s: s.id != scenarios.DEFAULT_SCENARIO)
    return web.json_response([s.schema() for s in ordered])


async def list_tools(request: web.Request) -> web.Response:
    """phone-screen's shape: a bare array of function schemas."""
    return web.json_response(functions.schemas())


async def public_url(request: web.Request) -> web.Response:
    return web.json_response({"publicUrl": request.app[SETTINGS].public_url})


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python server.py",
        description=f"Callgate {VERSION}: an AI voice agent on the phone (Twilio Media Streams + OpenAI Realtime).",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="listen port (overrides PORT)")
    sub = parser.add_subparsers(dest="command", metavar="admin")
    admin_parser = sub.add_parser("admin", help="operator commands: stats, reset NUMBER, cleanup, migrate")
    admin_sub = admin_parser.add_subparsers(dest="action", required=True)
    admin_sub.add_parser("stats", help="print limiter analytics as JSON")
    reset = admin_sub.add_parser("reset", help="forget one number's charges")
    reset.add_argument("number", help="the phone number (any common format)")
    admin_sub.add_parser("cleanup", help="delete limiter rows whose window has passed")
    admin_sub.add_parser("migrate", help="apply pending schema migrations and exit")
    return parser.parse_args(argv)


async def run_admin(settings: Settings, args: argparse.Namespace) -> int:
    async with open_database(settings, apply_migrations=args.action != "migrate") as db:
        if args.action == "migrate":
            async with db.pool.acquire() as conn:
                applied = await migrate(conn)
            print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
            return 0
        limiter = build_limiter(settings, db.pool, Queries.load())
        if args.action == "stats":
            print(orjson.dumps(await limiter.stats(), option=orjson.OPT_INDENT_2).decode())
        elif args.action == "cleanup":
            rows, charges = await limiter.cleanup()
            print(f"deleted {rows} expired row(s) and {charges} expired charge record(s)")
        elif args.action == "reset":
            phone = limiter.parse(args.number)
            rows = await limiter.reset(phone)
            print(f"reset {phone.masked}: {rows} row(s) deleted")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env(os.environ)
        if args.port is not None:
            settings = settings.replace(port=args.port).checked()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logsetup.configure(settings.log_format, settings.log_level)
    for warning in settings.warnings:
        log.warning("%s", warning)
    if args.command == "admin":
        try:
            return asyncio.run(run_admin(settings, args))
        except Exception as exc:  # an operator command: say what failed, no traceback
            print(f"admin {args.action} failed: {exc}", file=sys.stderr)
            return 1
    log.info("Callgate %s starting on %s:%d (public URL %s, %s)", VERSION, args.host, settings.port,
             settings.public_url, settings.env)
    if not settings.openai_api_key:
        log.warning("OPENAI_API_KEY is not set: calls are answered by the OFFLINE agent "
                    "(it plays the caller's words back). Set OPENAI_API_KEY for the real model.")
    if not settings.twilio_auth_token:
        log.warning("TWILIO_AUTH_TOKEN is not set: Twilio requests are NOT signature-checked "
                    "and calls are not hung up over REST. Never run like this in public.")
    asyncio.run(serve(settings, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())

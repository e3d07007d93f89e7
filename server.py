"""Callgate: an AI voice agent on the phone.

``create_app(settings)`` builds the application for ``main()`` and for the tests alike: the
shared state, one cleanup context per resource with a start and an end, and the routes on
one screen. ``serve`` is the lifecycle: listen → SIGTERM → drain (listener still open) →
cleanup. The rest is the command line.

    python server.py                      # serve on 0.0.0.0:$PORT
    python server.py admin stats|reset NUMBER|cleanup|migrate|doctor

Where to start reading: a call's flow is in ``calls/admission.py``'s docstring, a call.start's
in ``calls/outbound.py``'s, a limiter decision in ``limiter/limiter.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

import logsetup
from appkeys import (
    BUS,
    CALL_SERVICES,
    CALL_STORE,
    DATABASE,
    FANOUT,
    FRONTEND,
    HTTP,
    LIFECYCLE,
    LIMITER,
    METRICS,
    REFUSALS,
    SERVICES,
    SETTINGS,
    TOKEN_SECRET,
    TWILIO_REST,
    WORKER_METRICS,
)
from bridge import events, tokens
from bridge.call import CallServices
from bridge.events import EventBus
from bridge.fanout import CONTROL_END_CALL, CONTROL_INSTANCE_JOINED, PgFanout
from bridge.offline import OfflineConnector
from bridge.realtime_client import ModelConnector, RealtimeConnector
from calls import admission, status
from calls.services import Services
from config import MAX_MESSAGE_BYTES, VERSION, ConfigError, Settings, help_text
from db.bounded import DatabaseGate
from db.calls import CallStore
from db.database import open_database
from db.sql import Queries
from handlers import admin, cors, frontend, health, pages
from handlers import twilio as twilio_handlers
from lifecycle import FrontendState, Lifecycle
from limiter.limiter import Limiter, Regions
from limiter.phone import PhoneKeyer
from limiter.rules import Rules
from logsetup import Throttled
from metrics import Metrics
from twilio_rest import TwilioRest
from worker_metrics import FOLDER_ENV, WorkerMetrics
from workers import WORKER_ENV, supervise

log = logging.getLogger("callgate")

WRAP_UP_S = 20.0  # the agent is asked to wrap up this long before the session limit
FLUSH_S = 2.0     # at the end of a drain, the longest wait for a browser to be sent what it is owed


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_MESSAGE_BYTES, middlewares=[cors.cors])
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIFECYCLE] = lifecycle = Lifecycle()
    app[METRICS].active_calls.set_function(lambda: lifecycle.active_calls)
    app[BUS] = EventBus(status.rank)
    app[FRONTEND] = FrontendState()
    app[REFUSALS] = Throttled(logging.getLogger("callgate.refused"))
    app[TOKEN_SECRET] = tokens.derive_secret(settings.phone_key.value)
    app[pages.INDEX_HTML] = pages.render_index(settings)

    app.cleanup_ctx.extend([twilio_rest, http_client, database, limiter_duties, calls_duties, event_fanout])
    app.on_shutdown.append(last_calls)

    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_route("*", "/twiml", twilio_handlers.twiml)
    app.router.add_post("/twilio/status", twilio_handlers.status_callback)
    app.router.add_get("/call", twilio_handlers.media_stream)
    app.router.add_get("/logs", frontend.logs)
    app.router.add_get("/", pages.index)
    app.router.add_static("/static/", pages.STATIC_DIR)
    app.router.add_get("/scenarios", pages.list_scenarios)
    app.router.add_get("/tools", pages.list_tools)
    app.router.add_get("/public-url", pages.public_url)
    app.router.add_get("/admin", pages.admin)
    app.router.add_get("/admin/stats", admin.stats)
    return app


# --- resources: one cleanup context each, started in this order, ended in reverse -----------


async def twilio_rest(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    app[TWILIO_REST] = rest = TwilioRest(s.twilio_account_sid, s.twilio_auth_token.value if s.twilio_auth_token else None,
                                         s.twilio_api_base_url, s.twilio_rest_timeout_ms / 1000)
    yield
    await rest.close()


async def http_client(app: web.Application) -> AsyncIterator[None]:
    app[HTTP] = session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    yield
    await session.close()


async def database(app: web.Application) -> AsyncIterator[None]:
    """PostgreSQL (embedded or not, migrated), and what works through its pool."""
    settings = app[SETTINGS]
    async with open_database(settings) as db:
        app[DATABASE] = db
        queries = db.queries
        app[LIMITER] = limiter = build_limiter(settings, db.gate, queries, app[METRICS])
        lifecycle = app[LIFECYCLE]
        app[CALL_STORE] = store = CallStore(db.gate, queries, settings.database_timeout_ms / 1000,
                                            admission.cap_rule(settings), lifecycle.instance_id,
                                            live_here=lifecycle.calls.keys)
        app[FANOUT] = fanout = PgFanout(db.dsn, db.gate, queries, app[BUS], lifecycle.instance_id,
                                        count_drop=lambda reason: app[METRICS].fanout_dropped.labels(reason).inc())
        fanout.on_listening = lambda: status.catch_up(store, app[BUS])
        app[SERVICES] = Services(settings, limiter, store, app[BUS], app[TWILIO_REST], app[HTTP],
                                 app[TOKEN_SECRET], app[LIFECYCLE])
        app[CALL_SERVICES] = call_services(settings, app)
        async with _duty(db.gate.watch(), "database-watch"):  # probes; migrates once it can
            yield


async def limiter_duties(app: web.Application) -> AsyncIterator[None]:
    """Noticing PostgreSQL's return, writing back charges made while it was away, cleanup."""
    async with _duty(app[LIMITER].maintain(), "limiter-maintenance"):
        yield


async def calls_duties(app: web.Application) -> AsyncIterator[None]:
    """Old records forgotten; this instance's heartbeat, dead instances' calls ended (their
    followers told), calls admitted while PostgreSQL was away recorded."""
    store, bus, fanout = app[CALL_STORE], app[BUS], app[FANOUT]

    def reaped(call_sid: str) -> None:
        bus.publish(events.status_changed(call_sid, "ended", "instance_lost"))

    def joined() -> None:
        # The others count the instances again at once, not at their next heartbeat: an
        # outage right after a scale-out must find every share of the cap already smaller.
        fanout.offer({"type": CONTROL_INSTANCE_JOINED})

    async with _duty(tidy_calls(store), "calls-cleanup"), \
            _duty(store.maintain(reaped, status.FINAL_RANK, joined), "calls-upkeep"):
        yield
    await store.leave()


async def event_fanout(app: web.Application) -> AsyncIterator[None]:
    """Events to and from the other instances (LISTEN/NOTIFY)."""
    fanout, bus, calls, store = app[FANOUT], app[BUS], app[LIFECYCLE].calls, app[CALL_STORE]
    bus.forward = fanout.offer

    def control(message: dict) -> None:
        if message["type"] == CONTROL_END_CALL and (call := calls.get(message.get("callSid"))) is not None:
            call.request_end(str(message.get("reason") or "ended_by_client"))
        elif message["type"] == CONTROL_INSTANCE_JOINED:
            store.beat_soon()

    fanout.on_control = control
    try:
        async with _duty(fanout.run(), "event-fanout"):
            yield
    finally:
        bus.forward = None


@contextlib.asynccontextmanager
async def _duty(coro, name: str) -> AsyncIterator[None]:
    """A background task for as long as the context lasts."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def last_calls(app: web.Application) -> None:
    # Runs when aiohttp shuts down, after it stopped reading from every connection: any call
    # still live (serve() drains them first) can only be ended now.
    await drain(app, timeout=0)


def build_limiter(settings: Settings, gate: DatabaseGate, queries: Queries, metrics: Metrics | None = None) -> Limiter:
    return Limiter(
        gate,
        queries,
        PhoneKeyer(settings.phone_key.value, [k.value for k in settings.phone_previous_keys]),
        Rules(settings.phone_max_calls, settings.phone_window_ms, settings.phone_cooldown_ms),
        Regions(settings.default_region, settings.allowed_regions),
        fail_mode=settings.limiter_fail_mode,
        timeout=settings.database_timeout_ms / 1000,
        observe=metrics.observe_limiter if metrics else None,
    )


def model_connector(settings: Settings) -> ModelConnector:
    if settings.openai_api_key:
        return RealtimeConnector(settings.openai_realtime_url, settings.openai_realtime_model,
                                 settings.openai_api_key.value, settings.model_ready_timeout_ms / 1000)
    return OfflineConnector()


def call_services(settings: Settings, app: web.Application) -> CallServices:
    duration = settings.session_duration_ms / 1000
    return CallServices(
        connector=model_connector(settings),
        bus=app[BUS],
        hangup=app[TWILIO_REST].hangup,
        record_status=functools.partial(status.record, app[CALL_STORE]),
        transcription_model=settings.openai_transcription_model,
        session_duration_s=duration,
        wrap_up_s=min(WRAP_UP_S, duration / 4),
        ready_timeout_s=settings.model_ready_timeout_ms / 1000,
        observe_frame=app[METRICS].frame_observer(),
        observe_setup=app[METRICS].setup.labels("stream").observe,
        count_response_failure=app[METRICS].count_response_failure,
        count_rejected_frame=lambda reason: app[METRICS].frames_rejected.labels(reason).inc(),
    )


async def tidy_calls(store: CallStore, every: float = 300.0) -> None:
    """Background duty until cancelled: forget spent tokens, stale call requests, old calls."""
    while True:
        await asyncio.sleep(every)
        if deleted := await store.cleanup():
            log.info("calls cleanup deleted %d row(s)", deleted)


# --- the lifecycle ----------------------------------------------------------------------------


async def drain(app: web.Application, timeout: float) -> None:
    """Shutdown, first step, with the listener still open: /healthz answers 503 and new calls
    are refused with TwiML, while live calls keep relaying until they end or ``timeout``
    passes; then those left are ended (and hung up over REST) and awaited. Browsers stay
    connected (and may reconnect here) until the calls end, so they see each call's end;
    then they are told to go elsewhere (1001): left open, they would hold the shutdown until
    its timeout and then see 1006."""
    lifecycle = app[LIFECYCLE]
    calls = lifecycle.calls
    lifecycle.draining = True
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
    clients = list(app[FRONTEND].sockets.values())
    await asyncio.gather(*(client.close(timeout=FLUSH_S) for client in clients), return_exceptions=True)


async def serve(settings: Settings, host: str, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then drain (listener open), then shut down."""
    app = create_app(settings)
    peers = None
    if os.environ.get(FOLDER_ENV) and os.environ.get(WORKER_ENV, "").isdigit():
        # One worker of several (workers.py): a scrape reaching it answers for them all.
        peers = app[WORKER_METRICS] = WorkerMetrics(int(os.environ[WORKER_ENV]), Path(os.environ[FOLDER_ENV]),
                                                    functools.partial(health.own_metrics, app))
        await peers.start()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, settings.port, reuse_port=reuse_port or None).start()
    log.info("listening on %s:%d", host, settings.port)
    # Everything made so far (modules, the app, the pool) lives as long as the process: out of
    # the collector's sight, a full collection under load walks only what calls made.
    gc.freeze()
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
        if peers is not None:
            await peers.stop()
    log.info("stopped")


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
    parser.add_argument("--workers", type=int, metavar="N",
                        help="server processes sharing the port, one per core (overrides WEB_CONCURRENCY)")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker's own
    sub = parser.add_subparsers(dest="command", metavar="admin")
    admin_parser = sub.add_parser("admin", help="operator commands: stats, reset NUMBER, cleanup, migrate, doctor")
    admin_sub = admin_parser.add_subparsers(dest="action", required=True)
    admin_sub.add_parser("stats", help="print limiter analytics as JSON")
    reset = admin_sub.add_parser("reset", help="forget one number's charges")
    reset.add_argument("number", help="the phone number (any common format)")
    admin_sub.add_parser("cleanup", help="delete limiter rows whose window has passed")
    admin_sub.add_parser("migrate", help="apply pending schema migrations and exit")
    admin_sub.add_parser("doctor", help="check this deployment's database, URL, Twilio and OpenAI settings")
    return parser.parse_args(argv)


async def run_admin(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "doctor":  # checks the database itself: it must not be migrated on the way in
        import doctor
        return await doctor.run(settings)
    async with open_database(settings, require=True) as db:  # migrated on the way in
        if args.action == "migrate":
            applied = db.gate.applied
            print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
            return 0
        limiter = build_limiter(settings, db.gate, db.queries)
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
        if args.workers is not None:
            if not 1 <= args.workers <= 64:
                raise ConfigError(f"--workers must be 1 to 64, got {args.workers}")
            settings = settings.replace(workers=args.workers).checked()
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
    if settings.workers > 1:
        return asyncio.run(supervise(settings, args.host, settings.workers))
    log.info("Callgate %s starting on %s:%d (public URL %s, %s, event loop %s)", VERSION, args.host,
             settings.port, settings.public_url, settings.env, settings.event_loop)
    if not settings.openai_api_key:
        log.warning("OPENAI_API_KEY is not set: calls are answered by the OFFLINE agent "
                    "(it plays the caller's words back). Set OPENAI_API_KEY for the real model.")
    if not settings.twilio_auth_token:
        log.warning("TWILIO_AUTH_TOKEN is not set: Twilio requests are NOT signature-checked "
                    "and calls are not hung up over REST. Never run like this in public.")
    run(serve(settings, args.host, args.reuse_port), settings.event_loop)
    return 0


def run(coro, event_loop: str) -> None:
    """asyncio.run on uvloop when asked for and installed: it halves the event loop's own cost
    per frame (bench/calls.py), which is most of a relay's CPU."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("EVENT_LOOP=uvloop but uvloop is not installed: running on asyncio's own loop")
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())

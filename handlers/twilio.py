"""Twilio's edges: the voice webhook (``/twiml``), the status callback (``/twilio/status``) and
the Media Stream WebSocket (``/call``).

Every request from Twilio is checked against ``X-Twilio-Signature`` when an auth token (or a
Webhooks rule's shared key) is set, over the URL Twilio used (``PUBLIC_URL`` + path + query:
behind a proxy our own view of the URL differs), with HMAC-SHA1 or, as a Webhooks rule says
in ``X-Twilio-Webhooks-Signature-Settings``, HMAC-SHA256. A missing or bad signature is a 403,
never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import orjson
from aiohttp import WSMsgType, web
from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.voice_response import Connect, VoiceResponse

import scenarios
from appkeys import BUS, CALL_SERVICES, CALL_STORE, CALLS, LIFECYCLE, LIMITER, METRICS, REFUSALS, SETTINGS, TOKEN_SECRET
from bridge import events, tokens
from bridge import twilio as wire
from bridge.call import Call, CallSetup
from db.calls import CallStoreUnavailable
from limiter.errors import InvalidNumber
from limiter.limiter import CHARGE_ID

log = logging.getLogger("callgate.twilio")

START_TIMEOUT_S = 5.0         # a stream must send a valid `start` this soon
MAX_STREAMS_STARTING = 200    # sockets waiting for their `start` at once
MAX_STREAM_FRAME = 64 * 1024  # a media frame is ~300 bytes; start carries our parameters
REFUND_STATUSES = frozenset({"busy", "no-answer", "failed", "canceled"})
STALE_GRACE_S = 120.0  # an unended call this long past the session limit was lost with its instance

# What the caller hears when we will not take the call.
SAY_LIMITED = "Sorry, this number has reached its call limit. Please try again in about {wait}."
SAY_REFUSED = "Sorry, we cannot take calls from this number."
SAY_BUSY = "Sorry, we cannot take your call right now. Please try again in a few minutes."


# --- signatures -----------------------------------------------------------------------------


def public_url_for(request: web.Request) -> str:
    """The URL Twilio requested, as it signed it: PUBLIC_URL + the raw path and query. (aiohttp's
    ``path_qs`` decodes escapes such as %2C and %7E: the signature over it would not match.)"""
    return request.app[SETTINGS].public_url + request.raw_path


def stream_url(public_url: str) -> str:
    """The Media Stream URL given to Twilio: wss:// for an https PUBLIC_URL (ws:// in development)."""
    parts = urlsplit(public_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/call"


def check_signature(request: web.Request, url: str, params: Mapping[str, str]) -> None:
    """Raise 403 unless the request carries Twilio's signature for ``url`` + ``params``.

    Twilio signs with HMAC-SHA1 and the auth token by default. An account with a Webhooks
    rule signs with the rule's shared key instead, and names the algorithm (HMAC_SHA1 or
    HMAC_SHA256) in X-Twilio-Webhooks-Signature-Settings. A request naming an algorithm we
    cannot check, or whose key we do not have, is refused with a log line that says so."""
    settings, refusals = request.app[SETTINGS], request.app[REFUSALS]
    if not (settings.twilio_auth_token or settings.twilio_shared_key):
        return  # development without an auth token: announced at start
    signature = request.headers.get("X-Twilio-Signature")
    if not signature:
        raise web.HTTPForbidden(text="missing X-Twilio-Signature")
    rule = request.headers.get(SIGNATURE_SETTINGS_HEADER)
    algorithm = get_signature_algorithm(rule).upper()
    if algorithm not in (HMAC_SHA1, HMAC_SHA256):
        refusals.warning("algorithm", "request to %s refused: signed with %r, which Twilio's "
                          "library here cannot check (upgrade twilio)", request.path, algorithm[:40])
        raise web.HTTPForbidden(text=f"unsupported signature algorithm {algorithm[:40]}")
    key = settings.twilio_shared_key if rule is not None else settings.twilio_auth_token
    if not key:
        missing = "TWILIO_WEBHOOK_SHARED_KEY" if rule is not None else "TWILIO_AUTH_TOKEN"
        refusals.warning(f"key:{missing}", "request to %s refused: it is signed (%s) with a key this server "
                          "does not have: set %s", request.path, algorithm, missing)
        raise web.HTTPForbidden(text=f"signed with a key this server does not have ({missing})")
    if not RequestValidator(key.value).validate(url, params, signature, algorithm):
        refusals.warning("mismatch", "request to %s refused: X-Twilio-Signature (%s) does not match; check "
                          "PUBLIC_URL and the signing key", request.path, algorithm)
        raise web.HTTPForbidden(text="X-Twilio-Signature does not match")


# --- the voice webhook ----------------------------------------------------------------------


def _twiml(response: VoiceResponse) -> web.Response:
    return web.Response(text=str(response), content_type="text/xml")


def _say_and_hang_up(text: str) -> web.Response:
    response = VoiceResponse()
    response.say(text)
    response.hangup()
    return _twiml(response)


def _wait_words(reset_ms: int) -> str:
    minutes = max(1, math.ceil((reset_ms - time.time() * 1000) / 60_000))
    if minutes < 90:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{round(minutes / 60)} hours"


async def twiml(request: web.Request) -> web.Response:
    """Voice webhook: charge the call to its number, then connect it to the agent or refuse it."""
    app = request.app
    form = await request.post() if request.method == "POST" else {}
    check_signature(request, public_url_for(request), form)
    fields = form if request.method == "POST" else request.query
    call_sid = fields.get("CallSid", "")
    if not wire.safe_id(call_sid):
        raise web.HTTPBadRequest(text="CallSid is missing or malformed")
    if app[LIFECYCLE].draining:
        return _say_and_hang_up(SAY_BUSY)

    direction = fields.get("Direction", "inbound")
    number = fields.get("To" if direction == "outbound-api" else "From", "")
    # An outbound call placed by call.start was charged under its reservation id, which its
    # (signed) webhook URL carries; any other call is charged under its CallSid.
    charge_id = request.query.get("charge") or call_sid
    if not CHARGE_ID.fullmatch(charge_id):
        raise web.HTTPBadRequest(text="charge must be 1-64 letters, digits or _.:-")
    limiter = app[LIMITER]
    try:
        phone = limiter.parse(number)
    except InvalidNumber as exc:
        log.info("webhook %s refused: %s", call_sid, exc.code)
        return _say_and_hang_up(SAY_REFUSED)
    decision = await limiter.hit(phone, charge_id)
    if not decision.allowed:
        log.info("webhook %s for %s refused: %s", call_sid, phone.masked, decision.reason)
        if decision.reason in ("limit_reached", "cooldown"):
            return _say_and_hang_up(SAY_LIMITED.format(wait=_wait_words(decision.reset_time)))
        return _say_and_hang_up(SAY_BUSY)

    try:
        scenario, config, voice = await _call_setup(app, request, charge_id, call_sid)
    except scenarios.ScenarioError as exc:
        log.error("webhook %s: %s (check the webhook URL's ?scenario=)", call_sid, exc)
        await limiter.refund(charge_id)
        return _say_and_hang_up(SAY_BUSY)
    settings = app[SETTINGS]
    try:
        admitted, _ = await app[CALL_STORE].admit(
            call_sid, charge_id, direction, phone.region, scenario.id,
            max_live=settings.max_concurrent_calls,
            stale_after_s=settings.session_duration_ms / 1000 + STALE_GRACE_S,
        )
    except CallStoreUnavailable:
        # The cap cannot be checked: take the call (the per-number limit still held).
        log.warning("webhook %s: call record not written (database unavailable)", call_sid)
        admitted = True
    if not admitted:
        log.warning("webhook %s refused: %d calls live already", call_sid, settings.max_concurrent_calls)
        await limiter.refund(charge_id)
        return _say_and_hang_up(SAY_BUSY)
    params = {"scenarioId": scenario.id, "voice": voice,
              **await _config_parameter(app, call_sid, scenario, config, voice)}
    token = tokens.mint(app[TOKEN_SECRET], call_sid, params)
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url(settings.public_url))
    for name, value in {**params, tokens.TOKEN_PARAMETER: token}.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    log.info("webhook %s (%s, %s): connecting to %s", call_sid, direction, phone.masked, scenario.id)
    return _twiml(response)


async def _call_setup(app: web.Application, request: web.Request, charge_id: str,
                      call_sid: str) -> tuple[scenarios.Scenario, dict[str, str], str]:
    """What the agent does on this call: what call.start asked for (found by the reservation
    id the webhook URL carries), else what the webhook URL's query asks for, with defaults
    for whatever nobody filled in (``scenarios.from_query``)."""
    if "charge" in request.query:
        try:
            wanted = await app[CALL_STORE].get_request(charge_id)
        except CallStoreUnavailable:
            wanted = None
            log.warning("call request %s unreadable (database unavailable): default scenario", charge_id)
        if wanted is not None:
            scenario = scenarios.get(wanted["scenario_id"])
            config = scenario.validate(orjson.loads(wanted["config"]), lenient=True)
            return scenario, config, scenario.voice(wanted["voice"], lenient=True)
    scenario, config, voice, notes = scenarios.from_query(request.query)
    for note in notes:
        log.warning("webhook %s: the URL's scenario config: %s", call_sid, note)
    return scenario, config, voice


# Twilio bounds the length of a stream's <Parameter>s (error 31103): a config longer than this
# (a pasted job description) is kept in PostgreSQL and the stream gets its id instead.
MAX_CONFIG_PARAMETER = 400


async def _config_parameter(app: web.Application, call_sid: str, scenario: scenarios.Scenario,
                            config: dict[str, str], voice: str) -> dict[str, str]:
    """The stream parameter that carries the call's config: ``config`` itself, or ``configRef``."""
    config_json = orjson.dumps(config).decode()
    if len(config_json) <= MAX_CONFIG_PARAMETER:
        return {"config": config_json}
    ref = f"CF{call_sid}"
    try:
        await app[CALL_STORE].put_request(ref, scenario.id, config_json, voice)
    except CallStoreUnavailable:
        log.warning("webhook %s: config not stored (database unavailable): the scenario's defaults", call_sid)
        return {"config": "{}"}
    return {"configRef": ref}


# --- status callbacks -----------------------------------------------------------------------


async def status_callback(request: web.Request) -> web.Response:
    """Twilio status callback: publish the change; refund a call that never connected.
    Duplicates and late arrivals are harmless: statuses only move forward, refunds happen once."""
    app = request.app
    form = await request.post()
    check_signature(request, public_url_for(request), form)
    call_sid = form.get("CallSid", "")
    status = events.TWILIO_STATUS.get(form.get("CallStatus", ""))
    if not wire.safe_id(call_sid) or status is None:
        raise web.HTTPBadRequest(text="CallSid or CallStatus is missing or unknown")
    # Our outbound calls' callback URL (signed) names the charge; other calls are charged
    # under their CallSid.
    named_charge = request.query.get("charge")
    if named_charge is not None and not CHARGE_ID.fullmatch(named_charge):
        raise web.HTTPBadRequest(text="charge must be 1-64 letters, digits or _.:-")
    store = app[CALL_STORE]
    try:
        changed = await store.set_status(call_sid, status, events.STATUS_RANK[status], charge_id=named_charge)
        charge_id = await store.claim_refund(call_sid) if status in REFUND_STATUSES else None
    except CallStoreUnavailable:
        # The limiter refunds idempotently (and writes back later if it must): refunding
        # without the record cannot refund twice.
        changed = True
        charge_id = (named_charge or call_sid) if status in REFUND_STATUSES else None
    if changed:
        app[BUS].publish(events.status_changed(call_sid, status))
    if charge_id is not None:
        await app[LIMITER].refund(charge_id)
        log.info("call %s %s: charge refunded", call_sid, status)
    return web.Response(status=204)


# --- the media stream -----------------------------------------------------------------------


async def _read_start(ws: web.WebSocketResponse) -> wire.Start | None:
    """The stream's `start` (after `connected`), or None if the socket sends anything else."""
    async with asyncio.timeout(START_TIMEOUT_S):
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                return None
            try:
                event = wire.parse(msg.data)
            except wire.ProtocolError:
                return None
            if isinstance(event, wire.Connected):
                continue
            return event if isinstance(event, wire.Start) else None
    return None


async def media_stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    check_signature(request, stream_url(settings.public_url), {})
    lifecycle = app[LIFECYCLE]
    # The handshake signature is the same for every stream (Twilio signs the bare URL): bound
    # how many sockets may wait for their `start` at once.
    if lifecycle.streams_starting >= MAX_STREAMS_STARTING:
        raise web.HTTPServiceUnavailable(text="too many streams starting")
    lifecycle.streams_starting += 1
    try:
        ws = web.WebSocketResponse(max_msg_size=MAX_STREAM_FRAME, compress=False, heartbeat=None)
        await ws.prepare(request)
        try:
            start = await _read_start(ws)
        except TimeoutError:
            start = None
    finally:
        lifecycle.streams_starting -= 1
    if start is None:
        await ws.close(code=1008, message=b"expected a valid start message")
        return ws
    try:
        setup = await _admit_stream(app, start)
    except _Refused as exc:
        log.warning("stream for %r refused: %s", start.call_sid[:40], exc)
        await ws.close(code=1008, message=str(exc).encode()[:120])
        return ws

    call = Call(ws, setup, app[CALL_SERVICES])
    app[CALLS][setup.call_sid] = call
    app[LIFECYCLE].active_calls += 1
    app[METRICS].active_calls.inc()
    app[METRICS].open_sockets.labels("twilio").inc()
    log.info("call %s: stream %s started (%s)", setup.call_sid, setup.stream_sid, setup.scenario.id)
    try:
        await call.run()
    finally:
        app[LIFECYCLE].active_calls -= 1
        app[METRICS].active_calls.dec()
        app[METRICS].open_sockets.labels("twilio").dec()
        app[METRICS].calls.labels(call.end_reason or "ended").inc()
        if app[CALLS].get(setup.call_sid) is call:
            del app[CALLS][setup.call_sid]
    return ws


class _Refused(Exception):
    pass


async def _admit_stream(app: web.Application, start: wire.Start) -> CallSetup:
    """Check the start's token and parameters; spend the token; build the call's setup."""
    if not wire.safe_id(start.stream_sid) or not wire.safe_id(start.call_sid):
        raise _Refused("malformed streamSid or callSid")
    params = start.custom_parameters
    try:
        claims = tokens.verify(app[TOKEN_SECRET], params.get(tokens.TOKEN_PARAMETER), start.call_sid, params)
    except tokens.TokenError as exc:
        raise _Refused(str(exc)) from None
    try:
        first = await app[CALL_STORE].spend_token(claims.jti)
    except CallStoreUnavailable:
        # Fail open on this instance only: the token still expires within minutes.
        first = app[LIFECYCLE].spend_token_locally(claims.jti, claims.expires)
    if not first:
        raise _Refused("stream token already used")
    try:
        scenario = scenarios.get(params.get("scenarioId"))
        config = orjson.loads(params.get("config") or "{}")
    except (scenarios.ScenarioError, orjson.JSONDecodeError) as exc:
        raise _Refused(f"bad stream parameters: {exc}") from None
    if params.get("configRef"):
        try:
            stored = await app[CALL_STORE].get_request(params["configRef"])
        except CallStoreUnavailable:
            stored = None
        if stored is None:
            log.warning("call %s: its stored config is unreadable: the scenario's defaults", start.call_sid)
        config = orjson.loads(stored["config"]) if stored else {}
    # The parameters are ours (the token proves it): whatever changed since is defaulted.
    return CallSetup(start.call_sid, start.stream_sid, scenario, scenario.validate(config, lenient=True),
                     scenario.voice(params.get("voice"), lenient=True))

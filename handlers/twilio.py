"""Twilio's edges: the voice webhook (``/twiml``), the status callback (``/twilio/status``) and
the Media Stream WebSocket (``/call``). They translate; ``calls/admission.py`` and
``calls/status.py`` decide, and ``bridge/call.py`` runs the call.

Every request from Twilio is checked against ``X-Twilio-Signature`` when an auth token (or a
Webhooks rule's shared key) is set, over the URL Twilio used (``PUBLIC_URL`` + path + query:
behind a proxy our own view of the URL differs), with HMAC-SHA1 or, as a Webhooks rule says
in ``X-Twilio-Webhooks-Signature-Settings``, HMAC-SHA256. A missing or bad signature is a 403,
never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

from aiohttp import WSMsgType, web
from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.voice_response import VoiceResponse

from appkeys import CALL_SERVICES, LIFECYCLE, METRICS, REFUSALS, SERVICES, SETTINGS
from bridge import twilio as wire
from bridge.call import Call
from calls import admission, status
from config import MAX_MESSAGE_BYTES
from handlers.clients import client_ip
from limiter.limiter import CHARGE_ID

log = logging.getLogger("callgate.twilio")

# Twilio sends `connected` and `start` as soon as the socket opens. The upgrade's signature is
# the same for every stream (Twilio signs the bare URL), so one captured signature opens
# sockets for anyone: those must not be able to crowd real streams out.
START_TIMEOUT_S = 2.0            # a stream must send a valid `start` this soon
MAX_STREAMS_STARTING = 200       # sockets waiting for their `start` at once; past it, the oldest goes
MAX_STARTING_PER_ADDRESS = 20    # ...of them from one address


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


def _render(result: admission.Connect | admission.Refuse, public_url: str) -> web.Response:
    if isinstance(result, admission.Refuse):
        response = VoiceResponse()
        if result.say:
            response.say(result.say)
        response.hangup()
        return web.Response(text=str(response), content_type="text/xml")
    # Every admitted call's answer, built as text: the TwiML library's ElementTree rendering was
    # a fifth of the set-up's CPU in a burst. quoteattr escapes as ElementTree does.
    parameters = "".join(f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>"
                         for name, value in result.parameters.items())
    return web.Response(text=f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
                             f'<Stream url={quoteattr(stream_url(public_url))}>{parameters}</Stream>'
                             f'</Connect></Response>', content_type="text/xml")


def _charge_named(request: web.Request) -> str | None:
    """The charge our own (signed) webhook and callback URLs name: a call placed by call.start."""
    named = request.query.get("charge")
    if named is not None and not CHARGE_ID.fullmatch(named):
        raise web.HTTPBadRequest(text="charge must be 1-64 letters, digits or _.:-")
    return named


async def twiml(request: web.Request) -> web.Response:
    """Voice webhook: connect the call to the agent or refuse it (calls/admission.py)."""
    began = time.monotonic()
    form = await request.post() if request.method == "POST" else {}
    check_signature(request, public_url_for(request), form)
    fields = form if request.method == "POST" else request.query
    call_sid = fields.get("CallSid", "")
    if not wire.safe_id(call_sid):
        raise web.HTTPBadRequest(text="CallSid is missing or malformed")
    named = _charge_named(request)
    direction = fields.get("Direction", "inbound")
    if direction not in admission.DIRECTIONS:
        raise web.HTTPBadRequest(text="Direction is not one of Twilio's")
    call = admission.WebhookCall(
        call_sid=call_sid, direction=direction, number=fields.get("To" if direction == "outbound-api" else "From", ""),
        charge_id=named or call_sid, placed_by_us=named is not None, query=request.query)
    result = await admission.admit_webhook(request.app[SERVICES], call)
    response = _render(result, request.app[SETTINGS].public_url)
    request.app[METRICS].setup.labels("webhook").observe(time.monotonic() - began)
    return response


# --- status callbacks -----------------------------------------------------------------------


async def status_callback(request: web.Request) -> web.Response:
    """Twilio status callback (calls/status.py). Duplicates and late arrivals are harmless."""
    form = await request.post()
    check_signature(request, public_url_for(request), form)
    call_sid = form.get("CallSid", "")
    ours = status.TWILIO_STATUS.get(form.get("CallStatus", ""))
    if not wire.safe_id(call_sid) or ours is None:
        raise web.HTTPBadRequest(text="CallSid or CallStatus is missing or unknown")
    await status.on_callback(request.app[SERVICES], call_sid, ours, _charge_named(request))
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


async def _accept_start(request: web.Request) -> tuple[web.WebSocketResponse, wire.Start | None]:
    """Upgrade, and wait (bounded) for the stream's start. At most MAX_STARTING_PER_ADDRESS
    sockets from one address may wait; when MAX_STREAMS_STARTING wait in all, the one that has
    waited longest is closed for the new one: a real stream sends its start at once, so idle
    sockets are always the oldest, and can never block the calls behind them."""
    lifecycle = request.app[LIFECYCLE]
    starting = lifecycle.starting
    # Behind Fly's proxy every stream comes from the proxy: its client's address is what counts.
    address = client_ip(request)
    if sum(1 for a in starting.values() if a == address) >= MAX_STARTING_PER_ADDRESS:
        request.app[REFUSALS].warning("stream:per_address", "stream upgrade refused: %d sockets from one address "
                                      "wait for their start", MAX_STARTING_PER_ADDRESS)
        raise web.HTTPServiceUnavailable(text="too many streams starting from this address")
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, compress=False, heartbeat=None)
    await ws.prepare(request)
    if len(starting) >= MAX_STREAMS_STARTING:
        oldest = next(iter(starting))
        del starting[oldest]
        request.app[REFUSALS].warning("stream:evicted", "a stream socket that sent no start was closed for a new one")
        closing = asyncio.get_running_loop().create_task(oldest.close(code=1008, message=b"no start in time"))
        lifecycle.closing.add(closing)
        closing.add_done_callback(lifecycle.closing.discard)
    starting[ws] = address
    try:
        return ws, await _read_start(ws)
    except TimeoutError:
        return ws, None
    finally:
        starting.pop(ws, None)


async def media_stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    check_signature(request, stream_url(app[SETTINGS].public_url), {})
    ws, start = await _accept_start(request)
    if start is None:
        await ws.close(code=1008, message=b"expected a valid start message")
        return ws
    try:
        setup = await admission.admit_stream(app[SERVICES], start)
    except admission.StreamRefused as exc:
        log.warning("stream for %r refused: %s", start.call_sid[:40], exc)
        await ws.close(code=1008, message=str(exc).encode()[:120])
        return ws
    call = Call(ws, setup, app[CALL_SERVICES])
    live = app[LIFECYCLE].calls
    live[setup.call_sid] = call
    app[METRICS].open_sockets.labels("twilio").inc()
    log.info("call %s: stream %s started (%s)", setup.call_sid, setup.stream_sid, setup.scenario.id)
    try:
        await call.run()
    finally:
        app[METRICS].open_sockets.labels("twilio").dec()
        app[METRICS].calls.labels(call.end_reason or "ended").inc()
        if live.get(setup.call_sid) is call:
            del live[setup.call_sid]
        app[LIFECYCLE].call_ended()
    return ws

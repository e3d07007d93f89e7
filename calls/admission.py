"""Admitting a call: the voice webhook's decision, and the media stream's start.

One inbound call, file by file:

1. ``handlers/twilio.py`` ``twiml``: checks Twilio's signature, reads the form → ``WebhookCall``;
2. here, ``admit_webhook``: the number parsed and charged (``limiter/limiter.py`` →
   ``sql/limiter_hit.sql``), the scenario chosen (``scenarios``: call.start's stored request,
   or the URL's query), a stream token minted (``bridge/tokens.py``), the global cap checked
   and the call recorded with its answer (``db/calls.py`` → ``sql/calls_admit.sql``; refunded
   if refused; a retried webhook gets the same answer, a replayed one a hang-up)
   → ``Connect`` (the handler renders ``<Connect><Stream>``) or ``Refuse`` (``<Say>``, ``<Hangup/>``);
3. Twilio opens ``/call``: ``handlers/twilio.py`` ``media_stream`` reads ``start``, then here,
   ``admit_stream``: the token checked and spent once, the call marked streaming here, once,
   and connected (``sql/calls_stream_start.sql``) → a ``CallSetup``;
4. ``bridge/call.py`` runs the call; its statuses go through ``calls/status.py``;
5. Twilio's status callbacks: ``handlers/twilio.py`` → ``calls/status.py`` ``on_callback``
   (refunds a call that never connected).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

import scenarios
from bridge import tokens
from bridge import twilio as wire
from bridge.call import CallSetup
from calls import status
from calls.services import Services
from db.calls import Cap
from limiter.errors import InvalidNumber
from twilio_rest import RING_TIMEOUT_S

log = logging.getLogger("callgate.admission")

# How long a call counts under the global cap (db/calls.py:Cap): a streaming one for the session
# limit plus this grace; an admitted one whose stream has not started, SETUP_S; an outbound
# call's place while it rings, its ring timeout plus HOLD_GRACE_S. Past these a call was lost
# (its instance died, or Twilio never opened the stream) and no longer holds its place.
STALE_GRACE_S = 120.0
SETUP_S = 60.0
HOLD_GRACE_S = 30.0
# Twilio's words for a call's direction: anything else in a signed webhook is refused (it would
# end up in logs and records as sent).
DIRECTIONS = frozenset({"inbound", "outbound-api", "outbound-dial", "trunking-originating", "trunking-terminating"})
# Twilio bounds the length of a stream's <Parameter>s (error 31103): a config longer than this
# (a pasted job description) is kept in PostgreSQL and the stream gets its id instead.
MAX_CONFIG_PARAMETER = 400

# What the caller hears when we will not take the call.
SAY_LIMITED = "Sorry, this number has reached its call limit. Please try again in about {wait}."
SAY_REFUSED = "Sorry, we cannot take calls from this number."
SAY_BUSY = "Sorry, we cannot take your call right now. Please try again in a few minutes."


@dataclass(frozen=True)
class WebhookCall:
    """What the voice webhook says about a call."""

    call_sid: str
    direction: str
    number: str       # the number under limit: To for outbound-api calls, From otherwise
    charge_id: str    # a CallSid, or the reservation id call.start charged (?charge= in the URL)
    placed_by_us: bool
    query: Mapping[str, str]  # the webhook URL's query (signed): may choose the scenario


@dataclass(frozen=True)
class Connect:
    """Take the call: open a media stream with these <Parameter>s (the token among them)."""

    parameters: dict[str, str]


@dataclass(frozen=True)
class Refuse:
    """Say this (if anything), then hang up."""

    say: str | None


class StreamRefused(Exception):
    """The stream's start cannot be taken; the message says why (for the close frame)."""


async def admit_webhook(services: Services, call: WebhookCall) -> Connect | Refuse:
    if services.lifecycle.draining:
        return Refuse(SAY_BUSY)
    limiter = services.limiter
    try:
        phone = limiter.parse(call.number)
    except InvalidNumber as exc:
        log.info("webhook %s refused: %s", call.call_sid, exc.code)
        return Refuse(SAY_REFUSED)
    decision = await limiter.hit(phone, call.charge_id)
    if not decision.allowed:
        log.info("webhook %s for %s refused: %s", call.call_sid, phone.masked, decision.reason)
        if decision.reason in ("limit_reached", "cooldown"):
            return Refuse(SAY_LIMITED.format(wait=_wait_words(decision.reset_time)))
        return Refuse(SAY_BUSY)
    try:
        scenario, config, voice = await _call_setup(services, call)
    except scenarios.ScenarioError as exc:
        log.error("webhook %s: %s (check the webhook URL's ?scenario=)", call.call_sid, exc)
        await limiter.refund(call.charge_id)
        return Refuse(SAY_BUSY)
    params = {"scenarioId": scenario.id, "voice": voice,
              **await _config_parameter(services, call.call_sid, scenario, config, voice)}
    params[tokens.TOKEN_PARAMETER] = tokens.mint(services.token_secret, call.call_sid, params)
    admission = await services.store.admit(call.call_sid, call.charge_id, call.direction, phone.region,
                                           scenario.id, params, phone.masked)
    if admission.state in ("ended", "streaming"):
        # A replay (Twilio signatures carry no time): the call had its stream, or has ended.
        # Its charge is the first webhook's, so nothing is refunded.
        log.warning("webhook %s refused: the call %s already", call.call_sid,
                    "has ended" if admission.state == "ended" else "has its stream")
        return Refuse(None)
    if not admission.admitted:
        log.warning("webhook %s refused: %d calls live already", call.call_sid, services.settings.max_concurrent_calls)
        await limiter.refund(call.charge_id)
        return Refuse(SAY_BUSY)
    log.info("webhook %s (%s, %s): connecting to %s%s", call.call_sid, call.direction, phone.masked, scenario.id,
             " (a retry: the same answer)" if admission.state == "pending" else "")
    return Connect(admission.stream_params)


def cap_rule(settings) -> Cap:
    """The global cap, as db/calls.py counts it."""
    return Cap(max_live=settings.max_concurrent_calls, session_s=settings.session_duration_ms / 1000 + STALE_GRACE_S,
               setup_s=SETUP_S, hold_s=RING_TIMEOUT_S + HOLD_GRACE_S, fail_mode=settings.limiter_fail_mode)


def _wait_words(reset_ms: int) -> str:
    minutes = max(1, math.ceil((reset_ms - time.time() * 1000) / 60_000))
    if minutes < 90:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{round(minutes / 60)} hours"


async def _call_setup(services: Services, call: WebhookCall) -> tuple[scenarios.Scenario, dict[str, str], str]:
    """What the agent does on this call: what call.start asked for (found by the reservation
    id the webhook URL carries), else what the webhook URL's query asks for, with defaults
    for whatever nobody filled in (``scenarios.from_query``)."""
    if call.placed_by_us:
        wanted = await services.store.get_request(call.charge_id)
        if wanted is not None:
            scenario = scenarios.get(wanted["scenario_id"])
            config = scenario.validate(orjson.loads(wanted["config"]), lenient=True)
            return scenario, config, scenario.voice(wanted["voice"], lenient=True)
    scenario, config, voice, notes = scenarios.from_query(call.query)
    for note in notes:
        log.warning("webhook %s: the URL's scenario config: %s", call.call_sid, note)
    return scenario, config, voice


async def _config_parameter(services: Services, call_sid: str, scenario: scenarios.Scenario,
                            config: dict[str, str], voice: str) -> dict[str, str]:
    """The stream parameter that carries the call's config: ``config`` itself, or ``configRef``."""
    config_json = orjson.dumps(config).decode()
    if len(config_json) <= MAX_CONFIG_PARAMETER:
        return {"config": config_json}
    ref = f"CF{call_sid}"
    if not await services.store.put_request(ref, scenario.id, config_json, voice):
        return {"config": "{}"}  # (logged by the store) the scenario's defaults
    return {"configRef": ref}


async def admit_stream(services: Services, start: wire.Start) -> CallSetup:
    """Check the start's token and parameters; spend the token; build the call's setup.
    Raises StreamRefused."""
    if not wire.safe_id(start.stream_sid) or not wire.safe_id(start.call_sid):
        raise StreamRefused("malformed streamSid or callSid")
    account = services.settings.twilio_account_sid
    if account and start.account_sid != account:
        raise StreamRefused("the stream is for another Twilio account")
    params = start.custom_parameters
    try:
        claims = tokens.verify(services.token_secret, params.get(tokens.TOKEN_PARAMETER), start.call_sid, params)
    except tokens.TokenError as exc:
        raise StreamRefused(str(exc)) from None
    try:
        scenario = scenarios.get(params.get("scenarioId"))
        config = orjson.loads(params.get("config") or "{}")
    except (scenarios.ScenarioError, orjson.JSONDecodeError) as exc:
        raise StreamRefused(f"bad stream parameters: {exc}") from None
    if params.get("configRef"):
        stored = await services.store.get_request(params["configRef"])
        config = orjson.loads(stored["config"]) if stored else {}
    # Last: the token is spent, and the call recorded streaming here and connected, only for a
    # stream that goes on to run.
    started = await services.store.start_stream(claims.jti, start.call_sid, claims.expires,
                                                connected=("connected", status.rank("connected")))
    if not started.first:
        raise StreamRefused("stream token already used, or the call already had its stream")
    # The parameters are ours (the token proves it): whatever changed since is defaulted.
    return CallSetup(start.call_sid, start.stream_sid, scenario, scenario.validate(config, lenient=True),
                     scenario.voice(params.get("voice"), lenient=True), connected_recorded=started.connected)

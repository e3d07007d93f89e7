"""Placing a call for a frontend (``call.start``), start to end in one place.

One ``call.start``, file by file:

1. ``handlers/frontend.py``: a ``/logs`` client sends ``call.start``; the connection runs
   ``place`` beside its reader (a call being placed outlives the socket) → here;
2. here: the number parsed (``limiter/phone.py``), the scenario's config checked
   (``scenarios``), the human checked (``turnstile.py``), the caller id picked, the client
   address's budget charged (``Limiter.hit_budget``), what the call is for stored
   (``db/calls.py`` ``put_request``), the number charged (``Limiter.hit``), a place held under
   the global cap (``db/calls.py`` ``hold``: the callee who answers is taken), the call placed
   over Twilio's REST API (``twilio_rest.py``; charges and place released if Twilio refuses), then
   ``on_placed`` (the client answers ``queued`` with a token and follows the call) and the call
   recorded;
3. Twilio calls the number and fetches ``/twiml?charge=…``: ``calls/admission.py`` takes over.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import orjson

import scenarios
import turnstile
from bridge import events, tokens
from calls.services import Services
from limiter.errors import InvalidNumber
from limiter.limiter import Budget
from limiter.rules import Decision, Rules
from twilio_rest import CallOutcomeUnknown, CallRefused

log = logging.getLogger("callgate.outbound")

CALL_STARTS_PER_ADDRESS = 10    # call.starts that would place a call, per client address...
CALL_START_WINDOW_MS = 3_600_000  # ...per hour


@dataclass(frozen=True)
class OutboundRequest:
    """A ``call.start`` as the client sent it (nothing checked yet)."""

    phone_number: object
    scenario_id: object
    config: object
    voice: object
    turnstile_token: object
    client_address: str  # "unknown" when there is none


@dataclass(frozen=True)
class Placed:
    call_sid: str
    token: str  # lets the client follow (call.subscribe) and end (call.end) the call


@dataclass(frozen=True)
class Failed:
    code: str  # the error code the client gets
    message: str


@dataclass(frozen=True)
class LimitExceeded:
    decision: Decision


Outcome = Placed | Failed | LimitExceeded


def caller_id(services: Services, region: str) -> str | None:
    """The number we call from: the region's (TWILIO_PHONE_NUMBER_<region>), else the US one."""
    s = services.settings
    return {"US": s.twilio_number_us, "AU": s.twilio_number_au, "IN": s.twilio_number_in}.get(region) or s.twilio_number_us


async def place(services: Services, request: OutboundRequest, on_placed: Callable[[Placed], None]) -> Outcome:
    """Place one call. ``on_placed`` runs as soon as Twilio has taken the call, before
    anything else is awaited, so the client follows it before any status can be published."""
    settings, limiter = services.settings, services.limiter
    if not isinstance(request.phone_number, str):
        return Failed("invalid_message", "call.start needs a string phoneNumber")
    try:
        phone = limiter.parse(request.phone_number)
        scenario = scenarios.get(request.scenario_id)
        config = scenario.validate(request.config)
        voice = scenario.voice(request.voice)
    except InvalidNumber as exc:
        return Failed("invalid_number", exc.message)
    except scenarios.ScenarioError as exc:
        return Failed("invalid_config", str(exc))
    address = None if request.client_address == "unknown" else request.client_address
    if settings.turnstile_secret and not await turnstile.verify(
            services.http, settings.turnstile_verify_url, settings.turnstile_secret.value,
            request.turnstile_token, address, timeout=turnstile.VERIFY_TIMEOUT_S):
        return Failed("turnstile_failed", "the human check failed; reload the page and try again")
    from_ = caller_id(services, phone.region)
    if not services.rest.enabled or not from_:
        return Failed("telephony_unavailable", "this server is not set up to place calls")

    # Counted only for requests that would place a call: a typo costs nothing.
    budget = Budget("call-starts-per-address", request.client_address,
                    Rules(CALL_STARTS_PER_ADDRESS, CALL_START_WINDOW_MS))
    budget_charge = "CS" + secrets.token_hex(16)
    if not (await limiter.hit_budget(budget, budget_charge)).allowed:
        return Failed("too_many_calls", "too many calls placed from your address; try again later")
    reservation = "RS" + secrets.token_hex(16)
    if not await services.store.put_request(reservation, scenario.id, orjson.dumps(config).decode(), voice):
        await limiter.refund(budget_charge)
        return Failed("unavailable", "calls cannot be placed right now; try again shortly")
    decision = await limiter.hit(phone, reservation)
    if not decision.allowed:
        await limiter.refund(budget_charge)
        return LimitExceeded(decision)
    # Its place under the global cap, held while it rings: the callee who answers is taken.
    if not await services.store.hold(reservation):
        await limiter.refund(reservation)
        await limiter.refund(budget_charge)
        return Failed("at_capacity", "too many calls are live right now; try again in a few minutes")

    public = settings.public_url
    try:
        call_sid = await services.rest.create_call(
            to=phone.e164, from_=from_, url=f"{public}/twiml?charge={reservation}",
            status_callback=f"{public}/twilio/status?charge={reservation}")
    except CallRefused as exc:
        await limiter.refund(reservation)  # nothing was placed: the slots come back
        await limiter.refund(budget_charge)
        await services.store.release_hold(reservation)
        log.info("call.start to %s refused by Twilio: %s %s", phone.masked, exc.status, exc.code)
        return Failed("call_refused", f"Twilio refused the call: {exc.message}")
    except CallOutcomeUnknown as exc:
        # The call may have been placed: the charges stay, and nothing is retried.
        log.warning("call.start to %s: outcome unknown (%s)", phone.masked, exc)
        return Failed("call_outcome_unknown", "Twilio did not answer in time; the call may still ring")

    placed = Placed(call_sid, tokens.subscription_token(services.token_secret, call_sid))
    log.info("call.start: placed %s to %s (%s)", call_sid, phone.masked, scenario.id)
    services.bus.publish(events.status_changed(call_sid, "queued"))  # for followers elsewhere
    on_placed(placed)
    await services.store.record(call_sid, reservation, "outbound-api", phone.region, scenario.id, phone.masked)
    return placed

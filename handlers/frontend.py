"""``WS /logs``: the frontend protocol (SPEC §6) for our web page and other apps.

The connection only dispatches messages and delivers events: ``rate_limit_check`` asks the
limiter, ``call.start`` runs ``calls/outbound.py`` beside the reader, ``call.subscribe`` and
``call.end`` check the call's token. Each client gets a bounded outgoing queue and a sender
task of its own: a browser that stops reading fills its own queue and is disconnected, and
never slows a call or another browser. Only typed call events (status, transcripts, function
calls) reach a client, and only for calls it holds a token for (or every call, for an operator
with ADMIN_TOKEN, who also gets each call's ``call.details`` from its record: the /admin page).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from datetime import datetime
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from appkeys import (
    BUS,
    CALL_STORE,
    FANOUT,
    FRONTEND,
    LIFECYCLE,
    LIMITER,
    METRICS,
    REFUSALS,
    SERVICES,
    SETTINGS,
    TOKEN_SECRET,
)
from bridge import events, tokens
from bridge.fanout import CONTROL_END_CALL
from calls import outbound, status
from config import MAX_MESSAGE_BYTES, origin_in
from handlers.admin import check_admin_token
from handlers.clients import client_ip
from lifecycle import HANDSHAKES_PER_S
from limiter.rules import Decision

log = logging.getLogger("callgate.frontend")

CLIENT_QUEUE = 256         # messages waiting for one client before it counts as stuck
SEND_TIMEOUT_S = 5.0       # one message taking longer than this to go out: the client is stuck
HEARTBEAT_S = 30.0
CHECKS_PER_S, CHECK_BURST = 10.0, 20   # rate_limit_check: each one is a database read
ANSWERED = frozenset({"in-progress", "connected"})  # the statuses that stamp a call's connected_at


def origin_allowed(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser (browsers always send Origin on a WebSocket upgrade)
    return origin_in(origin, request.app[SETTINGS].allowed_origins)


def _refuse(request: web.Request, reason: str, ip: str, error: type[web.HTTPException], text: str) -> web.HTTPException:
    """A refused upgrade: counted by reason, and logged (throttled: a client reconnecting in a
    loop makes one line every few seconds, with a count) with a hash of the address, never
    the address itself."""
    request.app[METRICS].frontend_refused.labels(reason).inc()
    origin = (request.headers.get("Origin") or "none")[:80]
    request.app[REFUSALS].warning(f"logs:{reason}", "/logs upgrade refused (%s): origin %r, client %s", reason,
                                  origin, _address_hash(request.app[TOKEN_SECRET], ip))
    return error(text=text)


def _address_hash(secret: bytes, ip: str) -> str:
    """A keyed hash of a client address: lines about one client can be told apart, and the
    address cannot be found again by hashing every possible one."""
    return hmac.new(secret, b"client address|" + ip.encode(), hashlib.sha256).hexdigest()[:10]


async def logs(request: web.Request) -> web.StreamResponse:
    app = request.app
    ip = client_ip(request)
    state = app[FRONTEND]
    if not state.handshakes.take(ip):
        raise _refuse(request, "handshake_rate", ip, web.HTTPTooManyRequests,
                      f"too many connection attempts from this address (at most {HANDSHAKES_PER_S:.0f} a second)")
    if not origin_allowed(request):
        raise _refuse(request, "origin", ip, web.HTTPForbidden, "origin not allowed: add it to ALLOWED_ORIGINS")
    if state.per_ip[ip] >= app[SETTINGS].max_connections_per_ip:
        raise _refuse(request, "per_ip_cap", ip, web.HTTPForbidden,
                      f"too many open connections from this address (at most {app[SETTINGS].max_connections_per_ip})")
    # Counted before the upgrade completes: the next upgrade from this address may be handled
    # while this one is still sending its 101.
    state.per_ip[ip] += 1
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES, compress=False)
    client = Client(app, ws, ip, request.transport)
    try:
        await ws.prepare(request)
        state.sockets[ws] = client
        app[METRICS].open_sockets.labels("frontend").inc()
        log.info("frontend client %s connected (%d from this address)", client.id, state.per_ip[ip])
        await client.run()
    finally:
        if state.sockets.pop(ws, None) is not None:
            app[METRICS].open_sockets.labels("frontend").dec()
        state.per_ip[ip] -= 1
        if state.per_ip[ip] <= 0:
            del state.per_ip[ip]
        log.info("frontend client %s disconnected", client.id)
    return ws


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


# What phone-screen's webapp sends that Callgate refuses on purpose, and what to do instead.
REFUSED_ON_PURPOSE = {
    "session.update": (
        "raw model events are not accepted from frontends: the server sets up the model session itself "
        "from the call's scenario; choose it with call.start (scenarioId, config, voice) or on the voice "
        "webhook URL (?scenarioId=&config= or ?jobTitle=&company=&jobDescription=&voice=)"),
    "scenario.configuration": (
        "a call's scenario cannot be changed from a socket that cannot prove it owns the call: choose it "
        "when the call is placed, with call.start (scenarioId, config, voice) or on the voice webhook URL "
        "(?scenarioId=&config= or ?jobTitle=&company=&jobDescription=&voice=)"),
    "job.configuration": (
        "job.configuration is not accepted: choose the scenario when the call is placed, with call.start "
        "(scenarioId job-interview, config {jobTitle, company, jobDescription}) or on the voice webhook URL "
        "(?jobTitle=&company=&jobDescription=&voice=)"),
}


def _epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def call_details(record: dict[str, Any]) -> dict[str, Any]:
    """A call record as the all-calls monitor sees it: the other party's number masked (the record
    holds no other form; None when only a status callback made the record), times
    in epoch ms, and the server's clock so a browser can tell a duration despite its own."""
    return {
        "type": "call.details", "callSid": record["call_sid"], "direction": record["direction"],
        "region": record["region"], "number": record["number_masked"], "scenarioId": record["scenario_id"],
        "createdAt": _epoch_ms(record["created_at"]), "connectedAt": _epoch_ms(record["connected_at"]),
        "endedAt": _epoch_ms(record["ended_at"]), "serverTime": int(time.time() * 1000),
    }


def _limit_fields(decision: Decision) -> dict[str, Any]:
    fields: dict[str, Any] = {"allowed": decision.allowed, "remaining": decision.remaining,
                              "limit": decision.limit, "resetTime": decision.reset_time}
    if decision.reason:
        fields["reason"] = decision.reason
        fields["message"] = decision.message
    return fields


class Client:
    """One frontend connection: reads requests, answers through its own bounded queue."""

    def __init__(self, app: web.Application, ws: web.WebSocketResponse, ip: str, transport) -> None:
        self.app = app
        self.ws = ws
        self.ip = ip
        self._transport = transport
        self.id = secrets.token_hex(4)
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(CLIENT_QUEUE)
        self.followed: dict[str, events.Subscription] = {}  # callSid (or "*") → subscription
        self.tokens: dict[str, str] = {}                     # calls this client may end
        self.placing = False  # a call.start is waiting for its answer
        # The all-calls monitor only: live calls it has been sent (or is being sent) call.details for.
        self.described: set[str] | None = None
        self.gone = False
        self._checks = float(CHECK_BURST)
        self._checks_at = time.monotonic()

    # --- the connection's life -------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop(), name=f"frontend-{self.id}:sender")
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self._handle(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self.send(_error("invalid_message", "send JSON text frames"))
        finally:
            # A call being placed is not cancelled: Twilio may already be ringing the number,
            # and its record and charge must still be written (it finishes on its own).
            self.gone = True
            for sub in self.followed.values():
                sub.close()
            self.followed.clear()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message; a client too far behind is disconnected, never waited for."""
        if self.gone:
            return
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self._drop("fell too far behind", "behind")

    async def _send_loop(self) -> None:
        while True:
            message = await self.outbox.get()
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self.ws.send_str(orjson.dumps(message).decode())
            except TimeoutError:
                self._drop("stopped reading", "stopped_reading")
                return
            except ConnectionResetError:
                return
            finally:
                self.outbox.task_done()

    async def close(self, timeout: float) -> None:
        """Send what is queued (within ``timeout``), then close with GOING_AWAY (1001): a browser
        reconnects elsewhere at once, having seen the end of the calls it followed."""
        if not self.gone:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.outbox.join()
        await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    def _drop(self, why: str, reason: str) -> None:
        if self.gone:
            return
        self.gone = True
        self.app[METRICS].frontend_dropped.labels(reason).inc()
        log.warning("frontend client %s %s: disconnected", self.id, why)
        # Abort, not close: a close frame would queue behind the data it is not reading.
        if self._transport is not None:
            self._transport.abort()

    def background(self, coro, name: str) -> asyncio.Task:
        """Work that must finish even if this client goes away (placing a call, hanging up):
        kept by the application, which shutdown waits for."""
        task = asyncio.get_running_loop().create_task(coro, name=f"frontend-{self.id}:{name}")
        pending = self.app[FRONTEND].background
        pending.add(task)
        task.add_done_callback(pending.discard)
        return task

    # --- requests ----------------------------------------------------------------------------

    async def _handle(self, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.send(_error("invalid_json", "the frame is not valid JSON"))
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.send(_error("invalid_message", "send a JSON object with a string 'type'"))
            return
        kind = message["type"]
        handler = {
            "rate_limit_check": self._rate_limit_check,
            "call.start": self._call_start,
            "call.subscribe": self._call_subscribe,
            "call.end": self._call_end,
        }.get(kind)
        if handler is None:
            if kind in REFUSED_ON_PURPOSE:
                self.send(_error("not_supported", REFUSED_ON_PURPOSE[kind]))
            else:
                self.send(_error("unknown_type", f"unknown message type {kind[:60]!r}"))
            return
        await handler(message)

    def _take_check(self) -> bool:
        """A token bucket per connection: checks cost a database read each."""
        now = time.monotonic()
        self._checks = min(CHECK_BURST, self._checks + (now - self._checks_at) * CHECKS_PER_S)
        self._checks_at = now
        if self._checks < 1:
            return False
        self._checks -= 1
        return True

    async def _rate_limit_check(self, message: dict[str, Any]) -> None:
        number = message.get("phoneNumber")
        if not isinstance(number, str):
            self.send(_error("invalid_message", "rate_limit_check needs a string phoneNumber"))
            return
        if not self._take_check():
            self.send(_error("slow_down", f"at most {CHECKS_PER_S:.0f} checks a second"))
            return
        decision = await self.app[LIMITER].test(number)
        # The number is echoed exactly as sent: existing clients match replies on it.
        self.send({"type": "rate_limit_status", "phoneNumber": number, **_limit_fields(decision)})

    async def _call_start(self, message: dict[str, Any]) -> None:
        if self.placing:
            self.send(_error("busy", "a call is already being placed from this connection"))
            return
        if self.app[LIFECYCLE].draining:
            self.send(_error("unavailable", "this server is restarting; try again in a moment"))
            return
        request = outbound.OutboundRequest(message.get("phoneNumber"), message.get("scenarioId"),
                                           message.get("config"), message.get("voice"),
                                           message.get("turnstileToken"), self.ip)
        # Placing a call waits for Twilio: do it beside the reader, so this client's other
        # requests (a rate-limit check, call.end) are still answered meanwhile.
        self.placing = True
        self.background(self._place_call(request, message.get("phoneNumber")), "call.start")

    async def _place_call(self, request: outbound.OutboundRequest, number_as_sent: object) -> None:
        try:
            outcome = await outbound.place(self.app[SERVICES], request, self._on_placed)
        except Exception:  # noqa: BLE001 - a bug must not pass silently
            log.exception("call.start failed")
            outcome = outbound.Failed("internal", "the call could not be placed")
        if isinstance(outcome, outbound.Failed):
            self.send(_error(outcome.code, outcome.message))
        elif isinstance(outcome, outbound.LimitExceeded):
            d = outcome.decision
            self.send({"type": "rate_limit_exceeded", "phoneNumber": number_as_sent, "reason": d.reason,
                       "resetTime": d.reset_time, "message": d.message})
        self.placing = False

    def _on_placed(self, placed: outbound.Placed) -> None:
        """Reply and follow before anything else is awaited, so no status Twilio reports from
        now on can slip between them. This client's copy of "queued" carries the token."""
        self.send({**events.status_changed(placed.call_sid, "queued"), "token": placed.token})
        self.placing = False  # answered: the next call.start may go
        self.tokens[placed.call_sid] = placed.token
        self.follow(placed.call_sid, with_status=False)

    async def _call_subscribe(self, message: dict[str, Any]) -> None:
        if message.get("all") is True:
            problem = check_admin_token(self.app, self.ip, message.get("adminToken"))
            if problem == "slow_down":
                self.send(_error("slow_down", "too many wrong admin tokens from this address; wait a minute"))
            elif problem is not None:
                self.send(_error("forbidden", "a valid adminToken is needed to follow every call"))
            else:
                self.described = set()
                self.follow(None)
                self.background(self._show_unfinished(), "call.subscribe all")
            return
        call_sid, token = message.get("callSid"), message.get("token")
        if not tokens.check_subscription(self.app[TOKEN_SECRET], call_sid, token):
            self.send(_error("forbidden", "callSid and its token are needed to follow a call"))
            return
        if self.app[BUS].current_status(call_sid) is None:
            # No news of it here (its stream is on another instance, or it ended long ago):
            # start from what the database knows, before any live event.
            record = await self.app[CALL_STORE].get(call_sid)
            if record is None:
                self.send(_error("unknown_call", "no such call is known (it may have ended long ago)"))
                return
            self.send(events.status_changed(call_sid, record["status"], record["end_reason"]))
        self.tokens[call_sid] = token
        self.follow(call_sid)

    def follow(self, call_sid: str | None, *, with_status: bool = True) -> None:
        """Send this client the bus's events of one call (None: of every call), starting with
        the call's current status unless ``with_status`` is False."""
        key = call_sid or "*"
        if self.gone or key in self.followed:
            return
        bus = self.app[BUS]
        self.followed[key] = bus.subscribe(call_sid, with_status=False, sink=self._deliver)
        # The current status after the subscription is stored, so a final one closes it.
        current = bus.current_status(call_sid) if call_sid is not None and with_status else None
        if current is not None:
            self._deliver(current)

    async def _show_unfinished(self) -> None:
        """The calls not over yet, so an operator who opens the page mid-call sees them all: those
        live here (known even while PostgreSQL is away), then those recorded, on every instance."""
        bus = self.app[BUS]
        for call_sid in list(self.app[LIFECYCLE].calls):
            if (current := bus.current_status(call_sid)) is not None:
                self._deliver(current)
        for record in await self.app[CALL_STORE].unfinished():
            call_sid, recorded = record["call_sid"], record["status"]
            if call_sid in self.described:
                continue  # seen already (live here, or an event came first)
            current = bus.current_status(call_sid)
            if current is not None and status.is_final(current["status"]):
                continue  # ended since (the record is behind the bus)
            self._deliver(current if current is not None and status.rank(current["status"]) >= status.rank(recorded)
                          else events.status_changed(call_sid, recorded), record)

    def _deliver(self, event: events.Event, record: dict[str, Any] | None = None) -> None:
        """Send ``event``; to the monitor, also the call's record (``record``, when in hand)."""
        self.send(event)
        if event["type"] != "call.status_changed":
            return
        final = status.is_final(event["status"])
        if self.described is not None and (final or event["status"] in ANSWERED
                                           or event["callSid"] not in self.described):
            self._describe(event["callSid"], final, record)
        if final:
            sub = self.followed.pop(event["callSid"], None)  # its last event: stop following
            if sub is not None:
                sub.close()

    def _describe(self, call_sid: str, final: bool, record: dict[str, Any] | None = None) -> None:
        """The monitor's view of a call beyond its events, from its record (shared by every
        instance): sent when a call is first seen, and again when it is answered and when it
        ends, for their times. ``record``: already read (the calls shown at subscribe)."""
        described = self.described
        if final:
            described.discard(call_sid)
        else:
            described.add(call_sid)
        if record is not None:
            self.send(call_details(record))
            return

        async def send_details() -> None:
            record = await self.app[CALL_STORE].get(call_sid)
            if record is None:
                described.discard(call_sid)  # not recorded yet (a call.start's "queued"): at its next event
                return
            self.send(call_details(record))

        self.background(send_details(), "call.details")

    async def _call_end(self, message: dict[str, Any]) -> None:
        call_sid = message.get("callSid")
        if call_sid is None and len(self.tokens) == 1:
            call_sid = next(iter(self.tokens))
        if not isinstance(call_sid, str) or call_sid not in self.tokens:
            self.send(_error("forbidden", "only a client following the call with its token can end it: send "
                             "call.subscribe {callSid, token} first (the token comes with call.start's queued reply)"))
            return
        call = self.app[LIFECYCLE].calls.get(call_sid)
        if call is not None:
            call.request_end("ended_by_client")
        else:
            self.background(self._end_elsewhere(call_sid), "call.end")

    async def _end_elsewhere(self, call_sid: str) -> None:
        """The call's stream is on another instance: that instance ends it (so the call ends
        as ended_by_client, its goodbye and records as for a local one). Not streaming
        anywhere yet (ringing): Twilio ends it over REST."""
        record = await self.app[CALL_STORE].get(call_sid)
        if record is not None and record["streamed_at"] is not None and record["ended_at"] is None:
            self.app[FANOUT].offer({"type": CONTROL_END_CALL, "callSid": call_sid, "reason": "ended_by_client"})
        else:
            await self.app[SERVICES].rest.hangup(call_sid)

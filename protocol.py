"""The frontend protocol on ``WS /logs`` and the HTTP routes, as data: the one source for
docs/protocol.md (scripts/docs_hooks.py renders it) and for the tests that hold the server
to it (tests/test_protocol.py, and every /logs frame of the test suite, tests/conftest.py).

The server does not import this module: it speaks the protocol, this describes it, and the
tests check that the two agree (the routes against the router, the codes and reasons against
the code that sends them, the schemas against real traffic). Where the code owns a list
(scenarios and their fields, voices, statuses) it is read from the code, not copied.

Schemas are JSON Schema draft 2020-12. Server → browser messages are exact: every field the
server may send, ``additionalProperties: false``, and the rules between fields (a refusal has
a ``reason``; only call.start's own ``queued`` carries a ``token``). Browser → server schemas
are what a client should send: the server ignores fields it does not read, but a schema that
allowed them would not catch a misspelt one, so they are closed too (phone-screen's extra
``timestamp`` on call.end is listed, as ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import scenarios
from calls.admission import DIRECTIONS
from calls.status import FINAL_STATUSES, STATUS_RANK

DIALECT = "https://json-schema.org/draft/2020-12/schema"

IN = "browser → server"
OUT = "server → browser"

STATUSES = tuple(STATUS_RANK)  # queued, ringing, in-progress, connected, then the final ones
ROLES = ("assistant", "user")

# Why a call ended (``reason`` of a final call.status_changed; calls.end_reason). Each is
# checked to appear in the code, and every reason the code sets to be here.
END_REASONS = {
    "caller_hangup": "the caller hung up (Twilio's stream sent stop)",
    "stream_closed": "the media stream closed without a stop",
    "agent_ended": "the agent called end_call and said goodbye",
    "ended_by_client": "a frontend sent call.end",
    "time_limit": "the call reached RATE_LIMIT_SESSION_DURATION",
    "model_unavailable": "the model session could not be opened",
    "model_failed": "the model failed mid-call (the caller heard an apology)",
    "content_filter": "too many of the agent's replies were stopped by the content filter",
    "shutdown": "this instance shut down (SIGTERM) before the call ended",
    "instance_lost": "the instance streaming the call stopped sending its heartbeat",
    "ended": "the call ended with no more specific reason",
}

# A number's refusal (rate_limit_status, rate_limit_exceeded ``reason``): the log's...
LIMIT_REASONS = {
    "limit_reached": "the number has had RATE_LIMIT_PHONE_MAX_CALLS calls in the window",
    "cooldown": "the number's last call was less than RATE_LIMIT_PHONE_COOLDOWN_MS ago",
    "limiter_unavailable": "PostgreSQL is away and LIMITER_FAIL_MODE is closed",
}
# ...and the number itself (rate_limit_status only: call.start answers these with invalid_number).
NUMBER_REASONS = {
    "missing": "no number was given",
    "unparseable": "the text is not a phone number",
    "invalid": "not a valid number",
    "not_callable": "an emergency, short-code, premium-rate or similar number, or one with an extension",
    "region_not_allowed": "the number's country is not in ALLOWED_REGIONS",
}

# ``error.code``, each with what it answers. Checked against every _error(...) and Failed(...)
# in handlers/frontend.py and calls/outbound.py.
ERROR_CODES = {
    "invalid_json": "the frame is not JSON",
    "invalid_message": "not a JSON object with a string type, a binary frame, or a required field missing or of "
                       "the wrong type",
    "unknown_type": "a type the server does not know",
    "not_supported": "one of phone-screen's messages that Callgate refuses on purpose (the message says what to "
                     "send instead)",
    "slow_down": "more than 10 rate_limit_checks a second on this socket, or too many wrong adminTokens from this "
                 "address",
    "forbidden": "call.subscribe without a valid token (or adminToken), or call.end for a call this socket "
                 "holds no token for",
    "unknown_call": "call.subscribe for a call the server has no record of",
    "busy": "call.start while this socket's previous call.start is still being placed",
    "unavailable": "the server is draining, or cannot store the call right now",
    "invalid_number": "call.start's phoneNumber cannot be called",
    "invalid_config": "call.start's scenarioId, config or voice is not valid for the scenario",
    "turnstile_failed": "TURNSTILE_SECRET_KEY is set and the turnstileToken did not verify",
    "telephony_unavailable": "no Twilio credentials or no caller id for the number's region",
    "too_many_calls": "the client address placed too many calls in the last hour",
    "at_capacity": "RATE_LIMIT_MAX_CONCURRENT_CALLS calls are live already",
    "call_refused": "Twilio refused to place the call (nothing is charged)",
    "call_outcome_unknown": "Twilio did not answer in time: the call may still ring (it stays charged)",
    "internal": "a bug: the call could not be placed",
}

# phone-screen's messages that the server answers with error not_supported (the same set as
# handlers/frontend.py REFUSED_ON_PURPOSE; a test holds them equal).
REFUSED = {
    "session.update": "a raw Realtime event: the server sets up the model session itself",
    "scenario.configuration": "a scenario change from a socket that cannot prove it owns the call",
    "job.configuration": "phone-screen's older form of scenario.configuration",
}


def _string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


CALL_SID = _string(pattern="^[A-Za-z0-9_-]+$", description="Twilio's CallSid (letters, digits, _ and -)")


def _object(type_: str, properties: dict[str, Any], required: tuple[str, ...] = (), **rules: Any) -> dict[str, Any]:
    """A closed object whose ``type`` is ``type_``."""
    return {
        "type": "object",
        "properties": {"type": {"const": type_}, **properties},
        "required": ["type", *required],
        "additionalProperties": False,
        **rules,
    }


def _field(field: scenarios.Field) -> dict[str, Any]:
    schema = _string(maxLength=field.max_length, description=field.label)
    if field.options:
        schema["enum"] = [value for value, _ in field.options]
    if field.required:
        schema["pattern"] = r"\S"  # blank counts as missing
    return schema


def _config_rules() -> list[dict[str, Any]]:
    """Each scenario's ``config``: its fields only (no scenarioId means the default scenario)."""
    rules = []
    for scenario in scenarios.SCENARIOS.values():
        config = {"type": "object", "properties": {f.key: _field(f) for f in scenario.fields},
                  "required": [f.key for f in scenario.fields if f.required], "additionalProperties": False}
        chosen: dict[str, Any] = {"properties": {"scenarioId": {"const": scenario.id}}, "required": ["scenarioId"]}
        if scenario.id == scenarios.DEFAULT_SCENARIO:
            chosen = {"anyOf": [chosen, {"not": {"required": ["scenarioId"]}}]}
        then: dict[str, Any] = {"properties": {"config": config}}
        if config["required"]:
            then["required"] = ["config"]
        rules.append({"if": chosen, "then": then})
    return rules


@dataclass(frozen=True)
class Message:
    type: str
    direction: str  # IN or OUT
    summary: str
    schema: dict[str, Any]
    answer: str = ""  # browser → server: what comes back
    compat: bool = False  # phone-screen's webapp sends or reads it as it is

    @property
    def anchor(self) -> str:
        """The heading's id on docs/protocol.md (MkDocs' toc drops the dots)."""
        return self.type.replace(".", "")


MESSAGES: tuple[Message, ...] = (
    # --- browser → server ----------------------------------------------------------------------
    Message("rate_limit_check", IN, "Ask whether a number may be called now. Nothing is charged.",
            _object("rate_limit_check", {"phoneNumber": _string(description="any common format")},
                    ("phoneNumber",)),
            answer="`rate_limit_status` at once, the number echoed exactly as sent; `error` `invalid_message` "
                   "(no string phoneNumber) or `slow_down` (more than 10 a second, burst 20)",
            compat=True),
    Message("call.start", IN, "Place a call: the number is checked, charged and called over Twilio's REST API.",
            _object("call.start", {
                "phoneNumber": _string(description="any common format"),
                "scenarioId": {"enum": list(scenarios.SCENARIOS),
                               "description": f"default {scenarios.DEFAULT_SCENARIO}"},
                "config": {"type": "object", "description": "the scenario's fields (GET /scenarios)"},
                "voice": {"enum": list(scenarios.VOICES), "description": "default: the scenario's first voice"},
                "turnstileToken": _string(description="needed when TURNSTILE_SECRET_KEY is set"),
            }, ("phoneNumber",), allOf=_config_rules()),
            answer="`call.status_changed` `queued` with the call's `callSid` and `token` (then that call's events "
                   "follow on this socket); or `rate_limit_exceeded`; or `error`"),
    Message("call.subscribe", IN, "Follow one call (its token came with call.start's queued reply), or, "
                                  "for an operator, every call.",
            {"oneOf": [
                _object("call.subscribe", {"callSid": _string(),
                                           "token": _string(description="from call.start's queued reply")},
                        ("callSid", "token")),
                _object("call.subscribe", {"all": {"const": True}, "adminToken": _string(description="ADMIN_TOKEN")},
                        ("all", "adminToken")),
            ]},
            answer="the call's current status (`call.status_changed`), then its events as they happen; with "
                   "`all`, every call's events from now on (no current statuses). `error` `forbidden`, "
                   "`unknown_call` or `slow_down`"),
    Message("call.end", IN, "Hang up a call this socket holds the token for (callSid may be left out when it "
                            "holds exactly one).",
            _object("call.end", {"callSid": _string(description="optional when the socket holds one call's token"),
                                 "timestamp": _string(description="phone-screen's webapp sends it; ignored")}),
            answer="nothing at once: the call ends, and its `call.status_changed` `ended` "
                   "(`reason` `ended_by_client`) follows; `error` `forbidden` without the token",
            compat=True),
    # --- server → browser ----------------------------------------------------------------------
    Message("rate_limit_status", OUT, "The answer to rate_limit_check.",
            _object("rate_limit_status", {
                "phoneNumber": _string(description="exactly as the client sent it"),
                "allowed": {"type": "boolean"},
                "remaining": {"type": "integer", "minimum": 0},
                "limit": {"type": "integer", "minimum": 1},
                "resetTime": {"type": "integer", "description": "epoch ms: the next free slot, or when a refused "
                                                                "number may call again"},
                "reason": {"enum": [*LIMIT_REASONS, *NUMBER_REASONS],
                           "description": "present exactly when allowed is false"},
                "message": _string(description="for people; with reason"),
            }, ("phoneNumber", "allowed", "remaining", "limit", "resetTime"),
                **{"if": {"properties": {"allowed": {"const": True}}},
                   "then": {"not": {"anyOf": [{"required": ["reason"]}, {"required": ["message"]}]}},
                   "else": {"required": ["reason", "message"]}}),
            compat=True),
    Message("rate_limit_exceeded", OUT, "call.start refused: the number may not be called now "
                                        "(nothing was charged).",
            _object("rate_limit_exceeded", {
                "phoneNumber": _string(description="exactly as the client sent it"),
                "reason": {"enum": list(LIMIT_REASONS)},
                "resetTime": {"type": "integer", "description": "epoch ms"},
                "message": _string(description="for people"),
            }, ("phoneNumber", "reason", "resetTime", "message")),
            compat=True),
    Message("call.status_changed", OUT, "A call's status moved forward (statuses never go back); a final "
                                        "status is the last event of that call.",
            _object("call.status_changed", {
                "callSid": CALL_SID,
                "status": {"enum": list(STATUSES)},
                "reason": {"enum": list(END_REASONS), "description": "only with a final status: why the call ended"},
                "token": _string(description="only on call.start's own queued reply: lets this client follow "
                                             "(call.subscribe) and end (call.end) the call"),
            }, ("callSid", "status"),
                allOf=[
                    {"if": {"required": ["reason"]}, "then": {"properties": {"status": {"enum": list(FINAL_STATUSES)}}}},
                    {"if": {"required": ["token"]}, "then": {"properties": {"status": {"const": "queued"}}}},
                ]),
            compat=True),
    Message("call.details", OUT, "For the all-calls monitor (call.subscribe with all) only: a call's record, sent "
                                 "when the monitor first sees the call and again at its end. Its number is masked, never whole.",
            _object("call.details", {
                "callSid": CALL_SID,
                # "unknown": a call.start call whose status callback came before its record.
                "direction": {"enum": [*sorted(DIRECTIONS), "unknown"], "description": "Twilio's word for it"},
                "region": _string(description="the number's region (US, AU, IN, ...); empty when unknown"),
                # As limiter/phone.py's mask() writes it: a whole number must never fit here.
                "number": {"type": ["string", "null"], "pattern": "^\\+[0-9]{1,4}•••([0-9]{4})?$",
                           "description": "the other party's number masked (the caller's, or the number "
                                          "called): +1415•••0100; null when only a status callback made the record"},
                "scenarioId": {"type": ["string", "null"]},
                "createdAt": {"type": "integer", "description": "epoch ms"},
                "connectedAt": {"type": ["integer", "null"], "description": "epoch ms; null until connected"},
                "endedAt": {"type": ["integer", "null"], "description": "epoch ms; null until it ended"},
                "serverTime": {"type": "integer", "description": "the server's clock (epoch ms), so a browser "
                                                                "can tell a duration despite its own"},
            }, ("callSid", "direction", "region", "number", "scenarioId", "createdAt", "connectedAt", "endedAt",
                "serverTime"))),
    Message("transcript.delta", OUT, "A piece of a turn's text as it is spoken (assistant) or transcribed (user).",
            _object("transcript.delta", {"callSid": CALL_SID, "itemId": _string(), "role": {"enum": list(ROLES)},
                                         "delta": _string()},
                    ("callSid", "itemId", "role", "delta"))),
    Message("transcript.done", OUT, "A turn's whole text. `failed`: the caller's words could not be "
                                    "transcribed (the text is empty; the turn still happened).",
            _object("transcript.done", {"callSid": CALL_SID, "itemId": _string(), "role": {"enum": list(ROLES)},
                                        "text": _string(),
                                        "failed": {"const": True, "description": "the caller's words could not be "
                                                   "transcribed: role user, text empty"}},
                    ("callSid", "itemId", "role", "text"),
                    **{"if": {"required": ["failed"]},
                       "then": {"properties": {"role": {"const": "user"}, "text": {"const": ""}}}})),
    Message("function_call", OUT, "The agent called a tool (GET /tools), with what it returned.",
            _object("function_call", {"callSid": CALL_SID, "name": _string(description="end_call, "
                                                                                     "get_current_time, ..."),
                                      "arguments": _string(description="JSON text, as the model sent it"),
                                      "output": _string(description="JSON text, as the model was given it")},
                    ("callSid", "name", "arguments", "output"))),
    Message("error", OUT, "A request could not be answered. The socket stays open.",
            _object("error", {"code": {"enum": list(ERROR_CODES)}, "message": _string(minLength=1)},
                    ("code", "message"))),
)

BY_TYPE = {m.type: m for m in MESSAGES}
INBOUND = {m.type: m for m in MESSAGES if m.direction == IN}
OUTBOUND = {m.type: m for m in MESSAGES if m.direction == OUT}


def schema(message: Message) -> dict[str, Any]:
    """The message's whole schema document."""
    return {"$schema": DIALECT, "title": message.type, "description": message.summary, **message.schema}


def envelope(direction: str) -> dict[str, Any]:
    """One schema for every message in one direction, chosen by ``type``."""
    messages = [m for m in MESSAGES if m.direction == direction]
    return {"$schema": DIALECT, "title": f"/logs, {direction}",
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": [m.type for m in messages]}},
            "allOf": [{"if": {"properties": {"type": {"const": m.type}}}, "then": m.schema} for m in messages]}


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str  # as the router has it: "*" is any method; every GET also answers HEAD
    path: str
    auth: str
    returns: str


ROUTES: tuple[Route, ...] = (
    Route("GET", "/", "none", "the web page (HTML)"),
    Route("GET", "/static/{filename}", "none", "the page's files (static/)"),
    Route("GET", "/logs", "`Origin` in `ALLOWED_ORIGINS` (or none); per-call tokens in the messages",
          "WebSocket upgrade: the frontend protocol below; 403 for another origin or past "
          "`RATE_LIMIT_MAX_CONNECTIONS_PER_IP`, 429 for too many upgrades a second from one address"),
    Route("GET", "/scenarios", "none (CORS for `ALLOWED_ORIGINS`)",
          "JSON array of scenario schemas, the default first (phone-screen's shape)"),
    Route("GET", "/tools", "none (CORS for `ALLOWED_ORIGINS`)", "JSON array of the agent's function tools"),
    Route("GET", "/public-url", "none (CORS for `ALLOWED_ORIGINS`)", '`{"publicUrl": ...}`'),
    Route("GET", "/healthz", "none (CORS for `ALLOWED_ORIGINS`)",
          '`{"status":"ok"|"degraded","database":"ok"|"unavailable","activeCalls":n,"version":...}`; '
          '503 `{"status":"draining"}` while shutting down'),
    Route("GET", "/health", "none (CORS for `ALLOWED_ORIGINS`)",
          "the same facts in phone-screen's shape (`healthy`, `uptime`, `activeSessions`, `rateLimiting`); "
          "503 while draining"),
    Route("GET", "/metrics", "none: keep it off the public internet or scrape it privately",
          "Prometheus text exposition"),
    Route("*", "/twiml", "`X-Twilio-Signature` (when `TWILIO_AUTH_TOKEN` or `TWILIO_WEBHOOK_SHARED_KEY` is set)",
          "Twilio's voice webhook (POST or GET): TwiML that connects the call's media stream, or says why not "
          "and hangs up; 400 for a malformed CallSid, 403 for a bad signature"),
    Route("POST", "/twilio/status", "`X-Twilio-Signature` (likewise)",
          "Twilio's status callback: 204; refunds a call that never connected"),
    Route("GET", "/call", "`X-Twilio-Signature` on the upgrade (likewise), then the stream's signed parameters",
          "WebSocket upgrade: Twilio's Media Stream for one call"),
    Route("GET", "/admin", "none for the page; it asks for `ADMIN_TOKEN` and sends it itself",
          "the operator's page (HTML)"),
    Route("GET", "/admin/stats", "`Authorization: Bearer <ADMIN_TOKEN>`",
          "JSON limiter analytics; 403 while `ADMIN_TOKEN` is unset, 401 for a wrong token, 429 after too many "
          "wrong ones, 503 while PostgreSQL is away"),
)


def document() -> dict[str, Any]:
    """Everything above as one JSON document: for a frontend's own tests."""
    return {
        "routes": [{"method": r.method, "path": r.path, "auth": r.auth, "returns": r.returns} for r in ROUTES],
        "messages": {direction: {m.type: schema(m) for m in MESSAGES if m.direction == direction}
                     for direction in (IN, OUT)},
        "errorCodes": ERROR_CODES,
        "endReasons": END_REASONS,
        "limitReasons": {**LIMIT_REASONS, **NUMBER_REASONS},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(document(), indent=2, ensure_ascii=False))

"""protocol.py against the code and against real traffic: the schemas are valid JSON Schema,
strict enough to catch a wrong field, the routes are the router's, the codes and reasons are
the ones the code sends, and a whole call over /logs matches message by message. (Every
/logs frame of the rest of the suite is checked too: tests/logs_traffic.py.)"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import aiohttp
import jsonschema
import pytest
from aiohttp import web

import protocol
from handlers import frontend
from helpers import PUBLIC_URL, ROOT, callgate, settings_for, sign
from logs_traffic import problem_with
from server import create_app
from tools.fake_realtime import FakeRealtime

NUMBER = "+14155550123"
ADMIN = "operator-secret-0123456789"
ORIGIN = "https://callgate.test"
ENV = {"TWILIO_PHONE_NUMBER_US": "+14155550000", "ALLOWED_ORIGINS": ORIGIN, "ADMIN_TOKEN": ADMIN}


# --- the schemas themselves -------------------------------------------------------------------


@pytest.mark.parametrize("message", protocol.MESSAGES, ids=lambda m: m.type)
def test_each_schema_is_valid_draft_2020_12(message):
    jsonschema.Draft202012Validator.check_schema(protocol.schema(message))


def test_the_envelopes_choose_the_schema_by_type():
    """One schema per direction: a message is checked against its own type's schema."""
    for direction in (protocol.IN, protocol.OUT):
        jsonschema.Draft202012Validator.check_schema(protocol.envelope(direction))
    inbound = jsonschema.Draft202012Validator(protocol.envelope(protocol.IN))
    assert inbound.is_valid({"type": "rate_limit_check", "phoneNumber": NUMBER})
    assert not inbound.is_valid({"type": "rate_limit_check", "number": NUMBER})
    assert not inbound.is_valid({"type": "rate_limit_status", "phoneNumber": NUMBER})  # the other direction


SID = "CA" + "0" * 32
WRONG = [  # (a message the server must never send, why)
    ({"type": "rate_limit_status", "phone_number": NUMBER, "allowed": True, "remaining": 1, "limit": 2,
      "resetTime": 1}, "a misspelt field"),
    ({"type": "rate_limit_status", "phoneNumber": NUMBER, "allowed": False, "remaining": 0, "limit": 2,
      "resetTime": 1}, "a refusal without its reason"),
    ({"type": "rate_limit_status", "phoneNumber": NUMBER, "allowed": True, "remaining": 1, "limit": 2,
      "resetTime": 1, "reason": "cooldown", "message": "x"}, "an allowed number with a reason"),
    ({"type": "call.status_changed", "callSid": SID, "status": "ringing", "token": "t"}, "a token past queued"),
    ({"type": "call.status_changed", "callSid": SID, "status": "connected", "reason": "shutdown"},
     "a reason on a live call"),
    ({"type": "call.status_changed", "callSid": SID, "status": "completed"}, "Twilio's word, not ours"),
    ({"type": "call.status_changed", "callSid": SID, "status": "ended", "reason": "bored"}, "an unknown reason"),
    ({"type": "transcript.done", "callSid": SID, "itemId": "i", "role": "assistant", "text": "", "failed": True},
     "a failed transcription of the agent"),
    ({"type": "transcript.delta", "callSid": SID, "itemId": "i", "role": "system", "delta": "x"}, "a third role"),
    ({"type": "error", "code": "oops", "message": "x"}, "an unknown error code"),
    ({"type": "error", "code": "forbidden"}, "an error without its message"),
    ({"type": "response.output_audio.delta", "delta": "AAAA"}, "a raw model event"),
]


@pytest.mark.parametrize(("message", "why"), WRONG, ids=[why for _, why in WRONG])
def test_the_schemas_refuse_what_the_server_must_not_send(message, why):
    assert problem_with(message, protocol.OUT) is not None, why


def test_call_start_config_is_checked_per_scenario():
    """Each scenario's config has its own fields (GET /scenarios); no scenarioId means the
    default scenario's."""
    start = {"type": "call.start", "phoneNumber": NUMBER}
    assert problem_with({**start, "scenarioId": "customer-service", "config": {"companyName": "Acme"}}, protocol.IN) \
        is None
    assert problem_with({**start, "config": {"jobTitle": "Chef", "company": "Bistro"}}, protocol.IN) is None
    assert problem_with({**start, "scenarioId": "customer-service", "config": {"jobTitle": "Chef"}}, protocol.IN)
    assert problem_with({**start, "config": {"jobTitle": "Chef"}}, protocol.IN)  # company is required
    assert problem_with({**start, "scenarioId": "customer-service",
                         "config": {"companyName": "Acme", "serviceType": "plumbing"}}, protocol.IN)


# --- against the code ---------------------------------------------------------------------------


def router_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route; HEAD is left out (aiohttp adds one to every GET)."""
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical
        if isinstance(route.resource, web.StaticResource):
            path += "/{filename}"
        routes.add((route.method, path))
    return routes


def test_the_documented_routes_are_the_apps_routes():
    """A route added to server.create_app without a line in protocol.ROUTES (or the other way
    round) fails here."""
    app = create_app(settings_for("postgresql://127.0.0.1:1/unused"))
    assert {(r.method, r.path) for r in protocol.ROUTES} == router_routes(app)


def _calls(paths: list[Path], names: set[str]) -> list[ast.Call]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if name in names:
                    found.append(node)
    return found


def _constant(call: ast.Call, index: int) -> str | None:
    if len(call.args) > index and isinstance(call.args[index], ast.Constant) and isinstance(call.args[index].value, str):
        return call.args[index].value
    return None


def _literals(paths: list[Path]) -> set[str]:
    return {node.value for path in paths for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


CODE = sorted(p for folder in ("bridge", "calls", "handlers", "limiter") for p in (ROOT / folder).glob("*.py")) \
    + [ROOT / "server.py"]


def test_the_error_codes_are_the_ones_the_server_sends():
    calls = _calls([ROOT / "handlers" / "frontend.py", ROOT / "calls" / "outbound.py"], {"_error", "Failed"})
    sent = {code for call in calls if (code := _constant(call, 0)) is not None}
    assert sent == set(protocol.ERROR_CODES)


def test_the_end_reasons_are_the_ones_the_code_sets():
    """Every reason the code can end a call with is documented, and every documented one
    appears in the code (or in the SQL that reaps a lost instance's calls)."""
    setters = _calls(CODE, {"request_end", "_set_reason", "_give_up", "request_end_after_goodbye"})
    set_here = {reason for call in setters if (reason := _constant(call, 0)) is not None}
    ended = {reason for call in _calls(CODE, {"status_changed"}) if (reason := _constant(call, 2)) is not None}
    assert set_here | ended <= set(protocol.END_REASONS)
    sql = "".join(p.read_text() for p in (ROOT / "sql").glob("*.sql"))
    assert [r for r in protocol.END_REASONS if r not in _literals(CODE) and f"'{r}'" not in sql] == []


def test_the_limit_reasons_are_the_limiters():
    limiter = sorted((ROOT / "limiter").glob("*.py"))
    numbers = {c for call in _calls(limiter, {"InvalidNumber"}) if (c := _constant(call, 0)) is not None}
    refusals = {c for call in _calls(limiter, {"refused"}) if (c := _constant(call, 2)) is not None}
    refusals |= {c for call in _calls(limiter, {"Decision"}) if (c := _constant(call, 4)) is not None}
    assert numbers == set(protocol.NUMBER_REASONS)
    assert refusals == set(protocol.LIMIT_REASONS)


def test_the_refused_types_are_the_servers():
    assert set(protocol.REFUSED) == set(frontend.REFUSED_ON_PURPOSE)


# --- against real traffic -----------------------------------------------------------------------


class Socket:
    """A /logs client that checks every message it sends and receives against protocol.py."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.sent: list[dict] = []
        self.received: list[dict] = []

    async def send(self, message: dict) -> None:
        assert problem_with(message, protocol.IN) is None, message
        self.sent.append(message)
        await self.ws.send_str(json.dumps(message))

    async def recv(self, timeout: float = 10) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        message = json.loads(msg.data)
        assert problem_with(message, protocol.OUT) is None, (problem_with(message, protocol.OUT), message)
        self.received.append(message)
        return message

    async def until(self, predicate, timeout: float = 15) -> dict:
        while not predicate(message := await self.recv(timeout)):
            pass
        return message


async def twilio_says(h, http: aiohttp.ClientSession, call_sid: str, status: str, query: str) -> None:
    """A signed status callback, as Twilio sends one."""
    form = {"CallSid": call_sid, "CallStatus": status, "AccountSid": h.twilio_api.account_sid}
    signature = sign(f"{PUBLIC_URL}/twilio/status?{query}", form)
    async with http.post(f"{h.url}/twilio/status?{query}", data=form,
                         headers={"X-Twilio-Signature": signature}) as response:
        assert response.status == 204


def of(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m["type"] == kind]


async def test_a_whole_call_over_logs_matches_the_schemas(dsn):
    """A browser checks a number, places a call, follows it from queued through ringing,
    answered and connected, its transcripts and a function call, to the end it asks for; an
    operator watches every call. Each message both ways matches its schema."""
    calls = [("get_current_time", '{"timezone": "UTC"}')]
    async with FakeRealtime(reply_text="Hello there.", function_calls=calls) as model, \
            callgate(dsn, model=model, **ENV) as h, aiohttp.ClientSession() as http:
        browser = Socket(await http.ws_connect(h.url + "/logs", headers={"Origin": ORIGIN}))
        monitor = Socket(await http.ws_connect(h.url + "/logs", headers={"Origin": ORIGIN}))
        await monitor.send({"type": "call.subscribe", "all": True, "adminToken": ADMIN})

        await browser.send({"type": "rate_limit_check", "phoneNumber": NUMBER})
        status = await browser.recv()
        await browser.send({"type": "call.start", "phoneNumber": NUMBER, "scenarioId": "customer-service",
                            "config": {"companyName": "Acme", "serviceType": "billing"}, "voice": "marin"})
        queued = await browser.recv()
        call_sid = queued["callSid"]
        charge = h.twilio_api.calls[call_sid].url.split("?", 1)[1]
        for twilio_status in ("ringing", "in-progress"):
            await twilio_says(h, http, call_sid, twilio_status, charge)
        caller = h.call(call_sid=call_sid, direction="outbound-api", to=NUMBER, extra_params={})
        await caller.webhook(path="/twiml?" + charge)
        await caller.connect()
        await browser.until(lambda m: m["type"] == "function_call")
        await caller.play()  # the caller speaks: the model hears, and transcribes, them
        await browser.until(lambda m: m["type"] == "transcript.done" and m["role"] == "user")
        await browser.send({"type": "call.end", "callSid": call_sid})
        ended = await browser.until(lambda m: m["type"] == "call.status_changed" and m["status"] == "ended")
        await caller.wait_closed()
        await twilio_says(h, http, call_sid, "completed", charge)  # after our own end: changes nothing
        await monitor.until(lambda m: m["type"] == "call.details" and m["endedAt"] is not None)
        await browser.ws.close()
        await monitor.ws.close()

    assert (status["type"], status["allowed"], status["remaining"]) == ("rate_limit_status", True, 2)
    assert (queued["type"], queued["status"]) == ("call.status_changed", "queued") and queued["token"]
    statuses = [m["status"] for m in of(browser.received, "call.status_changed")]
    assert statuses == ["queued", "ringing", "in-progress", "connected", "ended"]
    assert ended["reason"] == "ended_by_client"
    assert {m["role"] for m in of(browser.received, "transcript.delta")} == {"assistant", "user"}
    assert of(browser.received, "function_call")[0]["name"] == "get_current_time"
    assert {m["callSid"] for m in browser.received[1:]} == {call_sid}  # after the rate_limit_status
    details = of(monitor.received, "call.details")
    assert details[0]["direction"] == "outbound-api" and details[-1]["scenarioId"] == "customer-service"
    assert "queued" not in [m["status"] for m in of(browser.received, "call.status_changed")][1:]


MALFORMED = [
    (b"\x00\x01", "invalid_message"),
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"phoneNumber": "+14155550123"}', "invalid_message"),
    ('{"type": "make_coffee"}', "unknown_type"),
    ('{"type": "rate_limit_check", "phoneNumber": 4155550123}', "invalid_message"),
    ('{"type": "call.subscribe", "callSid": "CA1"}', "forbidden"),
    ('{"type": "call.subscribe", "all": true}', "forbidden"),
    ('{"type": "session.update", "session": {"voice": "ash"}}', "not_supported"),
    ('{"type": "call.start", "phoneNumber": "+14155550123", "scenarioId": "poker"}', "invalid_config"),
]


def frame_problem(frame: str) -> str | None:
    try:
        return problem_with(json.loads(frame), protocol.IN)
    except json.JSONDecodeError:
        return "not JSON"


async def test_malformed_frames_are_answered_with_errors_that_match_the_schema(dsn):
    """Each frame here breaks its schema on purpose; the server's answer to each is an error
    that matches the error schema, and the socket stays open."""
    async with callgate(dsn, **ENV) as h, aiohttp.ClientSession() as http:
        socket = Socket(await http.ws_connect(h.url + "/logs", headers={"Origin": ORIGIN}))
        answers = []
        for frame, _ in MALFORMED:
            if isinstance(frame, bytes):
                await socket.ws.send_bytes(frame)
            else:
                assert frame_problem(frame) is not None, frame
                await socket.ws.send_str(frame)
            answers.append(await socket.recv())
        open_after = not socket.ws.closed
        await socket.ws.close()
    assert [(a["type"], a["code"]) for a in answers] == [("error", code) for _, code in MALFORMED]
    assert open_after


async def test_the_suite_wide_check_catches_a_wrong_message(dsn, monkeypatch, logs_traffic_checked):
    """The check every test runs under: a server that adds a field protocol.py does not know
    to rate_limit_status is caught (and the problem named)."""
    limit_fields = frontend._limit_fields
    monkeypatch.setattr(frontend, "_limit_fields", lambda decision: {**limit_fields(decision), "callsLeft": 1})
    async with callgate(dsn, **ENV) as h, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(h.url + "/logs", headers={"Origin": ORIGIN})
        await ws.send_json({"type": "rate_limit_check", "phoneNumber": NUMBER})
        reply = await ws.receive_json(timeout=5)
        await ws.close()
    caught, logs_traffic_checked.problems[:] = list(logs_traffic_checked.problems), []  # expected here
    assert reply["callsLeft"] == 1
    assert len(caught) == 1 and "callsLeft" in caught[0] and "rate_limit_status" in caught[0]

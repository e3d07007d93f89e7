"""WS /logs on a real server: refusals at the door, every message type and error path, outbound
calls against the fake Twilio API, per-call privacy, and a frozen client dropped."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appkeys import CALL_STORE, FRONTEND, LIMITER, METRICS, TOKEN_SECRET
from bridge import events, tokens
from helpers import PUBLIC_URL, callgate, sign, wait_until
from tools.fake_realtime import FakeRealtime
from tools.simulate_call import SimulatedCall

CALLER_ID = "+14155550000"
TWILIO_ENV = {"TWILIO_PHONE_NUMBER_US": CALLER_ID, "ALLOWED_ORIGINS": "https://callgate.test"}


class Frontend:
    """A /logs client that reads in its own time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, message) -> None:
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, timeout: float = 5) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    async def ask(self, message) -> dict:
        await self.send(message)
        return await self.recv()

    async def until(self, predicate, timeout: float = 10) -> list[dict]:
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                seen.append(await self.recv(timeout))
                if predicate(seen[-1]):
                    return seen


async def open_frontend(session: aiohttp.ClientSession, h, **headers) -> Frontend:
    headers.setdefault("Origin", "https://callgate.test")
    return Frontend(await session.ws_connect(h.url + "/logs", headers=headers))


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def test_origins_outside_the_list_are_refused(dsn, session):
    """An Origin outside ALLOWED_ORIGINS gets 403; ours and a non-browser (no Origin) get in."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(h.url + "/logs", headers={"Origin": "https://evil.test"})
        assert info.value.status == 403
        ours = await open_frontend(session, h)
        assert (await ours.ask({"type": "rate_limit_check", "phoneNumber": "+14155550100"}))["allowed"]
        plain = await session.ws_connect(h.url + "/logs")
        assert not plain.closed
        await plain.close()


async def test_connections_per_ip_are_capped_by_fly_client_ip(dsn, session):
    """Behind Fly's proxy (TRUST_FLY_CLIENT_IP), past RATE_LIMIT_MAX_CONNECTIONS_PER_IP sockets
    from one Fly-Client-IP the upgrade is 403, whatever X-Forwarded-For says; a closed socket
    frees its place."""
    async with callgate(dsn, RATE_LIMIT_MAX_CONNECTIONS_PER_IP="2", TRUST_FLY_CLIENT_IP="yes", **TWILIO_ENV) as h:
        ip = {"Fly-Client-IP": "203.0.113.7"}
        first = await open_frontend(session, h, **ip)
        second = await open_frontend(session, h, **ip)  # noqa: F841 - held open on purpose
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await open_frontend(session, h, **ip, **{"X-Forwarded-For": "198.51.100.1"})
        assert info.value.status == 403
        other = await open_frontend(session, h, **{"Fly-Client-IP": "203.0.113.8"})
        assert (await other.ask({"type": "rate_limit_check", "phoneNumber": "+14155550100"}))["allowed"]
        await first.ws.close()
        await wait_until(lambda: h.app[FRONTEND].per_ip["203.0.113.7"] <= 1, what="the closed socket to be counted out")
        await open_frontend(session, h, **ip)


async def test_off_fly_a_made_up_fly_client_ip_does_not_get_past_the_cap(dsn, session):
    """Not behind Fly (no FLY_APP_NAME, TRUST_FLY_CLIENT_IP auto), Fly-Client-IP is anyone's to
    write: the cap counts the peer's address, so twenty made-up values get two sockets."""
    async with callgate(dsn, RATE_LIMIT_MAX_CONNECTIONS_PER_IP="2", **TWILIO_ENV) as h:
        statuses, held = [], []
        for k in range(20):
            try:
                held.append(await open_frontend(session, h, **{"Fly-Client-IP": f"198.51.100.{k}"}))
                statuses.append(101)
            except aiohttp.WSServerHandshakeError as exc:
                statuses.append(exc.status)
    assert statuses == [101, 101] + [403] * 18


async def test_upgrades_are_limited_per_address_and_second(dsn, session):
    """A flood of upgrades from one address (each closed at once, so the socket cap never
    bites) is refused with 429 past the burst."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        statuses = []
        for _ in range(40):
            try:
                client = await open_frontend(session, h)
                await client.ws.close()
                statuses.append(101)
            except aiohttp.WSServerHandshakeError as exc:
                statuses.append(exc.status)
    assert statuses[:20] == [101] * 20 and 429 in statuses and set(statuses) == {101, 429}


async def test_wrong_admin_tokens_are_throttled_per_address(dsn, session):
    """After a few wrong admin tokens from one address, the next attempts get 429 (the all-calls
    monitor: slow_down) without being compared, even a right one, for a while."""
    async with callgate(dsn, ADMIN_TOKEN="a" * 24, **TWILIO_ENV) as h:
        codes = []
        for token in ["guess"] * 6 + ["a" * 24]:
            async with session.get(h.url + "/admin/stats", headers={"Authorization": f"Bearer {token}"}) as resp:
                codes.append(resp.status)
        client = await open_frontend(session, h)
        monitor = await client.ask({"type": "call.subscribe", "all": True, "adminToken": "a" * 24})
    assert codes == [401] * 5 + [429, 429]
    assert monitor["code"] == "slow_down"


async def test_a_frame_over_64_kib_closes_with_1009(dsn, session):
    """A 70 KiB frame closes the socket with 1009 (message too big)."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        await client.send(json.dumps({"type": "rate_limit_check", "phoneNumber": "x" * 70 * 1024}))
        msg = await client.ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"type": 5}', "invalid_message"),
    ('{"phoneNumber": "+14155550100"}', "invalid_message"),
    ('{"type": "make_coffee"}', "unknown_type"),
    ('{"type": "rate_limit_check", "phoneNumber": 4155550100}', "invalid_message"),
    ('{"type": "call.subscribe", "callSid": "CA1", "token": "nope"}', "forbidden"),
    ('{"type": "call.end", "callSid": "CA1"}', "forbidden"),
    ('{"type": "call.start", "phoneNumber": "911", "scenarioId": "customer-service"}', "invalid_number"),
    ('{"type": "call.start", "phoneNumber": "+14155550100", "scenarioId": "poker"}', "invalid_config"),
    ('{"type": "call.start", "phoneNumber": "+14155550100", "scenarioId": "job-interview", "config": {}}',
     "invalid_config"),
])
async def test_bad_requests_get_an_error_and_the_socket_stays_usable(dsn, session, frame, code):
    """Malformed JSON, wrong types, unknown types and refused requests get a precise error;
    the next request on the same socket is answered."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        error = await client.ask(frame)
        assert (error["type"], error["code"]) == ("error", code) and error["message"]
        status = await client.ask({"type": "rate_limit_check", "phoneNumber": "+1 (415) 555-0100"})
        assert status["type"] == "rate_limit_status"


async def test_rate_limit_check_echoes_the_number_as_sent(dsn, session):
    """rate_limit_status answers at once, echoing phoneNumber exactly as the client wrote it,
    with remaining, limit and resetTime; refused numbers carry the reason."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        await h.app[LIMITER].hit("+14155550100", "CA1")
        status = await client.ask({"type": "rate_limit_check", "phoneNumber": "(415) 555-0100"})
        assert status["phoneNumber"] == "(415) 555-0100"
        assert (status["allowed"], status["remaining"], status["limit"]) == (True, 1, 2)
        assert status["resetTime"] > 0
        bad = await client.ask({"type": "rate_limit_check", "phoneNumber": "+44 20 7946 0000"})
        assert (bad["allowed"], bad["reason"], bad["phoneNumber"]) == (False, "region_not_allowed", "+44 20 7946 0000")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
messages = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"type": st.sampled_from(["rate_limit_check", "call.subscribe", "call.end", "x"])},
                          optional={"phoneNumber": json_values, "callSid": json_values, "token": json_values,
                                    "all": json_values, "adminToken": json_values}).map(json.dumps),
    st.text(max_size=200),
)


@pytest.fixture
async def fuzz_target(dsn):
    async with callgate(dsn, **TWILIO_ENV) as h, aiohttp.ClientSession() as s:
        yield await open_frontend(s, h)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=messages)
async def test_fuzzed_frames_never_break_the_handler(fuzz_target, frame):
    """Any text frame gets exactly one answer (an error or a status) and the socket stays open."""
    client = fuzz_target
    await client.send(frame)
    reply = await client.recv()
    assert reply["type"] in ("error", "rate_limit_status")
    assert not client.ws.closed


async def place(client: Frontend, number: str = "+14155550123", **fields) -> list[dict]:
    await client.send({"type": "call.start", "phoneNumber": number, "scenarioId": "job-interview",
                       "config": {"jobTitle": "Engineer", "company": "Acme"}, "voice": "cedar", **fields})
    return [await client.recv(timeout=15)]


async def test_call_start_places_one_call_with_the_right_fields(dsn, session):
    """call.start charges, then places exactly one call: To the number, From the region's
    caller id, Url our /twiml, status callbacks to /twilio/status; the reply is queued with a
    callSid and a token."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        reply, = await place(client)
        creates = [r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]
        assert len(creates) == 1
        form = creates[0]
        assert (form.value("To"), form.value("From")) == ("+14155550123", CALLER_ID)
        assert form.value("Url").startswith(f"{PUBLIC_URL}/twiml?charge=")
        assert form.value("StatusCallback").startswith(f"{PUBLIC_URL}/twilio/status?charge=")
        assert set(form.form["StatusCallbackEvent"]) == {"initiated", "ringing", "answered", "completed"}
        assert reply["type"] == "call.status_changed" and reply["status"] == "queued"
        assert reply["callSid"] in h.twilio_api.calls and reply["token"]
        assert (await h.app[LIMITER].test("+14155550123")).remaining == 1
        record = await h.app[CALL_STORE].get(reply["callSid"])
        assert record["direction"] == "outbound-api" and record["charge_id"].startswith("RS")


async def test_call_start_over_the_limit_places_nothing(dsn, session):
    """A number at its limit gets rate_limit_exceeded and no REST request is made."""
    async with callgate(dsn, RATE_LIMIT_PHONE_MAX_CALLS="1", **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        await h.app[LIMITER].hit("+14155550123", "CA-earlier")
        reply, = await place(client, number="415-555-0123")
        assert reply["type"] == "rate_limit_exceeded" and reply["phoneNumber"] == "415-555-0123"
        assert reply["reason"] == "limit_reached" and reply["resetTime"] > 0
        assert not [r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]


async def test_call_start_rest_timeout_keeps_the_charge(dsn, session):
    """Twilio not answering in time leaves the outcome unknown: the charge stays, no retry."""
    async with callgate(dsn, TWILIO_REST_TIMEOUT_MS="300", **TWILIO_ENV) as h:
        h.twilio_api.delay_next(3)
        client = await open_frontend(session, h)
        reply, = await place(client)
        assert (reply["type"], reply["code"]) == ("error", "call_outcome_unknown")
        assert (await h.app[LIMITER].test("+14155550123")).remaining == 1
        assert len([r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]) == 1


async def test_call_start_refused_by_twilio_releases_the_charge(dsn, session):
    """A definite refusal (HTTP 400) gives the slot back."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        h.twilio_api.fail_next(400, {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400})
        client = await open_frontend(session, h)
        reply, = await place(client)
        assert (reply["type"], reply["code"]) == ("error", "call_refused")
        assert (await h.app[LIMITER].test("+14155550123")).remaining == 2


async def test_turnstile_failure_places_nothing(dsn, session):
    """With TURNSTILE_SECRET_KEY set, a token the verifier rejects (or none) places no call."""
    verifier = web.Application()
    seen = []

    async def siteverify(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append(dict(form))
        return web.json_response({"success": form.get("response") == "good-token"})

    verifier.router.add_post("/siteverify", siteverify)
    runner = web.AppRunner(verifier)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/siteverify"
    try:
        async with callgate(dsn, TURNSTILE_SECRET_KEY="ts-secret", TURNSTILE_VERIFY_URL=url, **TWILIO_ENV) as h:
            client = await open_frontend(session, h)
            for token in (None, "bad-token"):
                reply, = await place(client, **({"turnstileToken": token} if token else {}))
                assert (reply["type"], reply["code"]) == ("error", "turnstile_failed")
            assert not [r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]
            reply, = await place(client, turnstileToken="good-token")
            assert reply["status"] == "queued"
    finally:
        await runner.cleanup()
    assert seen[-1]["secret"] == "ts-secret" and seen[-1]["response"] == "good-token"


async def test_subscribers_see_only_their_own_call(dsn, session):
    """Two browsers placing two calls each see their own call's events, never the other's; a
    third without a token sees nothing; call.end works only with the token."""
    async with FakeRealtime(reply_text="Hi there.") as model, callgate(dsn, model=model, **TWILIO_ENV) as h:
        alice, bob = await open_frontend(session, h), await open_frontend(session, h)
        a, = await place(alice, number="+14155550111")
        b, = await place(bob, number="+14155550112")
        calls = []
        for reply in (a, b):
            sim = h.call(audio=b"", call_sid=reply["callSid"], direction="outbound-api",
                         to="+14155550111" if reply is a else "+14155550112",
                         extra_params={})
            twiml = await sim.webhook(path="/twiml?charge=" + h.twilio_api.calls[reply["callSid"]].url.split("charge=")[1])
            assert twiml.parameters["scenarioId"] == "job-interview" and twiml.parameters["voice"] == "cedar"
            await sim.connect()
            calls.append(sim)
        seen_a = await alice.until(lambda e: e["type"] == "transcript.done")
        seen_b = await bob.until(lambda e: e["type"] == "transcript.done")
        assert {e["callSid"] for e in seen_a if "callSid" in e} == {a["callSid"]}
        assert {e["callSid"] for e in seen_b if "callSid" in e} == {b["callSid"]}
        assert [e["status"] for e in seen_a if e["type"] == "call.status_changed"][:1] == ["connected"]
        assert not any(e["type"].startswith(("response.", "input_audio", "session.")) for e in seen_a + seen_b)

        eve = await open_frontend(session, h)
        error = await eve.ask({"type": "call.end", "callSid": a["callSid"]})
        assert error["code"] == "forbidden"
        await alice.send({"type": "call.end"})  # the one call alice follows
        ended = await alice.until(lambda e: e.get("status") == "ended")
        assert ended[-1]["reason"] == "ended_by_client"
        await calls[0].wait_closed()
        await calls[1].stop()


async def test_resubscribing_with_the_token_resumes_a_call(dsn, session):
    """A browser that reconnects follows its call again with callSid + token, starting with its
    current status; an operator with ADMIN_TOKEN follows every call."""
    async with FakeRealtime() as model, callgate(dsn, model=model, ADMIN_TOKEN="op-secret", **TWILIO_ENV) as h:
        sim = h.call(audio=b"")
        await sim.webhook()
        await sim.connect()
        await model.wait_for_session()
        token = tokens.subscription_token(h.app[TOKEN_SECRET], sim.call_sid)
        client = await open_frontend(session, h)
        first = await client.ask({"type": "call.subscribe", "callSid": sim.call_sid, "token": token})
        assert first == events.status_changed(sim.call_sid, "connected")
        operator = await open_frontend(session, h)
        denied = await operator.ask({"type": "call.subscribe", "all": True, "adminToken": "guess"})
        assert denied["code"] == "forbidden"
        await operator.send({"type": "call.subscribe", "all": True, "adminToken": "op-secret"})
        await sim.stop()
        ended = await operator.until(lambda e: e.get("status") == "ended")
        assert ended[-1]["callSid"] == sim.call_sid


async def test_a_frozen_client_is_dropped_and_the_call_goes_on(dsn, session):
    """A browser that stops reading is disconnected once it falls behind; the call's audio keeps
    flowing both ways meanwhile."""
    reply_audio = bytes(range(256)) * 400  # ~13 s of audio at 8 kB/s: plays throughout
    async with FakeRealtime(reply_audio=reply_audio, pace=1.0) as model, \
            callgate(dsn, model=model, **TWILIO_ENV) as h:
        sim: SimulatedCall = h.call(audio=b"", speed=1.0)
        await sim.webhook()
        await sim.connect()
        model_session = await model.wait_for_session()
        token = tokens.subscription_token(h.app[TOKEN_SECRET], sim.call_sid)
        frozen = await open_frontend(session, h)
        assert (await frozen.ask({"type": "call.subscribe", "callSid": sim.call_sid, "token": token}))["status"]
        # The frozen client now reads nothing while the call produces far more than it and
        # the sockets' buffers can hold (16 MB).
        for i in range(4000):
            h.bus.publish(events.transcript_delta(sim.call_sid, "item_x", "assistant", "word " * 800))
            if i % 100 == 0:
                await asyncio.sleep(0)  # a busy call still yields: the client's sender gets its turns
            if not h.app[FRONTEND].sockets:
                break
        await wait_until(lambda: not h.app[FRONTEND].sockets, timeout=10, what="the frozen client to be dropped")
        dropped = sum(h.app[METRICS].registry.get_sample_value("callgate_frontend_dropped_total", {"reason": r})
                      for r in ("behind", "stopped_reading"))
        assert dropped == 1  # what an operator's alert on queue overflows counts
        heard_before = len(sim.received_audio)
        await sim.wait_for_audio(heard_before + 8000, timeout=5)
        sent_before = len(model_session.audio_in)
        await sim.play(bytes([0xFF]) * 8000, tail_silence_ms=0)
        await model_session.wait_for_audio(sent_before + 8000)
        await sim.stop()


async def test_a_status_callback_before_the_call_is_recorded_still_refunds(dsn, session):
    """A busy callback that beats call.start's own record of the call (its signed URL names
    the reservation) refunds the charge all the same."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        limiter = h.app[LIMITER]
        await limiter.hit("+14155550123", "RS" + "a" * 32)
        form = {"CallSid": "CA" + "b" * 32, "CallStatus": "busy", "AccountSid": h.twilio_api.account_sid}
        url = f"{PUBLIC_URL}/twilio/status?charge=RS{'a' * 32}"
        from twilio.request_validator import RequestValidator

        from helpers import AUTH_TOKEN
        signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
        async with session.post(h.url + f"/twilio/status?charge=RS{'a' * 32}", data=form,
                                headers={"X-Twilio-Signature": signature}) as resp:
            assert resp.status == 204
        assert (await limiter.test("+14155550123")).remaining == 2


async def test_a_browser_leaving_mid_call_start_does_not_lose_the_call(dsn, session):
    """The browser closes while Twilio is still placing its call: the call is recorded with
    its charge all the same, so its status callbacks can refund it."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        h.twilio_api.delay_next(0.5)
        client = await open_frontend(session, h)
        await client.send({"type": "call.start", "phoneNumber": "+14155550123", "scenarioId": "customer-service",
                           "config": {"companyName": "Acme"}})
        await h.twilio_api.wait_for_request(lambda r: r.path.endswith("/Calls.json"))
        await client.ws.close()
        record = await wait_until(
            lambda: h.app[CALL_STORE].get(next(iter(h.twilio_api.calls))) if h.twilio_api.calls else None,
            timeout=10, what="the placed call to be recorded")
    assert record["charge_id"].startswith("RS") and record["direction"] == "outbound-api"


async def test_at_the_end_of_a_drain_browsers_are_told_to_go_elsewhere(dsn, session):
    """With no call left to follow, a drain ends by telling browsers 1001 (reconnect elsewhere)."""
    from server import drain

    async with callgate(dsn, **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        await drain(h.app, timeout=0)
        msg = await client.ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001


async def test_following_an_unknown_call_is_an_error(dsn, session):
    """A valid token for a call this deployment never saw gets unknown_call, not silence."""
    async with callgate(dsn, **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        sid = "CA" + "c" * 32
        token = tokens.subscription_token(h.app[TOKEN_SECRET], sid)
        reply = await client.ask({"type": "call.subscribe", "callSid": sid, "token": token})
        other = await client.ask({"type": "call.subscribe", "callSid": "CA" + "d" * 32, "token": token})
    assert reply["code"] == "unknown_call" and other["code"] == "forbidden"


async def test_checks_and_call_starts_are_rate_limited_per_client(dsn, session):
    """A socket flooding rate_limit_check is told to slow down; one address placing many calls
    is refused before any charge or REST request."""
    async with callgate(dsn, RATE_LIMIT_PHONE_MAX_CALLS="100", TRUST_FLY_CLIENT_IP="yes", **TWILIO_ENV) as h:
        client = await open_frontend(session, h, **{"Fly-Client-IP": "203.0.113.9"})
        for _ in range(25):
            await client.send({"type": "rate_limit_check", "phoneNumber": "+14155550100"})
        replies = [await client.recv() for _ in range(25)]
        assert {r["type"] for r in replies} == {"rate_limit_status", "error"}
        assert [r for r in replies if r["type"] == "error"][0]["code"] == "slow_down"
        codes = []
        for i in range(11):
            codes.append((await place(client, number=f"+1415555{2000 + i}"))[0].get("code", "queued"))
        assert codes[:10] == ["queued"] * 10 and codes[10] == "too_many_calls"
        assert len([r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]) == 10


async def test_turnstile_that_does_not_answer_fails_closed_in_time(dsn, session, monkeypatch):
    """A Turnstile verifier that never answers means no call, within the verification bound."""
    import turnstile

    monkeypatch.setattr(turnstile, "VERIFY_TIMEOUT_S", 0.3)
    silent = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}/siteverify"
    try:
        async with callgate(dsn, TURNSTILE_SECRET_KEY="ts", TURNSTILE_VERIFY_URL=url, **TWILIO_ENV) as h:
            client = await open_frontend(session, h)
            reply, = await asyncio.wait_for(place(client, turnstileToken="anything"), timeout=5)
            assert reply["code"] == "turnstile_failed"
            assert not [r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]
    finally:
        silent.close()


async def test_caller_id_follows_the_region(dsn, session):
    """An Australian number is called from the AU caller id; with none for IN, from the US one."""
    async with callgate(dsn, TWILIO_PHONE_NUMBER_AU="+61291234567", **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        await place(client, number="+61 2 9374 4000")
        await place(client, number="+91 98765 43210")
        froms = [r.value("From") for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]
    assert froms == ["+61291234567", CALLER_ID]


async def test_attempts_that_place_nothing_cost_no_budget(dsn, session):
    """Retrying a number at its limit, or one Twilio refuses, uses none of the address's
    call.start budget."""
    from calls.outbound import CALL_STARTS_PER_ADDRESS as CALL_STARTS_PER_IP

    async with callgate(dsn, RATE_LIMIT_PHONE_MAX_CALLS="1", **TWILIO_ENV) as h:
        await h.app[LIMITER].hit("+14155550123", "CA-earlier")
        client = await open_frontend(session, h)
        for _ in range(CALL_STARTS_PER_IP):
            assert (await place(client))[0]["type"] == "rate_limit_exceeded"
        h.twilio_api.fail_next(400, {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400})
        assert (await place(client, number="+14155550124"))[0]["code"] == "call_refused"
        assert (await place(client, number="+14155550125"))[0]["status"] == "queued"


async def test_outbound_calls_hold_a_place_under_the_cap_while_they_ring(dsn, session):
    """call.start holds a place before placing: at the cap it places nothing (at_capacity); a
    busy callback gives its place back; and a held call's own webhook is taken even when
    inbound callers have filled the rest of the cap."""
    async with callgate(dsn, RATE_LIMIT_MAX_CONCURRENT_CALLS="2", RATE_LIMIT_PHONE_MAX_CALLS="10", **TWILIO_ENV) as h:
        client = await open_frontend(session, h)
        first, = await place(client, number="+14155550201")
        second, = await place(client, number="+14155550202")
        third, = await place(client, number="+14155550203")
        assert (first["status"], second["status"], third["code"]) == ("queued", "queued", "at_capacity")
        assert len([r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]) == 2
        # The first callee is busy: its place comes back.
        create = next(r for r in h.twilio_api.requests if r.path.endswith("/Calls.json"))
        callback = create.value("StatusCallback").removeprefix(PUBLIC_URL)
        form = {"CallSid": first["callSid"], "CallStatus": "busy", "Direction": "outbound-api"}
        async with session.post(h.url + callback, data=form,
                                headers={"X-Twilio-Signature": sign(PUBLIC_URL + callback, form)}) as resp:
            assert resp.status == 204
        # An inbound caller takes that place; the second callee, answering now, is still taken.
        inbound = h.call(audio=b"", from_="+14155550299")
        assert (await inbound.webhook()).stream_url
        creates = [r for r in h.twilio_api.requests if r.path.endswith("/Calls.json")]
        url = creates[1].value("Url").removeprefix(PUBLIC_URL)
        answered = h.call(audio=b"", call_sid=second["callSid"], direction="outbound-api", to="+14155550202")
        assert (await answered.webhook(path=url)).stream_url
        late = h.call(audio=b"", from_="+14155550298")
        assert (await late.webhook()).stream_url is None  # now the cap is really full

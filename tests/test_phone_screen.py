"""phone-screen's own webapp against Callgate: its exact requests and messages (taken from its
source: lib/scenario-service.ts, lib/use-rate-limit.ts, components/call-interface.tsx,
app/api/call/outbound/route.ts), and what its code does with the answers."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest

from appkeys import METRICS
from helpers import callgate
from tools.fake_realtime import FakeRealtime

WEBAPP = "https://phone-screen.example"  # the webapp's own origin, another than the server's
ENV = {"ALLOWED_ORIGINS": f"https://callgate.test,{WEBAPP}"}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def webapp_accepts_scenarios(body) -> bool:
    """scenario-service.ts: Array.isArray, then every element has id, name and an array of fields."""
    return isinstance(body, list) and all(s.get("id") and s.get("name") and isinstance(s.get("fields"), list)
                                          for s in body)


async def test_the_webapp_reads_the_scenarios_from_another_origin(dsn, http):
    """Its fetch sends Content-Type: application/json, so the browser preflights; the preflight
    and the GET both come back with the webapp's origin allowed, and the body passes the
    webapp's checks, with every field it reads."""
    async with callgate(dsn, **ENV) as h:
        preflight = await http.options(h.url + "/scenarios", headers={
            "Origin": WEBAPP, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "content-type"})
        response = await http.get(h.url + "/scenarios", headers={"Origin": WEBAPP, "Content-Type": "application/json"})
        body = await response.json()
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == WEBAPP
    assert "content-type" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == WEBAPP
    assert webapp_accepts_scenarios(body)
    interview = next(s for s in body if s["id"] == "job-interview")
    # scenario-configuration.tsx renders each field by field.key and field.type, options by
    # value/label; call-interface.tsx takes voiceOptions[0].value as the default voice.
    assert [f["key"] for f in interview["fields"]] == ["jobTitle", "company", "jobDescription"]
    assert [f["type"] for f in interview["fields"]] == ["text", "text", "textarea"]
    assert interview["voiceOptions"][0]["value"] and interview["icon"]
    service = next(s for s in body if s["id"] == "customer-service")
    assert all(o["value"] and o["label"] for f in service["fields"] if f["type"] == "select" for o in f["options"])


async def test_cors_is_only_for_allowed_origins_and_only_on_the_public_reads(dsn, http):
    """Another origin gets no Access-Control-Allow-Origin (never *) and its preflight is refused;
    webhooks, admin and the page never answer cross-origin requests."""
    async with callgate(dsn, **ENV, ADMIN_TOKEN="t" * 20) as h:
        stranger = await http.get(h.url + "/scenarios", headers={"Origin": "https://evil.example"})
        refused = await http.options(h.url + "/tools", headers={"Origin": "https://evil.example",
                                                                "Access-Control-Request-Method": "GET"})
        public = {path: await http.get(h.url + path, headers={"Origin": WEBAPP})
                  for path in ("/tools", "/public-url", "/health", "/healthz")}
        private = {path: await http.get(h.url + path, headers={"Origin": WEBAPP}) for path in ("/", "/admin/stats")}
        webhook_preflight = await http.options(h.url + "/twilio/status", headers={
            "Origin": WEBAPP, "Access-Control-Request-Method": "POST"})
    assert stranger.status == 200 and "Access-Control-Allow-Origin" not in stranger.headers
    assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers
    assert {p: r.headers.get("Access-Control-Allow-Origin") for p, r in public.items()} == dict.fromkeys(public, WEBAPP)
    assert all("Access-Control-Allow-Origin" not in r.headers for r in private.values())
    assert webhook_preflight.status == 405 and "Access-Control-Allow-Origin" not in webhook_preflight.headers


async def test_tools_health_and_public_url_in_phone_screens_shapes(dsn, http):
    """/tools is a bare array of function schemas; /health has phone-screen's rateLimiting
    block; /public-url names the public URL."""
    async with callgate(dsn, **ENV) as h:
        tools = await (await http.get(h.url + "/tools")).json()
        health = await (await http.get(h.url + "/health")).json()
        public = await (await http.get(h.url + "/public-url")).json()
    assert isinstance(tools, list) and all(t["type"] == "function" and t["name"] and "parameters" in t for t in tools)
    assert health["status"] == "healthy" and health["timestamp"].endswith("Z")
    assert set(health["rateLimiting"]) == {"activeConnections", "activeCalls", "suspendedIPs"}
    assert public == {"publicUrl": "https://callgate.test"}


async def webhook_instructions(h, model, path: str) -> tuple[dict, str]:
    """Post the webhook Twilio would post for ``path``, open the stream, and return the TwiML's
    stream parameters and the instructions the model was given."""
    call = h.call(audio=b"", from_=f"+1415555{1000 + len(h.calls)}")  # a caller each: no limit in the way
    twiml = await call.webhook(path=path)
    assert twiml.stream_url, twiml
    await call.connect()
    session = await model.wait_for_session(len(model.sessions) + 1)
    update = await session.wait_for_event("session.update")
    await call.stop()
    return twiml.parameters, update["session"]["instructions"]


async def test_phone_screens_webhook_urls_run_the_call_they_describe(dsn):
    """The TwiML URLs phone-screen's outbound route builds (URLSearchParams: + for spaces,
    %2C for commas), its scenarioId/config form, our ?scenario=, and the bare /twiml its
    webapp really sends today: each one is signed, accepted, and runs its scenario."""
    job = {"jobTitle": "Software Engineer, Backend", "company": "Acme & Co", "jobDescription": "APIs; SQL.",
           "voice": "ash"}
    async with FakeRealtime() as model, callgate(dsn, model=model, **ENV) as h:
        legacy, legacy_text = await webhook_instructions(h, model, "/twiml?" + urlencode(job))
        service, service_text = await webhook_instructions(h, model, "/twiml?" + urlencode({
            "scenarioId": "customer-service", "config": json.dumps({"companyName": "Acme Telecom"}), "voice": "sage"}))
        ours, ours_text = await webhook_instructions(h, model, "/twiml?scenario=job-interview")
        bare, _ = await webhook_instructions(h, model, "/twiml")
    assert (legacy["scenarioId"], legacy["voice"]) == ("job-interview", "ash")
    assert orjson.loads(legacy["config"]) == {k: job[k] for k in ("jobTitle", "company", "jobDescription")}
    assert "Software Engineer, Backend" in legacy_text and "APIs; SQL." in legacy_text
    assert (service["scenarioId"], service["voice"]) == ("customer-service", "sage") and "Acme Telecom" in service_text
    assert ours["scenarioId"] == "job-interview" and "the open position" in ours_text
    assert bare["scenarioId"] == "job-interview"


async def test_a_long_job_description_reaches_the_model(dsn):
    """A job description of 5000 characters is too long for a stream parameter: the stream
    gets a reference to it instead, and the model is still given all of it."""
    description = ("Build and run Python services. " * 200)[:5000].strip()
    async with FakeRealtime() as model, callgate(dsn, model=model, **ENV) as h:
        params, instructions = await webhook_instructions(h, model, "/twiml?" + urlencode({
            "jobTitle": "Engineer", "company": "Acme", "jobDescription": description}))
    assert "config" not in params and params["configRef"]
    assert len(params["configRef"]) < 100 and description in instructions


async def test_the_webapps_logs_messages_get_answers_it_can_live_with(dsn, http):
    """On its call socket the webapp sends scenario.configuration, a raw session.update and
    call.end {callSid, timestamp}; each gets an error saying why and what to use instead, and
    the socket stays open (the webapp treats any close as the end of the call). Its
    rate_limit_check is answered with the number echoed exactly."""
    async with callgate(dsn, **ENV) as h:
        ws = await http.ws_connect(h.url + "/logs", headers={"Origin": WEBAPP})
        sent = [
            {"type": "scenario.configuration", "scenarioId": "job-interview",
             "config": {"jobTitle": "Engineer", "company": "Acme"}, "voice": "ash"},
            {"type": "session.update", "session": {"voice": "ash", "modalities": ["text", "audio"],
                                                   "turn_detection": {"type": "server_vad"},
                                                   "input_audio_transcription": {"model": "whisper-1"},
                                                   "input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw"}},
            {"type": "call.end", "callSid": "CA" + "5" * 32, "timestamp": "2026-12-01T10:00:00.000Z"},
            {"type": "rate_limit_check", "phoneNumber": "+14155550123"},
        ]
        replies = []
        for message in sent:
            await ws.send_str(json.dumps(message))
            replies.append(json.loads((await ws.receive(timeout=5)).data))
        still_open = not ws.closed
        await ws.close()
    configuration, update, end, status = replies
    assert (configuration["type"], configuration["code"]) == ("error", "not_supported")
    assert "call.start" in configuration["message"] and "jobTitle" in configuration["message"]
    assert update["code"] == "not_supported" and "raw model events" in update["message"]
    assert end["code"] == "forbidden" and "call.subscribe" in end["message"]
    assert status["type"] == "rate_limit_status" and status["phoneNumber"] == "+14155550123"
    assert status["allowed"] is True and status["remaining"] == 2 and status["resetTime"] > 1e12
    assert still_open


async def test_a_reconnect_loop_is_refused_visibly_but_quietly(dsn, http, caplog):
    """The webapp's rate-limit hook opens sockets in a burst. Past the per-address cap (403) and
    the per-address rate of upgrades (429) each is refused, every refusal is counted by reason
    in /metrics, and the log says why in a few lines, not one per socket, with no client
    address in it."""
    caplog.set_level(logging.WARNING, logger="callgate.refused")
    headers = {"Origin": WEBAPP, "Fly-Client-IP": "198.51.100.77"}
    async with callgate(dsn, **ENV, RATE_LIMIT_MAX_CONNECTIONS_PER_IP="5", TRUST_FLY_CLIENT_IP="yes") as h:
        kept = [await http.ws_connect(h.url + "/logs", headers=headers) for _ in range(5)]
        statuses = []
        for _ in range(30):
            try:
                extra = await http.ws_connect(h.url + "/logs", headers=headers)
                await extra.close()
                statuses.append(101)
            except aiohttp.WSServerHandshakeError as exc:
                statuses.append(exc.status)
        bad_origin = await http.get(h.url + "/logs", headers={"Origin": "https://evil.example", "Upgrade": "websocket",
                                                              "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                                              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        metrics = h.app[METRICS].render().decode()
        await asyncio.gather(*(ws.close() for ws in kept))
    lines = [r.getMessage() for r in caplog.records if r.name == "callgate.refused"]
    counted = {reason: float(re.search(rf'callgate_frontend_refused_total{{reason="{reason}"}} ([0-9.]+)',
                                       metrics).group(1)) for reason in ("per_ip_cap", "handshake_rate")}
    assert set(statuses) <= {403, 429} and statuses.count(403) == counted["per_ip_cap"] > 0
    assert statuses.count(429) == counted["handshake_rate"] and bad_origin.status == 403
    assert 'callgate_frontend_refused_total{reason="origin"} 1.0' in metrics
    assert [line for line in lines if "per_ip_cap" in line] and len(lines) <= 4
    assert all("198.51.100.77" not in line for line in lines)


async def test_an_origin_header_that_is_no_origin_is_just_not_allowed(dsn, http):
    """An Origin with a port out of range gets the public reads without CORS, and a 403 on
    /logs: never a 500."""
    async with callgate(dsn, **ENV) as h:
        health = await http.get(h.url + "/healthz", headers={"Origin": "http://a:99999"})
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(h.url + "/logs", headers={"Origin": "http://127.0.0.1:18081.evil.test"})
    assert health.status == 200 and "Access-Control-Allow-Origin" not in health.headers
    assert refused.value.status == 403

"""Twilio's edges refuse what is not Twilio's: signatures on /twiml, /twilio/status and the
/call handshake, per-call stream tokens, numbers over their limit; status callbacks refund."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import websockets
from twilio.request_validator import RequestValidator

from appkeys import CALL_STORE, LIMITER, METRICS, TOKEN_SECRET
from bridge import tokens
from helpers import AUTH_TOKEN, PUBLIC_URL, callgate, collect, silent_call, wait_until
from tools.fake_realtime import FakeRealtime


def sign(url: str, params: dict) -> str:
    return RequestValidator(AUTH_TOKEN).compute_signature(url, params)


async def post(h, path: str, form: dict, signature: str | None) -> aiohttp.ClientResponse:
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(h.url + path, data=form, headers=headers) as resp:
            await resp.read()
            return resp


FORM = {"CallSid": "CA" + "1" * 32, "AccountSid": "AC1", "From": "+14155550100", "To": "+14155550199",
        "Direction": "inbound", "CallStatus": "ringing"}


@pytest.mark.parametrize("path", ["/twiml", "/twilio/status"])
async def test_unsigned_forged_and_wrong_url_requests_are_403(dsn, path):
    """Missing, forged, and other-URL signatures are refused with 403 and reach nothing."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        form = dict(FORM, CallStatus="no-answer") if path == "/twilio/status" else FORM
        cases = {
            "missing": None,
            "forged": "bm90IGEgc2lnbmF0dXJl",
            "wrong url": sign("https://elsewhere.test" + path, form),
            "wrong params": sign(PUBLIC_URL + path, dict(form, From="+14155550111")),
        }
        statuses = {name: (await post(h, path, form, sig)).status for name, sig in cases.items()}
        good = (await post(h, path, form, sign(PUBLIC_URL + path, form))).status
    assert statuses == dict.fromkeys(cases, 403)
    assert good in (200, 204)
    assert model.connections == 0


SHARED_KEY = "webhooks-rule-shared-secret"
SHA256_RULE = {"X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}


async def test_hmac_sha256_signatures_of_a_webhooks_rule_are_accepted_everywhere(dsn):
    """An account with a Webhooks rule signs with its shared key and HMAC-SHA256: the webhook,
    the media-stream upgrade and the status callback are all accepted, and the call runs."""
    async with FakeRealtime() as model, callgate(dsn, model=model, TWILIO_WEBHOOK_SHARED_KEY=SHARED_KEY) as h:
        call = h.call(audio=b"", shared_key=SHARED_KEY, algorithm="HMAC_SHA256")
        twiml = await call.webhook()
        assert twiml.stream_url
        await call.connect()
        await call.wait_for_audio(800)
        await call.stop()
        form = dict(FORM, CallSid=call.call_sid, CallStatus="completed")
        signature = RequestValidator(SHARED_KEY).compute_signature(PUBLIC_URL + "/twilio/status", form, "HMAC_SHA256")
        async with aiohttp.ClientSession() as session:
            async with session.post(h.url + "/twilio/status", data=form,
                                    headers={"X-Twilio-Signature": signature, **SHA256_RULE}) as resp:
                callback = resp.status
    assert callback == 204 and not call.errors


@pytest.mark.parametrize(("rule", "key", "why"), [
    (SHA256_RULE, None, "set TWILIO_WEBHOOK_SHARED_KEY"),
    (SHA256_RULE, "some-other-key", "does not match"),
    ({"X-Twilio-Webhooks-Signature-Settings": "key=k,algorithm=HMAC_SHA512"}, SHARED_KEY, "cannot check"),
])
async def test_a_signature_we_cannot_check_is_403_with_a_log_line(dsn, caplog, rule, key, why):
    """Signed with a key this server lacks, a wrong one, or an algorithm it cannot check: a
    403, and a log line that says which."""
    env = {"TWILIO_WEBHOOK_SHARED_KEY": SHARED_KEY} if key is not None else {}
    async with callgate(dsn, **env) as h:
        signature = RequestValidator(key or SHARED_KEY).compute_signature(PUBLIC_URL + "/twiml", FORM, "HMAC_SHA256")
        async with aiohttp.ClientSession() as session:
            async with session.post(h.url + "/twiml", data=FORM,
                                    headers={"X-Twilio-Signature": signature, **rule}) as resp:
                status = resp.status
    assert status == 403
    assert why in caplog.text


async def test_media_stream_handshake_needs_twilios_signature(dsn):
    """The /call upgrade without a valid signature is refused before any model connection."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        ws_url = h.url.replace("http", "ws") + "/call"
        for headers in ({}, {"X-Twilio-Signature": "Zm9yZ2Vk"},
                        {"X-Twilio-Signature": sign("wss://elsewhere.test/call", {})}):
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(ws_url, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 403
    assert model.connections == 0


@pytest.mark.parametrize("case", ["missing", "expired", "reused", "other call", "changed parameters",
                                  "other account"])
async def test_bad_stream_tokens_close_1008_before_the_model(dsn, case):
    """A start without a valid, fresh, unused token for its own call, or for another Twilio
    account than ours, is closed with 1008, and no model connection is opened for it."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        twiml = await call.webhook()
        params = dict(twiml.parameters)
        start_sid = None
        if case == "missing":
            del params["token"]
        elif case == "expired":
            secret = h.app[TOKEN_SECRET]
            plain = {k: v for k, v in params.items() if k != "token"}
            params["token"] = tokens.mint(secret, call.call_sid, plain, now=0)
        elif case == "other call":
            start_sid = "CA" + "9" * 32
        elif case == "changed parameters":
            params["voice"] = "cedar"
        elif case == "other account":
            call.account_sid = "AC" + "7" * 32
        elif case == "reused":
            first = h.call(audio=b"", call_sid=call.call_sid)
            await first.connect(twiml.stream_url, params)
            await model.wait_for_session()
            await first.stop()
        connections_before = model.connections
        await call.connect(twiml.stream_url, params, start_call_sid=start_sid)
        code = await call.wait_closed()
        assert model.connections == connections_before
    assert code == 1008


async def test_a_stream_for_a_scenario_gone_since_its_webhook_is_refused_and_spends_nothing(dsn):
    """A stream whose parameters no longer make a call (its scenario removed by a deploy between
    the webhook and the stream) is closed with 1008, and its call is not recorded streaming or
    connected, nor its token spent: the record says what happened."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        twiml = await call.webhook()
        params = {k: v for k, v in twiml.parameters.items() if k != "token"} | {"scenarioId": "gone-since"}
        params["token"] = tokens.mint(h.app[TOKEN_SECRET], call.call_sid, params)
        await call.connect(twiml.stream_url, params)
        assert await call.wait_closed() == 1008
        record = await h.app[CALL_STORE].get(call.call_sid)
        assert model.connections == 0
    assert (record["status"], record["streamed_at"], record["connected_at"]) == ("queued", None, None)


async def test_a_socket_without_start_is_closed(dsn, monkeypatch):
    """A stream that never sends a valid start is closed with 1008 when its time is up."""
    import handlers.twilio

    monkeypatch.setattr(handlers.twilio, "START_TIMEOUT_S", 0.3)
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        await call.webhook()
        await call.connect(send_start=False)
        assert await call.wait_closed(timeout=2) == 1008
    assert model.connections == 0


async def test_over_the_limit_the_caller_hears_when_to_try_again(dsn):
    """A number past its limit gets <Say> and <Hangup/>, and no model session; a retried
    webhook of an admitted call charges nothing more."""
    async with FakeRealtime() as model, callgate(dsn, model=model, RATE_LIMIT_PHONE_MAX_CALLS="1") as h:
        first = h.call(audio=b"", from_="+14155550142")
        assert (await first.webhook()).stream_url
        assert (await first.webhook()).stream_url  # Twilio's retry: same CallSid
        second = h.call(audio=b"", from_="+1 415 555 0142")
        twiml = await second.webhook()
    assert twiml.stream_url is None and twiml.hangup
    assert "try again in about 60 minutes" in twiml.say
    assert model.connections == 0


async def test_refused_numbers_hear_so_and_are_not_charged(dsn):
    """A caller from a premium-rate or off-list number is told and hung up on."""
    async with callgate(dsn) as h:
        twiml = await h.call(audio=b"", from_="+442079460000").webhook()
    assert twiml.hangup and "cannot take calls" in twiml.say


async def test_outbound_calls_are_charged_to_the_called_number(dsn):
    """For Direction outbound-api the limited number is To, not From."""
    async with callgate(dsn) as h:
        call = h.call(audio=b"", direction="outbound-api", from_="+14155550100", to="+14155550177")
        assert (await call.webhook()).stream_url
        limiter = h.app[LIMITER]
        assert (await limiter.test("+14155550177")).remaining == 1
        assert (await limiter.test("+14155550100")).remaining == 2


async def test_no_answer_refunds_once_and_late_callbacks_change_nothing(dsn):
    """busy/no-answer/failed/canceled refund the call's charge, once; a duplicate or a late
    earlier status changes nothing; subscribers see each real change once."""
    async with callgate(dsn) as h:
        call = h.call(audio=b"", from_="+14155550166")
        await call.webhook()
        limiter = h.app[LIMITER]
        assert (await limiter.test("+14155550166")).remaining == 1

        async def status(value: str) -> int:
            form = dict(FORM, CallSid=call.call_sid, CallStatus=value)
            return (await post(h, "/twilio/status", form, sign(PUBLIC_URL + "/twilio/status", form))).status

        with collect(h.bus, call.call_sid) as sub:
            assert [await status(s) for s in ("ringing", "no-answer", "no-answer", "ringing", "completed")] \
                == [204] * 5
            seen = [sub.queue.get_nowait()["status"] for _ in range(sub.queue.qsize())]
        record = await h.app[CALL_STORE].get(call.call_sid)
        assert (await limiter.test("+14155550166")).remaining == 2
    assert seen == ["ringing", "no-answer"]
    assert record["status"] == "no-answer" and record["refunded"]


async def test_status_callback_bad_input_is_400(dsn):
    """A callback without a CallSid or with an unknown status is a 400, not a crash."""
    async with callgate(dsn) as h:
        for form in ({"CallStatus": "busy"}, dict(FORM, CallStatus="exploded")):
            assert (await post(h, "/twilio/status", form, sign(PUBLIC_URL + "/twilio/status", form))).status == 400


async def test_dtmf_reaches_the_model_as_text(dsn):
    """A keypad press becomes a user message for the model."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call, session = await silent_call(h)
        await call.wait_for_audio(800)
        await call.send_dtmf("7")
        await session.wait_for_event("conversation.item.create")  # the greeting's note
        event = await session.wait_for_event("conversation.item.create")
        await call.stop()
    assert event["item"]["role"] == "user" and "pressed the key 7" in event["item"]["content"][0]["text"]


async def test_scenarios_and_tools_are_listed(dsn):
    """GET /scenarios and GET /tools publish the schemas as bare arrays (phone-screen's shape)."""
    async with callgate(dsn) as h, aiohttp.ClientSession() as session:
        async with session.get(h.url + "/scenarios") as resp:
            scenarios = await resp.json()
        async with session.get(h.url + "/tools") as resp:
            tools = await resp.json()
    assert [s["id"] for s in scenarios] == ["job-interview", "customer-service"]  # the default first
    assert {t["name"] for t in tools} >= {"end_call", "get_current_time"}


async def test_the_global_cap_on_live_calls(dsn):
    """Past RATE_LIMIT_MAX_CONCURRENT_CALLS live calls a new caller hears "try later" and is not
    charged; when a call ends its place is free again."""
    async with callgate(dsn, RATE_LIMIT_MAX_CONCURRENT_CALLS="2") as h:
        first, second = h.call(audio=b"", from_="+14155550101"), h.call(audio=b"", from_="+14155550102")
        assert (await first.webhook()).stream_url and (await second.webhook()).stream_url
        third = h.call(audio=b"", from_="+14155550103")
        refused = await third.webhook()
        assert refused.hangup and "right now" in refused.say
        assert (await h.app[LIMITER].test("+14155550103")).remaining == 2
        await first.connect()
        await first.wait_for_audio(800)
        await first.stop()
        await first.wait_closed()
        async def ended() -> bool:
            return (await h.app[CALL_STORE].get(first.call_sid))["status"] == "ended"
        await wait_until(ended, what="the first call's record to say ended")
        again = h.call(audio=b"", from_="+14155550103")
        assert (await again.webhook()).stream_url


async def test_subscribers_learn_why_a_call_ended_even_after_twilios_callback(dsn):
    """Twilio's "completed" callback lands before the bridge finishes the call: subscribers
    still get the end with its reason."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"")
        await call.webhook()
        with collect(h.bus, call.call_sid) as sub:
            await call.connect()
            await model.wait_for_session()
            form = dict(FORM, CallSid=call.call_sid, CallStatus="completed")
            assert (await post(h, "/twilio/status", form, sign(PUBLIC_URL + "/twilio/status", form))).status == 204
            await call.stop()
            seen = []
            async with asyncio.timeout(10):
                while not any(e.get("reason") for e in seen if e.get("status") == "ended"):
                    seen.append(await sub.get())
    ended = [e for e in seen if e.get("status") == "ended"]
    assert ended[-1]["reason"] == "caller_hangup"
    record = await _record(dsn, call.call_sid)
    assert (record["status"], record["end_reason"]) == ("ended", "caller_hangup")


async def _record(dsn, call_sid):
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return dict(await conn.fetchrow("SELECT status, end_reason FROM calls WHERE call_sid = $1", call_sid))
    finally:
        await conn.close()


async def test_signature_refusals_cannot_flood_the_log(dsn, caplog):
    """Fifty requests naming fifty made-up algorithms are refused with 403 and logged in one
    line, not fifty: the header chooses nothing about the log."""
    async with callgate(dsn) as h, aiohttp.ClientSession() as session:
        statuses = []
        for k in range(50):
            async with session.post(h.url + "/twiml", data=FORM, headers={
                    "X-Twilio-Signature": "eA==", "X-Twilio-Webhooks-Signature-Settings": f"algorithm=X{k}"}) as resp:
                statuses.append(resp.status)
    assert statuses == [403] * 50
    assert len([r for r in caplog.records if r.name == "callgate.refused"]) == 1


async def status_post(h, call_sid: str, value: str, query: str = "") -> int:
    form = dict(FORM, CallSid=call_sid, CallStatus=value)
    path = "/twilio/status" + query
    return (await post(h, path, form, sign(PUBLIC_URL + path, form))).status


async def test_a_replayed_webhook_opens_nothing_and_a_retry_gets_the_same_answer(dsn):
    """Signatures carry no time, so a captured webhook can be replayed: while the call's stream
    has not started, a retry gets the same answer (the same token, one stream); once it has
    its stream or has ended, a replay hears a hang-up and opens no stream or model session.
    The cap and the number's charges are untouched."""
    async with FakeRealtime() as model, callgate(dsn, model=model, RATE_LIMIT_MAX_CONCURRENT_CALLS="5") as h:
        call = h.call(audio=b"", from_="+14155550177")
        answers = [await call.webhook() for _ in range(10)]
        assert len({a.parameters["token"] for a in answers}) == 1 and all(a.stream_url for a in answers)
        await call.connect()
        await model.wait_for_session()
        while_streaming = await call.webhook()
        await call.stop()
        await call.wait_closed()
        assert await status_post(h, call.call_sid, "completed") == 204
        replays = [await call.webhook() for _ in range(8)]
        for replay in replays:  # each one's stream, if it had one, would need a fresh token
            assert replay.stream_url is None and replay.hangup and not replay.say
        remaining = (await h.app[LIMITER].test("+14155550177")).remaining
    assert while_streaming.stream_url is None and while_streaming.hangup
    assert model.connections == 1 and remaining == 1


async def test_a_late_busy_after_completed_refunds_nothing(dsn):
    """A call that connected and completed stays charged when a late busy arrives: a final
    status is final for charging too."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"", from_="+14155550188")
        await call.webhook()
        await call.connect()
        await model.wait_for_session()
        await call.stop()
        await call.wait_closed()
        assert [await status_post(h, call.call_sid, s) for s in ("completed", "busy")] == [204, 204]
        record = await h.app[CALL_STORE].get(call.call_sid)
        remaining = (await h.app[LIMITER].test("+14155550188")).remaining
    assert remaining == 1 and not record["refunded"]


async def test_idle_stream_sockets_cannot_crowd_out_a_real_call(dsn, monkeypatch):
    """A captured upgrade signature opens sockets that never send start. With the cap on
    sockets waiting reached, the one that waited longest is closed for the newcomer, so a
    real call still gets its stream."""
    import handlers.twilio

    monkeypatch.setattr(handlers.twilio, "MAX_STREAMS_STARTING", 5)
    monkeypatch.setattr(handlers.twilio, "START_TIMEOUT_S", 60)  # closed by eviction only
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        idle = [h.call(audio=b"", from_=f"+1415555{3000 + i}") for i in range(5)]
        for call in idle:
            await call.webhook()
            await call.connect(send_start=False)
        real = h.call(audio=b"", from_="+14155553999")
        await real.webhook()
        await real.connect()
        await model.wait_for_session()
        await real.wait_for_audio(800)
        await real.stop()
        first_closed = await idle[0].wait_closed()
        others_open = [not call.closed for call in idle[1:]]
    assert first_closed == 1008 and all(others_open)


async def test_one_address_cannot_hold_many_sockets_waiting_for_start(dsn, monkeypatch):
    """Past MAX_STARTING_PER_ADDRESS sockets waiting for their start from one address, the
    next upgrade from it is refused with 503."""
    import handlers.twilio

    monkeypatch.setattr(handlers.twilio, "MAX_STARTING_PER_ADDRESS", 3)
    async with callgate(dsn) as h:
        idle = [h.call(audio=b"", from_=f"+1415555{3100 + i}") for i in range(4)]
        for call in idle[:3]:
            await call.webhook()
            await call.connect(send_start=False)
        await idle[3].webhook()
        with pytest.raises(websockets.InvalidStatus) as refused:
            await idle[3].connect(send_start=False)
    assert refused.value.response.status_code == 503


async def test_behind_fly_waiting_sockets_are_counted_per_client_not_per_proxy(dsn, monkeypatch):
    """Behind Fly's proxy every stream's peer is the proxy: sockets waiting for their start are
    counted by Fly-Client-IP, so one client's idle sockets do not refuse another's stream."""
    import handlers.twilio

    monkeypatch.setattr(handlers.twilio, "MAX_STARTING_PER_ADDRESS", 2)
    async with callgate(dsn, TRUST_FLY_CLIENT_IP="yes") as h:
        idle = [h.call(audio=b"", from_=f"+1415555{3200 + i}") for i in range(3)]
        for call in idle:
            await call.webhook()
        for call in idle[:2]:
            await call.connect(send_start=False, headers={"Fly-Client-IP": "203.0.113.66"})
        with pytest.raises(websockets.InvalidStatus):
            await idle[2].connect(send_start=False, headers={"Fly-Client-IP": "203.0.113.66"})
        real = h.call(from_="+14155553299")
        await real.webhook()
        await real.connect(headers={"Fly-Client-IP": "198.51.100.20"})
        await real.wait_for_audio(800)
        await real.stop()


async def test_bad_and_too_fast_media_are_dropped_and_counted(dsn):
    """A malformed frame, and media far faster than a phone line sends it, are not relayed to
    the model; each is counted by reason in /metrics; the call goes on."""
    async with FakeRealtime() as model, callgate(dsn, model=model) as h:
        call = h.call(audio=b"", speed=1000.0)
        await call.webhook()
        await call.connect()
        session = await model.wait_for_session()
        await call.wait_for_audio(800)
        await call._ws.send("{not json")
        flood = bytes([0xFF]) * 160 * 2000  # 40 s of audio, sent in well under a second
        await call.play(flood, tail_silence_ms=0)
        await call.play(bytes([0xFE]) * 160, tail_silence_ms=0)
        metrics = h.app[METRICS].render().decode()
        heard = len(session.audio_in)
        await call.stop()
    assert 'callgate_stream_frames_rejected_total{reason="malformed"} 1.0' in metrics
    assert 'callgate_stream_frames_rejected_total{reason="too_fast"}' in metrics
    assert heard < len(flood)

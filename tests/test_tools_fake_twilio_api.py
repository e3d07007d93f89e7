"""The fake Twilio REST API, driven by twilio-python's own async client where it can be: calls,
status callbacks, and the Account and IncomingPhoneNumbers resources the doctor reads."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from helpers import wait_until
from tools.fake_twilio_api import FakeTwilioApi

TO = "+14155550199"
FROM = "+14155550100"
TWIML_URL = "https://callgate.example/twiml"
EVENTS = ["initiated", "ringing", "answered", "completed"]

# twilio-python 9.x still hands aiohttp a BasicAuth, which aiohttp 3.14 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:twilio")


@pytest.fixture
async def api():
    async with FakeTwilioApi() as api:
        yield api


@pytest.fixture
async def client(api: FakeTwilioApi):
    client = Client(api.account_sid, api.auth_token, http_client=AsyncTwilioHttpClient())
    client.api.base_url = api.base_url
    try:
        yield client
    finally:
        await client.http_client.close()


def basic_auth(api: FakeTwilioApi) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(api.account_sid, api.auth_token)}


def calls_url(api: FakeTwilioApi, suffix: str = ".json") -> str:
    return f"{api.base_url}/2010-04-01/Accounts/{api.account_sid}/Calls{suffix}"


async def test_twilio_client_creates_and_ends_a_call(api, client):
    """twilio-python creates a call, sees it queued, then ends it."""
    call = await client.calls.create_async(
        to=TO, from_=FROM, url=TWIML_URL, status_callback="https://callgate.example/twilio/status",
        status_callback_event=EVENTS)
    assert call.sid.startswith("CA") and len(call.sid) == 34
    assert (call.status, call.direction) == ("queued", "outbound-api")
    assert (call.to, call._from) == (TO, FROM)
    assert call.account_sid == api.account_sid
    assert call.date_created is not None

    ended = await client.calls(call.sid).update_async(status="completed")
    assert ended.status == "completed"
    assert api.calls[call.sid].status == "completed"


async def test_create_keeps_every_status_callback_event(api, client):
    """Repeated StatusCallbackEvent fields are all recorded and stored."""
    call = await client.calls.create_async(to=TO, from_=FROM, url=TWIML_URL,
                                           status_callback="https://callgate.example/s",
                                           status_callback_event=EVENTS)
    request = await api.wait_for_request(lambda r: r.path.endswith("/Calls.json"))
    assert request.auth_ok and request.method == "POST"
    assert request.form["StatusCallbackEvent"] == EVENTS
    assert request.value("Url") == TWIML_URL
    assert api.calls[call.sid].status_callback_events == EVENTS


async def test_updating_an_ended_call_raises_20404(client):
    """A second hang-up gets 404 / 20404, as real Twilio answers for an ended call."""
    call = await client.calls.create_async(to=TO, from_=FROM, twiml="<Response/>")
    await client.calls(call.sid).update_async(status="completed")
    with pytest.raises(TwilioRestException) as caught:
        await client.calls(call.sid).update_async(status="completed")
    assert (caught.value.status, caught.value.code) == (404, 20404)


async def test_updating_an_unknown_call_raises_20404(client):
    """An unknown CallSid gets 404 / 20404."""
    with pytest.raises(TwilioRestException) as caught:
        await client.calls("CA" + "0" * 32).update_async(status="completed")
    assert (caught.value.status, caught.value.code) == (404, 20404)


async def test_wrong_token_is_refused_with_20003(api):
    """Bad credentials get 401 / 20003 and are recorded as such."""
    client = Client(api.account_sid, "wrong", http_client=AsyncTwilioHttpClient())
    client.api.base_url = api.base_url
    try:
        with pytest.raises(TwilioRestException) as caught:
            await client.calls.create_async(to=TO, from_=FROM, url=TWIML_URL)
    finally:
        await client.http_client.close()
    assert (caught.value.status, caught.value.code) == (401, 20003)
    assert api.requests[-1].auth_ok is False
    assert api.calls == {}


async def test_missing_auth_is_refused(api):
    """A request without credentials gets 401 with Twilio's body."""
    async with aiohttp.ClientSession() as session:
        async with session.post(calls_url(api), data={"To": TO}) as response:
            assert response.status == 401
            body = await response.json()
    assert (body["code"], body["message"], body["status"]) == (20003, "Authenticate", 401)


@pytest.mark.parametrize("form, code", [
    ({"From": FROM, "Url": TWIML_URL}, 21201),
    ({"To": TO, "Url": TWIML_URL}, 21213),
    ({"To": TO, "From": FROM}, 21205),
])
async def test_create_without_a_required_field_is_refused(api, form, code):
    """Missing To, From, or Url/Twiml gets 400 with Twilio's code."""
    async with aiohttp.ClientSession(headers=basic_auth(api)) as session:
        async with session.post(calls_url(api), data=form) as response:
            assert response.status == 400
            assert (await response.json())["code"] == code


async def test_fetch_answers_200_then_404_for_unknown(api, client):
    """GET of a call resource finds known calls only."""
    call = await client.calls.create_async(to=TO, from_=FROM, url=TWIML_URL)
    fetched = await client.calls(call.sid).fetch_async()
    assert fetched.sid == call.sid
    with pytest.raises(TwilioRestException) as caught:
        await client.calls("CA" + "f" * 32).fetch_async()
    assert caught.value.status == 404


async def test_fail_next_answers_the_next_creates_then_recovers(api, client):
    """fail_next(count=2) fails exactly two creates."""
    api.fail_next(429, {"code": 20429, "message": "Too Many Requests", "status": 429}, count=2)
    for _ in range(2):
        with pytest.raises(TwilioRestException) as caught:
            await client.calls.create_async(to=TO, from_=FROM, url=TWIML_URL)
        assert (caught.value.status, caught.value.code) == (429, 20429)
    call = await client.calls.create_async(to=TO, from_=FROM, url=TWIML_URL)
    assert call.status == "queued"
    assert len(api.calls) == 1


async def test_delay_next_models_a_rest_timeout(api):
    """A delayed create times the client out, yet the call is placed afterwards."""
    api.delay_next(0.2)
    form = {"To": TO, "From": FROM, "Url": TWIML_URL}
    async with aiohttp.ClientSession(headers=basic_auth(api)) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(calls_url(api), data=form,
                                    timeout=aiohttp.ClientTimeout(total=0.05)):
                pass
        request = await api.wait_for_request()
        assert request.value("To") == TO
        assert api.calls == {}  # still being held
        async with session.post(calls_url(api), data=form) as response:
            assert response.status == 201  # the delay was used up by the first request
    # The timed-out create takes effect too, once its delay is over: a "ghost" call.
    await wait_until(lambda: len(api.calls) == 2, what="the delayed create to place its call")


async def test_wait_for_request_times_out(api):
    """wait_for_request raises TimeoutError when nothing matches."""
    with pytest.raises(TimeoutError):
        await api.wait_for_request(lambda r: r.method == "DELETE", timeout=0.05)


async def test_close_releases_a_delayed_request():
    """close() does not wait for a pending delayed answer."""
    api = await FakeTwilioApi().start()
    api.delay_next(30)
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(calls_url(api, "/CA1.json")))
        await api.wait_for_request()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await api.close()
        assert loop.time() - started < 2
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)


async def test_status_callback_is_signed_over_the_given_url(api, client):
    """post_status_callback posts a form the server can validate against its public URL."""
    received: list[tuple[bool, dict[str, str]]] = []
    public = "https://callgate.example/twilio/status"

    async def status(request: web.Request) -> web.Response:
        form = dict(await request.post())
        ok = RequestValidator(api.auth_token).validate(
            public, form, request.headers["X-Twilio-Signature"])
        received.append((ok, form))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/twilio/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        call = await client.calls.create_async(to=TO, from_=FROM, url=TWIML_URL,
                                               status_callback=public)
        api.set_status(call.sid, "in-progress")
        answer = await api.post_status_callback(
            call.sid, "completed", send_to=f"http://127.0.0.1:{port}/twilio/status")
    finally:
        await runner.cleanup()
    assert answer == 204
    ok, form = received[0]
    assert ok
    assert (form["CallSid"], form["CallStatus"], form["To"]) == (call.sid, "completed", TO)
    assert "CallDuration" in form


# --- Account and IncomingPhoneNumbers (what admin doctor reads) --------------------------------

NUMBER = "+14155550100"


async def test_the_account_is_fetched_with_its_status_and_type(api, client):
    """GET Accounts/{Sid}.json answers the account resource twilio-python reads."""
    api.account_type = "Trial"
    account = await client.api.v2010.accounts(api.account_sid).fetch_async()
    assert (account.sid, account.status, account.type) == (api.account_sid, "active", "Trial")


async def test_the_account_refuses_a_wrong_token_with_20003(api):
    """Wrong credentials on the account fetch: 401 / 20003, as for every resource."""
    client = Client(api.account_sid, "wrong", http_client=AsyncTwilioHttpClient())
    client.api.base_url = api.base_url
    try:
        with pytest.raises(TwilioRestException) as caught:
            await client.api.v2010.accounts(api.account_sid).fetch_async()
    finally:
        await client.http_client.close()
    assert (caught.value.status, caught.value.code) == (401, 20003)


async def test_a_number_is_listed_with_its_voice_configuration(api, client):
    """The PhoneNumber filter finds the number, with voice_url, methods and status_callback."""
    api.add_number(NUMBER, voice_url="https://callgate.example/twiml", voice_method="GET",
                   status_callback="https://callgate.example/twilio/status")
    api.add_number("+14155550199")
    [number] = await client.incoming_phone_numbers.list_async(phone_number=NUMBER)
    assert number.phone_number == NUMBER and number.sid.startswith("PN") and len(number.sid) == 34
    assert (number.voice_url, number.voice_method) == ("https://callgate.example/twiml", "GET")
    assert (number.status_callback, number.status_callback_method) == ("https://callgate.example/twilio/status", "POST")
    assert (number.voice_application_sid, number.trunk_sid, number.account_sid) == (None, None, api.account_sid)


async def test_the_filter_matches_parts_and_wildcards(api, client):
    """PhoneNumber matches part of a number, '*' standing for any digit, as Twilio's does."""
    for number in ("+14155550100", "+14155550199", "+61291234567"):
        api.add_number(number)
    found = await client.incoming_phone_numbers.list_async(phone_number="555*1**")
    assert sorted(n.phone_number for n in found) == ["+14155550100", "+14155550199"]


async def test_another_account_s_numbers_are_not_listed(api, client):
    """A number on another account is not on this one's list."""
    api.add_number(NUMBER, account_sid="AC" + "0" * 32)
    assert await client.incoming_phone_numbers.list_async(phone_number=NUMBER) == []


async def test_pages_are_followed_by_next_page_uri(api, client):
    """With PageSize 2, five numbers take three pages; twilio-python follows next_page_uri."""
    for k in range(5):
        api.add_number(f"+1415555010{k}")
    found = await client.incoming_phone_numbers.list_async(page_size=2)
    assert sorted(n.phone_number for n in found) == [f"+1415555010{k}" for k in range(5)]
    pages = [r for r in api.requests if r.path.endswith("/IncomingPhoneNumbers.json")]
    assert [r.value("Page") for r in pages] == [None, "1", "2"]


async def test_a_page_size_out_of_range_is_refused(api):
    """PageSize above 1000 gets 400 with Twilio's error body."""
    url = f"{api.base_url}/2010-04-01/Accounts/{api.account_sid}/IncomingPhoneNumbers.json?PageSize=1001"
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": aiohttp.encode_basic_auth(api.account_sid, api.auth_token)}
        async with session.get(url, headers=auth) as response:
            assert response.status == 400
            assert (await response.json())["code"] == 20001

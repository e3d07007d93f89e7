"""The fake Twilio REST API's Account and IncomingPhoneNumbers resources (what the doctor
reads), driven by twilio-python's own async client, as in test_tools_fake_twilio_api.py."""

from __future__ import annotations

import aiohttp
import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from tools.fake_twilio_api import FakeTwilioApi

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:twilio")

NUMBER = "+14155550100"


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

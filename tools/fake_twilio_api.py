"""A loopback stand-in for Twilio's REST API (2010-04-01: Calls, the Account, IncomingPhoneNumbers).

This machine cannot reach Twilio, so Callgate's tests and developers point
``TWILIO_API_BASE_URL`` at this server instead. It speaks the real wire format, close
enough that twilio-python's own client (sync or ``AsyncTwilioHttpClient``) works against
it unchanged:

- form-encoded POSTs, HTTP Basic auth ``AccountSid:AuthToken``; wrong or missing
  credentials get 401 / code 20003;
- ``POST .../Calls.json`` creates a call (201, status ``queued``);
- ``POST .../Calls/{CallSid}.json`` with ``Status=completed`` or ``canceled`` ends it;
  an unknown or already ended call gets 404 / code 20404, as real Twilio answers;
- ``GET .../Calls/{CallSid}.json`` fetches it;
- ``GET /2010-04-01/Accounts/{AccountSid}.json`` fetches the account (``account_status``,
  ``account_type``);
- ``GET .../IncomingPhoneNumbers.json`` lists the account's numbers (``add_number``), one
  page at a time (``PageSize`` 1-1000, default 50, and ``Page``; ``next_page_uri`` links the
  next), filtered by ``PhoneNumber`` (part of a number, ``*`` for any digit),
  ``FriendlyName``, ``Origin`` and ``Beta``, as Twilio does.

Every request is recorded (``api.requests``), and faults can be injected: canned error
answers (``fail_next``) and slow answers that model a REST timeout (``delay_next``).
It places no calls: a test moves a call along with ``set_status`` and, if it wants, has
the fake post a signed status callback with ``post_status_callback``.

    async with FakeTwilioApi() as api:
        client.api.base_url = api.base_url
        ...

    python tools/fake_twilio_api.py --port 9200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

log = logging.getLogger("fake_twilio_api")

API_VERSION = "2010-04-01"
ERRORS_URL = "https://www.twilio.com/docs/errors/{code}"
MAX_PAGE_SIZE = 1000  # Twilio's largest PageSize
ENDED_STATUSES = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
# The values Twilio accepts for ``Status`` when updating a call.
UPDATE_STATUSES = frozenset({"completed", "canceled"})


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters and 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


def twilio_error(code: int, message: str, status: int, **extra: Any) -> dict[str, Any]:
    """The JSON body Twilio answers with when a request fails."""
    return {"code": code, "message": message, "more_info": ERRORS_URL.format(code=code),
            "status": status, **extra}


def rfc2822(moment: datetime | None) -> str | None:
    """Twilio's date format in call resources: ``Tue, 31 Aug 2010 20:36:28 +0000``."""
    return format_datetime(moment) if moment else None


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it (recorded before any delay or answer)."""

    method: str
    path: str
    # The POST body fields (or, for other methods, the query string), every value kept:
    # Twilio repeats a field for list parameters such as StatusCallbackEvent.
    form: dict[str, list[str]]
    auth_ok: bool
    time: float  # time.monotonic() at arrival

    def value(self, name: str) -> str | None:
        """The first value of a form field, or None."""
        values = self.form.get(name)
        return values[0] if values else None


@dataclass
class FakeCall:
    """One call's state, as created through the API."""

    sid: str
    account_sid: str
    to: str
    from_: str
    url: str | None
    twiml: str | None
    status_callback: str | None
    status_callback_events: list[str]
    status_callback_method: str
    timeout: str | None
    machine_detection: str | None
    status: str = "queued"
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))
    date_updated: datetime = field(default_factory=lambda: datetime.now(UTC))
    start_time: datetime | None = None
    end_time: datetime | None = None

    @property
    def uri(self) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}.json"

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATUSES

    @property
    def duration(self) -> str | None:
        if self.start_time and self.end_time:
            return str(int((self.end_time - self.start_time).total_seconds()))
        return None

    def move_to(self, status: str) -> None:
        """Change the status, stamping start and end times as Twilio does."""
        now = datetime.now(UTC)
        if status == "in-progress" and self.start_time is None:
            self.start_time = now
        if status in ENDED_STATUSES and self.end_time is None:
            self.end_time = now
        self.status = status
        self.date_updated = now

    def resource(self) -> dict[str, Any]:
        """The JSON call resource, with the fields twilio-python's CallInstance reads."""
        base = self.uri.removesuffix(".json")
        return {
            "sid": self.sid,
            "date_created": rfc2822(self.date_created),
            "date_updated": rfc2822(self.date_updated),
            "parent_call_sid": None,
            "account_sid": self.account_sid,
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "phone_number_sid": None,
            "status": self.status,
            "start_time": rfc2822(self.start_time),
            "end_time": rfc2822(self.end_time),
            "duration": self.duration,
            "price": None,
            "price_unit": "USD",
            "direction": "outbound-api",
            "answered_by": None,
            "api_version": API_VERSION,
            "forwarded_from": None,
            "group_sid": None,
            "caller_name": None,
            "queue_time": "0",
            "trunk_sid": None,
            "uri": self.uri,
            "subresource_uris": {
                name: f"{base}/{name.title().replace('_', '')}.json"
                for name in ("notifications", "recordings", "payments", "events", "siprec",
                             "streams", "user_defined_message_subscriptions",
                             "user_defined_messages")
            },
        }


@dataclass
class FakeNumber:
    """One IncomingPhoneNumber: a number on an account, with its voice configuration (the
    Console's "A call comes in" is ``voice_url``/``voice_method``, "Call status changes" is
    ``status_callback``/``status_callback_method``). Unset URLs are empty strings, unset SIDs
    None, as Twilio answers."""

    sid: str
    account_sid: str
    phone_number: str
    voice_url: str = ""
    voice_method: str = "POST"
    status_callback: str = ""
    status_callback_method: str = "POST"
    voice_fallback_url: str = ""
    voice_fallback_method: str = "POST"
    voice_application_sid: str | None = None  # a TwiML App handles the calls instead of voice_url
    trunk_sid: str | None = None              # an Elastic SIP Trunk does
    voice_receive_mode: str = "voice"         # or "fax"
    friendly_name: str = ""
    origin: str = "twilio"
    beta: bool = False
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def uri(self) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}/IncomingPhoneNumbers/{self.sid}.json"

    def resource(self) -> dict[str, Any]:
        """The JSON resource, with the fields twilio-python's IncomingPhoneNumberInstance reads."""
        return {
            "account_sid": self.account_sid,
            "address_requirements": "none",
            "address_sid": None,
            "api_version": API_VERSION,
            "beta": self.beta,
            "capabilities": {"voice": True, "sms": True, "mms": True, "fax": False},
            "date_created": rfc2822(self.date_created),
            "date_updated": rfc2822(self.date_created),
            "emergency_status": "Inactive",
            "emergency_address_sid": None,
            "emergency_address_status": "unregistered",
            "friendly_name": self.friendly_name or self.phone_number,
            "identity_sid": None,
            "origin": self.origin,
            "phone_number": self.phone_number,
            "sid": self.sid,
            "sms_application_sid": None,
            "sms_fallback_method": "POST",
            "sms_fallback_url": "",
            "sms_method": "POST",
            "sms_url": "",
            "status_callback": self.status_callback,
            "status_callback_method": self.status_callback_method,
            "trunk_sid": self.trunk_sid,
            "uri": self.uri,
            "voice_receive_mode": self.voice_receive_mode,
            "voice_application_sid": self.voice_application_sid,
            "voice_caller_id_lookup": False,
            "voice_fallback_method": self.voice_fallback_method,
            "voice_fallback_url": self.voice_fallback_url,
            "voice_method": self.voice_method,
            "voice_url": self.voice_url,
            "bundle_sid": None,
            "status": "in-use",
            "type": "local",
            "subresource_uris": {"assigned_add_ons": self.uri.removesuffix(".json") + "/AssignedAddOns.json"},
        }

    def matches(self, query) -> bool:
        """Whether the list filters in ``query`` (PhoneNumber, FriendlyName, Origin, Beta) keep it."""
        wanted = query.get("PhoneNumber")
        if wanted and not re.search("".join(r"\d" if c == "*" else re.escape(c) for c in wanted),
                                    self.phone_number):
            return False
        if "FriendlyName" in query and query["FriendlyName"] != (self.friendly_name or self.phone_number):
            return False
        if "Origin" in query and query["Origin"] != self.origin:
            return False
        # Beta numbers are listed unless Beta=false.
        return not (self.beta and query.get("Beta", "true").lower() == "false")


@dataclass
class _Fault:
    """An injected answer for the next ``remaining`` matching requests."""

    remaining: int
    status: int = 0
    body: dict[str, Any] | None = None
    delay: float = 0.0


class FakeTwilioApi:
    """Twilio's Calls REST resource on 127.0.0.1, port chosen by the OS unless given.

    ``await api.start()`` returns the api; ``api.base_url`` is then
    ``http://127.0.0.1:<port>``, the value for ``TWILIO_API_BASE_URL`` or for
    twilio-python's ``client.api.base_url``. ``await api.close()`` stops it; a delayed
    answer still pending is released at once rather than holding the shutdown.
    """

    def __init__(self, account_sid: str | None = None, auth_token: str = "test-token", *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.account_sid = account_sid or new_sid("AC")
        self.auth_token = auth_token
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, FakeCall] = {}
        self.numbers: dict[str, FakeNumber] = {}  # by PN... SID
        self.account_status = "active"  # or "suspended", "closed"
        self.account_type = "Full"      # or "Trial"
        self.friendly_name = "Callgate test account"
        self._create_faults: list[_Fault] = []
        self._delays: list[_Fault] = []
        self._recorded = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._runner is None:
            raise RuntimeError("FakeTwilioApi is not started: await api.start() first")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeTwilioApi:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port the OS picked, if it was 0
        return self

    async def close(self) -> None:
        self._closing.set()  # wakes delayed answers so cleanup does not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTwilioApi:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record_and_authenticate])
        account = f"/{API_VERSION}/Accounts/{{account_sid}}"
        calls = account + "/Calls"
        app.router.add_post(calls + ".json", self._create_call)
        app.router.add_post(calls + "/{call_sid}.json", self._update_call)
        app.router.add_get(calls + "/{call_sid}.json", self._fetch_call)
        app.router.add_get(account + ".json", self._fetch_account)
        app.router.add_get(account + "/IncomingPhoneNumbers.json", self._list_numbers)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    # -- fault injection and inspection ----------------------------------------------

    def add_number(self, phone_number: str, *, account_sid: str | None = None, **fields: Any) -> FakeNumber:
        """Put a number on the account (or on ``account_sid``, another one) with the voice
        configuration in ``fields`` (FakeNumber's: ``voice_url``, ``status_callback``...)."""
        number = FakeNumber(sid=new_sid("PN"), account_sid=account_sid or self.account_sid,
                            phone_number=phone_number, **fields)
        self.numbers[number.sid] = number
        return number

    def fail_next(self, status: int, body: dict[str, Any], count: int = 1) -> None:
        """Answer the next ``count`` authenticated create-call requests with this error."""
        self._create_faults.append(_Fault(remaining=count, status=status, body=body))

    def delay_next(self, seconds: float, count: int = 1) -> None:
        """Hold the next ``count`` requests (any kind) this long before answering.

        The request is recorded at once and takes effect after the wait, even if the
        client gave up meanwhile: like a real REST timeout, the caller cannot know
        whether a call was placed.
        """
        self._delays.append(_Fault(remaining=count, delay=seconds))

    async def wait_for_request(self, predicate: Callable[[RecordedRequest], bool] | None = None,
                               timeout: float = 5) -> RecordedRequest:
        """The first recorded request matching ``predicate`` (any, if None), waiting for it.

        Raises TimeoutError if none arrives within ``timeout`` seconds.
        """
        def first_match() -> RecordedRequest | None:
            return next((r for r in self.requests if predicate is None or predicate(r)), None)

        async with self._recorded:
            async with asyncio.timeout(timeout):
                return await self._recorded.wait_for(first_match)

    def set_status(self, call_sid: str, status: str) -> FakeCall:
        """Move a call along (``ringing``, ``in-progress``, ``completed``...), as the
        network would; for example to model the callee hanging up."""
        call = self.calls[call_sid]
        call.move_to(status)
        return call

    async def post_status_callback(self, call_sid: str, status: str | None = None, *,
                                   send_to: str | None = None) -> int:
        """Post Twilio's status callback for a call to its ``StatusCallback`` URL.

        ``status`` first moves the call to that status. The request is signed over the
        StatusCallback URL exactly as given at creation; ``send_to`` sends it elsewhere
        (a loopback address when that URL names a public host). Returns the HTTP status.
        """
        call = self.calls[call_sid]
        if status is not None:
            call.move_to(status)
        if not call.status_callback:
            raise ValueError(f"call {call_sid} was created without a StatusCallback")
        form = {
            "CallSid": call.sid, "AccountSid": call.account_sid, "From": call.from_,
            "To": call.to, "Direction": "outbound-api", "CallStatus": call.status,
            "ApiVersion": API_VERSION, "CallbackSource": "call-progress-events",
            "Timestamp": rfc2822(call.date_updated) or "",
        }
        if call.duration is not None:
            form["CallDuration"] = call.duration
        from twilio.request_validator import RequestValidator  # only this helper needs it

        signature = RequestValidator(self.auth_token).compute_signature(call.status_callback,
                                                                        form)
        async with aiohttp.ClientSession() as session:
            async with session.post(send_to or call.status_callback, data=form,
                                    headers={"X-Twilio-Signature": signature}) as response:
                return response.status

    # -- request handling -------------------------------------------------------------

    @web.middleware
    async def _record_and_authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        form = await request.post() if request.method == "POST" else request.query
        auth_ok = self._authenticated(request.headers.get("Authorization"))
        recorded = RecordedRequest(
            method=request.method, path=request.path,
            form={name: form.getall(name) for name in form.keys()},
            auth_ok=auth_ok, time=time.monotonic(),
        )
        async with self._recorded:
            self.requests.append(recorded)
            self._recorded.notify_all()
        log.info("%s %s auth=%s %s", request.method, request.path, auth_ok, recorded.form)

        delay = self._take(self._delays)
        if delay is not None:
            # Released early on close(), so a test's shutdown never waits for a delay.
            try:
                await asyncio.wait_for(self._closing.wait(), delay.delay)
            except TimeoutError:
                pass
        if not auth_ok:
            return web.json_response(
                twilio_error(20003, "Authenticate", 401,
                             detail="Your AccountSid or AuthToken was incorrect."),
                status=401, headers={"WWW-Authenticate": 'Basic realm="Twilio API"'})
        return await handler(request)

    def _authenticated(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return (hmac.compare_digest(user, self.account_sid)
                and hmac.compare_digest(password, self.auth_token))

    @staticmethod
    def _take(faults: list[_Fault]) -> _Fault | None:
        """Use up one occurrence of the oldest pending fault."""
        if not faults:
            return None
        fault = faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            faults.pop(0)
        return fault

    def _not_found_body(self, path: str) -> dict[str, Any]:
        return twilio_error(20404, f"The requested resource {path} was not found", 404)

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.json_response(self._not_found_body(request.path), status=404)

    def _call_or_none(self, request: web.Request) -> FakeCall | None:
        call = self.calls.get(request.match_info["call_sid"])
        if call is None or call.account_sid != request.match_info["account_sid"]:
            return None
        return call

    async def _create_call(self, request: web.Request) -> web.Response:
        if request.match_info["account_sid"] != self.account_sid:
            return await self._not_found(request)
        fault = self._take(self._create_faults)
        if fault is not None:
            return web.json_response(fault.body, status=fault.status)
        form = await request.post()
        problem = self._create_problem(form)
        if problem is not None:
            return web.json_response(problem, status=400)
        call = FakeCall(
            sid=new_sid("CA"), account_sid=self.account_sid, to=form["To"],
            from_=form["From"], url=form.get("Url"), twiml=form.get("Twiml"),
            status_callback=form.get("StatusCallback"),
            status_callback_events=form.getall("StatusCallbackEvent", []),
            status_callback_method=form.get("StatusCallbackMethod", "POST"),
            timeout=form.get("Timeout"), machine_detection=form.get("MachineDetection"),
        )
        self.calls[call.sid] = call
        return web.json_response(call.resource(), status=201)

    @staticmethod
    def _create_problem(form) -> dict[str, Any] | None:
        """The error Twilio would answer for a create-call form, or None if it is fine."""
        if not form.get("To"):
            return twilio_error(21201, "No 'To' number is specified", 400)
        if not form.get("From"):
            return twilio_error(21213, "No 'From' number is specified", 400)
        if not form.get("Url") and not form.get("Twiml") and not form.get("ApplicationSid"):
            return twilio_error(21205, "Url parameter is required. Either Url, Twiml or "
                                       "ApplicationSid must be given.", 400)
        if form.get("Url") and not form["Url"].startswith(("http://", "https://")):
            return twilio_error(21205, f"Url is not a valid URL: {form['Url']}", 400)
        timeout = form.get("Timeout")
        if timeout is not None and not (timeout.isdigit() and 1 <= int(timeout) <= 600):
            return twilio_error(21216, f"Timeout must be an integer between 1 and 600: "
                                       f"{timeout}", 400)
        return None

    async def _fetch_account(self, request: web.Request) -> web.Response:
        sid = request.match_info["account_sid"]
        if sid != self.account_sid:
            return await self._not_found(request)
        now = rfc2822(datetime.now(UTC))
        base = f"/{API_VERSION}/Accounts/{sid}"
        return web.json_response({
            # Twilio's Account resource carries the auth token: a client must never show it.
            "auth_token": self.auth_token,
            "date_created": now, "date_updated": now,
            "friendly_name": self.friendly_name,
            "owner_account_sid": sid,
            "sid": sid,
            "status": self.account_status,
            "subresource_uris": {name: f"{base}/{name.title().replace('_', '')}.json"
                                 for name in ("calls", "incoming_phone_numbers", "applications",
                                              "recordings", "queues", "conferences", "messages")},
            "type": self.account_type,
            "uri": base + ".json",
        })

    async def _list_numbers(self, request: web.Request) -> web.Response:
        account_sid = request.match_info["account_sid"]
        if account_sid != self.account_sid:
            return await self._not_found(request)
        query = request.query
        try:
            size = int(query.get("PageSize", "50"))
            page = int(query.get("Page", "0"))
        except ValueError:
            size = page = -1
        if not 1 <= size <= MAX_PAGE_SIZE or page < 0:
            return web.json_response(twilio_error(
                20001, f"PageSize must be 1 to {MAX_PAGE_SIZE} and Page a whole number", 400), status=400)
        found = [n for n in self.numbers.values() if n.account_sid == account_sid and n.matches(query)]
        found.sort(key=lambda n: n.date_created, reverse=True)  # newest first, as Twilio lists them
        start = page * size
        shown = found[start:start + size]
        filters = {k: query[k] for k in ("Beta", "FriendlyName", "PhoneNumber", "Origin") if k in query}

        def page_uri(n: int) -> str:
            return f"{request.path}?{urlencode({**filters, 'PageSize': size, 'Page': n})}"

        return web.json_response({
            "end": start + max(len(shown) - 1, 0),
            "first_page_uri": page_uri(0),
            "incoming_phone_numbers": [n.resource() for n in shown],
            "next_page_uri": page_uri(page + 1) if start + size < len(found) else None,
            "page": page,
            "page_size": size,
            "previous_page_uri": page_uri(page - 1) if page > 0 else None,
            "start": start,
            "uri": page_uri(page),
        })

    async def _update_call(self, request: web.Request) -> web.Response:
        call = self._call_or_none(request)
        if call is None or call.ended:
            # What Twilio answers for an unknown call, and for one that already ended.
            return await self._not_found(request)
        form = await request.post()
        status = form.get("Status")
        if status is not None and status not in UPDATE_STATUSES:
            return web.json_response(
                twilio_error(20001, f"Status must be one of completed, canceled: {status}", 400),
                status=400)
        if form.get("Url"):
            call.url = form["Url"]
        if form.get("Twiml"):
            call.twiml = form["Twiml"]
        if status is not None:
            call.move_to(status)
        return web.json_response(call.resource())

    async def _fetch_call(self, request: web.Request) -> web.Response:
        call = self._call_or_none(request)
        if call is None:
            return await self._not_found(request)
        return web.json_response(call.resource())


async def _serve(args: argparse.Namespace) -> None:
    api = FakeTwilioApi(args.account_sid, args.auth_token, host=args.host, port=args.port)
    async with api:
        print(f"Fake Twilio REST API on {api.base_url}")
        print(f"  TWILIO_API_BASE_URL={api.base_url}")
        print(f"  TWILIO_ACCOUNT_SID={api.account_sid}")
        print(f"  TWILIO_AUTH_TOKEN={api.auth_token}")
        print("Ctrl-C to stop.", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200, help="0 lets the OS choose")
    parser.add_argument("--account-sid", default=None, help="default: a random AC... SID")
    parser.add_argument("--auth-token", default="test-token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

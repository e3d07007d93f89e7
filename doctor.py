"""``python server.py admin doctor``: checks a deployment from the operator's shell.

One line per finding, ``ok``, ``warn``, ``FAIL`` or ``skip`` (not checked, because of a
failure above), each FAIL and warn followed by the fix; exit status 1 when anything FAILs::

    ok    database           DATABASE_URL: PostgreSQL 18.1 at db.internal:5432/callgate answers in 2 ms
    FAIL  Twilio number US   +1415•••0100: "A call comes in" points at https://old.example/twiml
          fix: Twilio Console → Phone Numbers → ...

What is checked, in this order (docs/doctor.md lists every line and its fix): the
configuration's own warnings, the phone key, the signing secrets; then, concurrently, the
database and its schema, PUBLIC_URL and its /healthz, the Twilio account and each caller-id
number's voice configuration, and an OpenAI Realtime session opened the way a call opens one.

The doctor changes nothing: it reads ``schema_migrations`` and never migrates (server.py
routes here before any migration), it asks the model for no response, and it reads the
numbers' configuration without updating it. Every network check is bounded in time and
reports a failure as a line, never a traceback. No secret and no full phone number is
printed: numbers are masked as in the logs, and every line is scrubbed of the configured
secrets' values before it is printed, whatever a peer echoed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import websockets
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

import scenarios
from bridge import functions, realtime
from bridge.realtime_client import ModelConnection, ModelError, RealtimeConnector
from config import (
    CLOSE_TIMEOUT_S,
    DEVELOPMENT_PHONE_KEY,
    MIN_PRODUCTION_KEY_LENGTH,
    VARIABLES,
    VERSION,
    Secret,
    Settings,
)
from db.database import server_settings
from db.embedded import EmbeddedPostgres, EmbeddedPostgresError
from db.sql import Queries, migrations
from limiter.phone import mask

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
HTTP_TIMEOUT_S = 10.0         # PUBLIC_URL's /healthz
DB_CONNECT_TIMEOUT_S = 5.0    # as the server's pool (db/database.py)
DB_CHECK_TIMEOUT_S = 10.0     # the connection and the few statements after it
DEFAULTS = {v.name: v.default for v in VARIABLES}
CONSOLE_NUMBER = "Twilio Console → Phone Numbers → Manage → Active numbers → {number} → Voice Configuration"


@dataclass(frozen=True)
class Finding:
    status: str   # OK, WARN, FAIL or SKIP
    check: str    # what was looked at: "database", "Twilio number US"...
    text: str     # what was found
    fix: str = ""  # for WARN and FAIL: what to change, naming the variable or the console setting

    def render(self) -> str:
        line = f"{self.status:<5} {self.check:<19} {self.text}"
        return line + (f"\n{'':<6}fix: {self.fix}" if self.fix else "")


async def run(settings: Settings) -> int:
    """Run every check, print the findings, and return the exit status (1: something FAILs)."""
    scrub = scrubber(settings)
    print(scrub(f"Callgate {VERSION} doctor: CALLGATE_ENV={settings.env}, PUBLIC_URL {shown_url(settings.public_url)}"))
    findings = [*configuration(settings), *phone_key(settings), *signing_secrets(settings)]
    for finding in findings:
        print(scrub(finding.render()), flush=True)
    checks = (("database", database), ("PUBLIC_URL", public_url), ("Twilio", twilio), ("OpenAI", openai_realtime))
    for found in await asyncio.gather(*(guarded(name, check, settings) for name, check in checks)):
        for finding in found:
            print(scrub(finding.render()))
        findings += found
    failed = sum(f.status == FAIL for f in findings)
    warned = sum(f.status == WARN for f in findings)
    print(f"{failed} to fix, {warned} warning(s)" if failed else
          f"everything checked is ok ({warned} warning(s))" if warned else "everything checked is ok")
    return 1 if failed else 0


async def guarded(name: str, check: Callable[[Settings], Awaitable[list[Finding]]],
                  settings: Settings) -> list[Finding]:
    """A check that breaks in a way nobody foresaw still ends as a line, not a traceback."""
    try:
        return await check(settings)
    except Exception as exc:  # noqa: BLE001 - the doctor's whole point is to say what failed
        return [Finding(FAIL, name, f"the check itself failed: {type(exc).__name__}: {str(exc)[:200]}",
                        "run the doctor again; if it repeats, report it with this line")]


# --- what is never printed --------------------------------------------------------------------


_E164 = re.compile(r"\+\d{8,15}\b")


def scrubber(settings: Settings) -> Callable[[str], str]:
    """A function that removes every configured secret's value, and masks every E.164 number
    (a peer's message may quote one), from a line about to be printed."""
    values = []
    for var in VARIABLES:
        if var.secret:
            value = getattr(settings, var.field)
            for secret in value if isinstance(value, tuple) else (value,):
                if isinstance(secret, Secret) and len(secret.value) >= 4:
                    values.append(secret.value)
    for dsn in (settings.database_url, settings.fly_database_url):
        if dsn and len(password := urlsplit(dsn.value).password or "") >= 4:
            values.append(password)  # a driver's message could quote it without the rest of the DSN
    values.sort(key=len, reverse=True)  # a secret that contains another goes first

    def scrub(text: str) -> str:
        for value in values:
            text = text.replace(value, "(hidden)")
        return _E164.sub(lambda m: mask(m.group()), text)

    return scrub


def shown_url(url: str) -> str:
    """A URL without what may be secret in it: user and password, and the query."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"  # IPv6
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + ("?…" if parts.query else "")


def network_problem(exc: BaseException, seconds: float) -> str:
    """What a failed connection looked like, in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {seconds:g} s"
    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OSError | TimeoutError):
        cause = cause.__cause__  # ModelError and friends chain the socket's own error
    if isinstance(cause, TimeoutError):
        return f"no answer within {seconds:g} s"
    if isinstance(cause, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        return "its TLS certificate is not trusted"
    if isinstance(cause, aiohttp.ClientConnectorDNSError | socket.gaierror):
        return "the host name does not resolve"
    os_error = cause.os_error if isinstance(cause, aiohttp.ClientConnectorError) else cause
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, OSError) and os_error.strerror:
        return f"unreachable ({os_error.strerror})"
    # e.g. asyncio's "Multiple exceptions: [Errno 111] Connect call failed ..." for a name with
    # several addresses
    return f"unreachable ({str(cause)[:160] or type(cause).__name__})"


# --- configuration ----------------------------------------------------------------------------


def configuration(settings: Settings) -> list[Finding]:
    """What config.Settings.checked warned about (each warning names its fix)."""
    if not settings.warnings:
        return [Finding(OK, "configuration", "read without warnings")]
    return [Finding(WARN, "configuration", warning) for warning in settings.warnings]


def phone_key(settings: Settings) -> list[Finding]:
    """The key every phone hash is made with: hashes persist, so a wrong key is fixed early."""
    key = settings.phone_key.value
    fix = ("set PHONE_ENCRYPTION_KEY to a random key of its own (`openssl rand -hex 32`; on Fly.io "
           "`fly secrets set PHONE_ENCRYPTION_KEY=$(openssl rand -hex 32)`); to keep the counts made "
           "under the old key, put the old one in PHONE_ENCRYPTION_PREVIOUS_KEYS")
    if key == DEVELOPMENT_PHONE_KEY:
        return [Finding(FAIL, "phone key", "PHONE_ENCRYPTION_KEY is the development key, which is public in "
                        "Callgate's source: anyone who can read the database can recover the numbers from their "
                        "hashes", fix)]
    if len(key) < MIN_PRODUCTION_KEY_LENGTH:
        return [Finding(FAIL, "phone key", f"PHONE_ENCRYPTION_KEY has {len(key)} characters; production needs "
                        f"at least {MIN_PRODUCTION_KEY_LENGTH}", fix)]
    previous = len(settings.phone_previous_keys)
    return [Finding(OK, "phone key", f"PHONE_ENCRYPTION_KEY set ({len(key)} characters, not the development key)"
                    + (f"; {previous} previous key(s) still honoured" if previous else ""))]


def signing_secrets(settings: Settings) -> list[Finding]:
    """Twilio's credentials and signing keys, and ADMIN_TOKEN, as a set that works together."""
    sid, token, shared = settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_shared_key
    found = []
    if sid and token:
        found.append(Finding(OK, "Twilio credentials", "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN set: Twilio's "
                             "requests are signature-checked, REST calls are on"))
    elif sid:
        found.append(Finding(FAIL, "Twilio credentials", "TWILIO_ACCOUNT_SID is set but TWILIO_AUTH_TOKEN is not: "
                             "REST calls (hang-ups, call.start) are off"
                             + ("" if shared else " and Twilio's requests are NOT signature-checked"),
                             "set TWILIO_AUTH_TOKEN to the account's Auth Token (Twilio Console → Account → "
                             "API keys & tokens → Live credentials)"))
    elif token:
        found.append(Finding(FAIL, "Twilio credentials", "TWILIO_AUTH_TOKEN is set but TWILIO_ACCOUNT_SID is not: "
                             "REST calls are off and a Media Stream's account is not checked",
                             "set TWILIO_ACCOUNT_SID to the account's SID (AC…, Twilio Console → Account "
                             "Info)"))
    else:
        found.append(Finding(WARN, "Twilio credentials", "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are not set: "
                             "Twilio's requests are NOT signature-checked and REST calls are off "
                             "(development only: production refuses to start like this)",
                             "set both from Twilio Console → Account → API keys & tokens"))
    if shared and not token:
        found.append(Finding(FAIL, "webhook shared key", "TWILIO_WEBHOOK_SHARED_KEY is set without "
                             "TWILIO_AUTH_TOKEN: every request Twilio signs with the auth token (any not "
                             "covered by a Webhooks rule) is refused with 403", "set TWILIO_AUTH_TOKEN too"))
    elif shared:
        found.append(Finding(OK, "webhook shared key", "TWILIO_WEBHOOK_SHARED_KEY set: requests a Twilio "
                             "Webhooks rule signs are checked with it"))
    else:
        found.append(Finding(OK, "webhook shared key", "TWILIO_WEBHOOK_SHARED_KEY not set: fine unless a Twilio "
                             "Webhooks rule signs requests to Callgate (those would be refused with 403)"))
    if settings.admin_token:
        found.append(Finding(OK, "ADMIN_TOKEN", "set: /admin/stats and the all-calls monitor are on"))
    else:
        found.append(Finding(FAIL if settings.production else WARN, "ADMIN_TOKEN",
                             "not set: /admin/stats and the all-calls monitor are disabled (403)",
                             "set ADMIN_TOKEN to a long random token (`openssl rand -hex 32`)"))
    return found


# --- the database -----------------------------------------------------------------------------


class NoDatabase(Exception):
    """Neither a DSN nor an embedded database to check."""


@contextlib.asynccontextmanager
async def database_source(settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """(DSN, what it is called) for the database the server would use. The embedded one is
    adopted when it runs (it is the server's: left running), else started for the check and
    stopped after, as the other admin commands do."""
    if settings.dsn is not None:
        yield settings.dsn.value, "DATABASE_URL" if settings.database_url else "FLY_DATABASE_URL"
        return
    embedded = EmbeddedPostgres(settings.data_dir.resolve() / "pg")
    if not (embedded.data_dir / "PG_VERSION").exists():
        raise NoDatabase(f"no DATABASE_URL or FLY_DATABASE_URL, and no embedded database in {embedded.data_dir}")
    pid_file = embedded.data_dir / "postmaster.pid"
    before = _read(pid_file)
    dsn = await asyncio.to_thread(embedded.start)
    started_here = _read(pid_file) != before  # a new postmaster wrote its own pid file
    try:
        yield dsn, f"embedded PostgreSQL ({embedded.data_dir})"
    finally:
        if started_here:
            await asyncio.shield(asyncio.to_thread(embedded.stop))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _where(dsn: str) -> str:
    """host:port/database of a DSN: never its user or password."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


async def database(settings: Settings) -> list[Finding]:
    """The database answers, in time for LIMITER_TIMEOUT_MS, and its schema is current."""
    not_checked = Finding(SKIP, "schema", "not checked: the database does not answer")
    fix = ("set DATABASE_URL to the PostgreSQL DSN (on Fly.io `fly postgres attach` sets it), or start the "
           "server once here to create the embedded database")
    try:
        async with database_source(settings) as (dsn, source):
            return await _check_database(settings, dsn, source)
    except NoDatabase as exc:
        return [Finding(FAIL, "database", str(exc), fix), not_checked]
    except EmbeddedPostgresError as exc:
        return [Finding(FAIL, "database", f"the embedded PostgreSQL does not start: {str(exc)[:300]}", fix),
                not_checked]


async def _check_database(settings: Settings, dsn: str, source: str) -> list[Finding]:
    where = _where(dsn)
    not_checked = Finding(SKIP, "schema", "not checked: the database does not answer")
    try:
        async with asyncio.timeout(DB_CHECK_TIMEOUT_S):
            conn = await asyncpg.connect(dsn, timeout=DB_CONNECT_TIMEOUT_S,
                                         server_settings=server_settings(settings.database_timeout_ms))
    except (OSError, TimeoutError) as exc:
        return [Finding(FAIL, "database", f"{source}: PostgreSQL at {where} is unreachable: "
                        f"{network_problem(exc, DB_CONNECT_TIMEOUT_S)}",
                        f"check the host and port in {source} and that the database server runs"), not_checked]
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        return [Finding(FAIL, "database", f"{source}: PostgreSQL at {where} refused the login: {exc}",
                        f"check the user and password in {source}"), not_checked]
    except asyncpg.InvalidCatalogNameError as exc:
        return [Finding(FAIL, "database", f"{source}: {exc}",
                        f"create that database, or fix the database name in {source}"), not_checked]
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return [Finding(FAIL, "database", f"{source}: PostgreSQL at {where} refused the connection: "
                        f"{type(exc).__name__}: {exc}", f"check {source}"), not_checked]
    try:
        async with asyncio.timeout(DB_CHECK_TIMEOUT_S):
            began = time.monotonic()
            await conn.fetchval(Queries.load().database_ping)
            took_ms = (time.monotonic() - began) * 1000
            version = await conn.fetchval("SHOW server_version")
            try:
                applied = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]
            except asyncpg.UndefinedTableError:
                applied = []  # never migrated: every migration is pending
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)
    text = f"{source}: PostgreSQL {version.split()[0]} at {where} answers in {took_ms:.0f} ms"
    if took_ms > settings.database_timeout_ms / 2:
        found = [Finding(WARN, "database", text + f", over half of LIMITER_TIMEOUT_MS={settings.database_timeout_ms}",
                         "put the database nearer the app (same region), or raise LIMITER_TIMEOUT_MS")]
    else:
        found = [Finding(OK, "database", text)]
    return found + schema(applied, [name for name, _ in migrations()])


def schema(applied: list[str], available: list[str]) -> list[Finding]:
    """Applied migrations (schema_migrations) against the code's sql/migrations/."""
    pending = [name for name in available if name not in applied]
    unknown = [name for name in applied if name not in available]
    found = []
    if pending:
        found.append(Finding(FAIL, "schema", f"{len(available) - len(pending)} of {len(available)} migrations "
                             f"applied; not yet: {', '.join(pending)}",
                             "run `python server.py admin migrate` (on Fly.io `fly ssh console -C \"python "
                             "server.py admin migrate\"`), or restart the server: it migrates at start"))
    else:
        found.append(Finding(OK, "schema", f"current: {len(available)} of {len(available)} migrations applied "
                             f"(latest {available[-1] if available else 'none'})"))
    if unknown:
        found.append(Finding(WARN, "schema", f"the database has migrations this Callgate does not know: "
                             f"{', '.join(unknown)} (a newer version migrated it)",
                             "run the Callgate version that made them, or newer"))
    return found


# --- PUBLIC_URL -------------------------------------------------------------------------------


async def public_url(settings: Settings) -> list[Finding]:
    """https in production, not this machine, and its /healthz answers as a Callgate."""
    url, parts = settings.public_url, urlsplit(settings.public_url)
    shown = shown_url(url)
    host = parts.hostname or ""
    local = host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost")
    fix = "set PUBLIC_URL to the app's public https URL (on Fly.io: PUBLIC_URL in fly.toml's [env], " \
          "e.g. https://<app>.fly.dev)"
    if settings.production and parts.scheme != "https":
        found = [Finding(FAIL, "PUBLIC_URL", f"{shown} is not https: Twilio's webhooks and the Media Stream "
                         "(wss://) need https in production", fix)]
    elif settings.production and local:
        found = [Finding(FAIL, "PUBLIC_URL", f"{shown} names this machine: Twilio cannot reach it", fix)]
    elif parts.scheme != "https":
        found = [Finding(OK, "PUBLIC_URL", f"{shown} (http: development only; Twilio needs a public https URL)")]
    else:
        found = [Finding(OK, "PUBLIC_URL", f"{shown} is https")]
    return found + [await healthz(url)]


async def healthz(public: str) -> Finding:
    url = public + "/healthz"
    shown = shown_url(url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as session:
            async with session.get(url, allow_redirects=False) as response:
                status, location = response.status, response.headers.get("Location", "")
                body = await response.content.read(64 * 1024)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Finding(FAIL, "/healthz", f"{shown} is unreachable: {network_problem(exc, HTTP_TIMEOUT_S)}",
                       "check PUBLIC_URL, its DNS name, and that the app runs (on Fly.io `fly status`)")
    if 300 <= status < 400:
        return Finding(FAIL, "/healthz", f"{shown} redirects (HTTP {status}) to {shown_url(location)}",
                       "set PUBLIC_URL to the URL it redirects to: Twilio signs the exact URL it calls")
    try:
        facts = orjson.loads(body)
    except orjson.JSONDecodeError:
        facts = None
    if not isinstance(facts, dict) or "status" not in facts:
        return Finding(FAIL, "/healthz", f"{shown} answers HTTP {status}, but not as a Callgate does",
                       "set PUBLIC_URL to this Callgate's URL (is it another app's?)")
    if facts["status"] == "draining":
        return Finding(FAIL, "/healthz", f"{shown} answers draining: that server is shutting down",
                       "wait for the new machine to start (on Fly.io `fly status`), then run the doctor again")
    if facts["status"] == "degraded":
        return Finding(FAIL, "/healthz", f"{shown} answers degraded: that server's database is "
                       f"{facts.get('database', 'unavailable')}", "see the database line; the server's own "
                       "DATABASE_URL is the one that matters")
    if status != 200 or facts["status"] != "ok":
        return Finding(FAIL, "/healthz", f"{shown} answers HTTP {status}, status {str(facts['status'])[:40]!r}",
                       "set PUBLIC_URL to this Callgate's URL (is it another app's?)")
    version = facts.get("version")
    text = f"{shown} answers ok (Callgate {version}, {facts.get('activeCalls', 0)} live calls)"
    if version != VERSION:
        return Finding(WARN, "/healthz", text + f", but this is Callgate {VERSION}",
                       "finish the deploy, or point PUBLIC_URL at this deployment")
    return Finding(OK, "/healthz", text)


# --- Twilio -----------------------------------------------------------------------------------


def caller_ids(settings: Settings) -> list[tuple[str, str]]:
    return [(region, number) for region, number in
            (("US", settings.twilio_number_us), ("AU", settings.twilio_number_au), ("IN", settings.twilio_number_in))
            if number]


async def twilio(settings: Settings) -> list[Finding]:
    """The credentials fetch the account, and each TWILIO_PHONE_NUMBER_* is on it, wired to us."""
    numbers = caller_ids(settings)
    sid, token = settings.twilio_account_sid, settings.twilio_auth_token
    if not (sid and token):
        reason = "not checked: TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are both needed"
        return [Finding(SKIP, "Twilio account", reason),
                *(Finding(SKIP, f"Twilio number {region}", reason) for region, _ in numbers)]
    seconds = settings.twilio_rest_timeout_ms / 1000
    # As twilio_rest.TwilioRest builds its client: the same library, base URL and bound.
    http = AsyncTwilioHttpClient(timeout=seconds)
    client = Client(sid, token.value, http_client=http)
    client.api.base_url = settings.twilio_api_base_url
    try:
        account = await twilio_account(client, settings, seconds)
        if account.status == FAIL:
            return [account, *(Finding(SKIP, f"Twilio number {region}", "not checked: the account check failed")
                               for region, _ in numbers)]
        if not numbers:
            return [account, Finding(WARN, "Twilio numbers", "no TWILIO_PHONE_NUMBER_US, _AU or _IN: call.start "
                                     "cannot place calls, and no number's webhooks were checked",
                                     "set TWILIO_PHONE_NUMBER_US (the fallback) to your Twilio number, in E.164")]
        checked = await asyncio.gather(*(twilio_number(client, settings, region, number, seconds)
                                         for region, number in numbers))
        return [account, *(finding for found in checked for finding in found)]
    finally:
        await http.close()


def _rest_problem(exc: BaseException, settings: Settings, seconds: float) -> Finding:
    if isinstance(exc, TwilioRestException):
        if exc.status == 401:
            return Finding(FAIL, "Twilio account", f"Twilio refused the credentials (HTTP 401, code {exc.code})",
                           "set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN to the account's Live credentials "
                           "(Twilio Console → Account → API keys & tokens); after rotating the Auth Token, set "
                           "the new one")
        return Finding(FAIL, "Twilio account", f"Twilio answered HTTP {exc.status} (code {exc.code}): "
                       f"{str(exc.msg)[:160]}", "check TWILIO_ACCOUNT_SID and TWILIO_API_BASE_URL")
    return Finding(FAIL, "Twilio account", f"Twilio's API at {shown_url(settings.twilio_api_base_url)} is "
                   f"unreachable: {network_problem(exc, seconds)}",
                   f"check TWILIO_API_BASE_URL (unset means {DEFAULTS['TWILIO_API_BASE_URL']}) and this "
                   "machine's outbound network")


async def twilio_account(client: Client, settings: Settings, seconds: float) -> Finding:
    sid = settings.twilio_account_sid
    try:
        async with asyncio.timeout(seconds):
            account = await client.api.v2010.accounts(sid).fetch_async()
    except (TwilioRestException, aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _rest_problem(exc, settings, seconds)
    if account.status != "active":
        return Finding(FAIL, "Twilio account", f"{sid} is {account.status}",
                       "reactivate the account in the Twilio Console (Billing), or use an active one's credentials")
    if account.type == "Trial":
        return Finding(WARN, "Twilio account", f"{sid} is active, a trial account: it calls verified numbers "
                       "only, after a trial announcement", "upgrade the account in the Twilio Console")
    return Finding(OK, "Twilio account", f"{sid} is active ({account.type})")


def _same_url(configured: str | None, expected: str) -> bool:
    """Whether Twilio's configured URL is ``expected`` (a query may follow: a webhook URL may
    choose the scenario). Exact otherwise, default port aside: Twilio signs the URL as
    configured and Callgate checks the signature over PUBLIC_URL + the path."""
    if not configured:
        return False

    def canonical(url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc
        if (parts.scheme, parts.port) in (("http", 80), ("https", 443)):
            netloc = netloc.rsplit(":", 1)[0]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    return canonical(configured) == canonical(expected)


async def twilio_number(client: Client, settings: Settings, region: str, e164: str,
                        seconds: float) -> list[Finding]:
    """One caller-id number: on the account, its calls coming to /twiml and its status to
    /twilio/status (what README "How a call goes" and handlers/twilio.py expect)."""
    check, variable, shown = f"Twilio number {region}", f"TWILIO_PHONE_NUMBER_{region}", mask(e164)
    try:
        async with asyncio.timeout(seconds):
            listed = await client.incoming_phone_numbers.list_async(phone_number=e164)
    except (TwilioRestException, aiohttp.ClientError, OSError, TimeoutError) as exc:
        problem = _rest_problem(exc, settings, seconds)
        return [Finding(FAIL, check, f"{shown}: {problem.text}", problem.fix)]
    number = next((n for n in listed if n.phone_number == e164), None)  # the filter matches parts too
    if number is None:
        return [Finding(FAIL, check, f"{shown} ({variable}) is not a number of account "
                        f"{settings.twilio_account_sid}", f"buy or port it into this account (Twilio Console → Phone "
                        f"Numbers), or set {variable} to a number the account has")]
    console = CONSOLE_NUMBER.format(number=shown)
    voice_url, status_url = settings.public_url + "/twiml", settings.public_url + "/twilio/status"
    found = []
    if number.voice_receive_mode == "fax":
        found.append(Finding(FAIL, check, f"{shown} accepts faxes, not voice calls",
                             f'{console} → "Accept incoming": Voice Calls'))
    if number.trunk_sid:
        found.append(Finding(FAIL, check, f"{shown} belongs to SIP trunk {number.trunk_sid}: its calls go to the "
                             "trunk, not to its webhook", "remove the number from the trunk (Twilio Console → "
                             "Elastic SIP Trunking → the trunk → Numbers)"))
    if number.voice_application_sid:
        found.append(Finding(FAIL, check, f"{shown} is configured with TwiML App {number.voice_application_sid}: "
                             "its calls go to the app's Voice URL, not to the number's webhook",
                             f'{console} → "Configure with": Webhook, and "A call comes in": {voice_url}'))
    if not _same_url(number.voice_url, voice_url):
        where = f"points at {shown_url(number.voice_url)}" if number.voice_url else "is empty"
        found.append(Finding(FAIL, check, f'{shown}: "A call comes in" {where}, not {voice_url}',
                             f'{console} → "A call comes in": Webhook, {voice_url}, HTTP POST'))
    if not _same_url(number.status_callback, status_url):
        where = f"points at {shown_url(number.status_callback)}" if number.status_callback else "is empty"
        found.append(Finding(FAIL, check, f'{shown}: "Call status changes" {where}, not {status_url} '
                             "(without it no-answer, busy and failed calls are not refunded)",
                             f'{console} → "Call status changes": {status_url}, HTTP POST'))
    elif (number.status_callback_method or "POST").upper() != "POST":
        found.append(Finding(FAIL, check, f'{shown}: "Call status changes" is sent with '
                             f"{number.status_callback_method}; /twilio/status takes POST only",
                             f'{console} → "Call status changes": HTTP POST'))
    if found:
        return found
    return [Finding(OK, check, f'{shown} is on the account; "A call comes in" {number.voice_method} '
                    f'{shown_url(number.voice_url)}, "Call status changes" {number.status_callback_method} '
                    f"{shown_url(number.status_callback)}")]


# --- OpenAI Realtime --------------------------------------------------------------------------


class SessionRefused(Exception):
    """The model sent an ``error`` event instead of what was awaited."""

    def __init__(self, error: dict) -> None:
        super().__init__(str(error.get("code")))
        self.code, self.message, self.param = error.get("code"), str(error.get("message") or ""), error.get("param")


async def _expect(model: ModelConnection, wanted: str) -> dict:
    """The next ``wanted`` event, as bridge/call.py waits for session.created and .updated."""
    while (frame := await model.recv()) is not None:
        event = realtime.decode(frame)
        if event is None:
            continue
        if event["type"] == wanted:
            return event
        if event["type"] == "error":
            raise SessionRefused(event.get("error") or {})
    raise ModelError(f"the model closed the connection before {wanted}")


async def openai_realtime(settings: Settings) -> list[Finding]:
    """The key opens a session with the model, which accepts the session.update a call sends
    (the default scenario's instructions, tools, voice and transcription model); then it is
    closed. No response is asked for."""
    check, model = "OpenAI Realtime", settings.openai_realtime_model
    if not settings.openai_api_key:
        return [Finding(FAIL if settings.production else WARN, check, "OPENAI_API_KEY is not set: calls are "
                        "answered by the offline agent (it plays the caller's words back)",
                        "set OPENAI_API_KEY to a key of a project with Realtime access (platform.openai.com → "
                        "API keys)")]
    scenario, config, voice, _ = scenarios.from_query({})  # what a webhook URL without a query gets
    seconds = settings.model_ready_timeout_ms / 1000
    connector = RealtimeConnector(settings.openai_realtime_url, model, settings.openai_api_key.value, seconds)
    began = time.monotonic()
    connection = None
    try:
        async with asyncio.timeout(seconds):  # a call gives the model no longer
            connection = await connector.connect()
            await _expect(connection, "session.created")
            await connection.send(realtime.encode(realtime.session_update(
                instructions=scenario.instructions(config), voice=voice,
                tools=functions.schemas(scenario.tools), transcription_model=settings.openai_transcription_model)))
            await _expect(connection, "session.updated")
        took_ms = (time.monotonic() - began) * 1000
    except SessionRefused as exc:
        return [refused_session(settings, exc, voice)]
    except (ModelError, TimeoutError) as exc:
        return [unopened_session(settings, exc, seconds)]
    finally:
        if connection is not None:
            await connection.close()
    text = (f"{model} accepted a session (voice {voice}, transcription {settings.openai_transcription_model}) "
            f"in {took_ms:.0f} ms")
    try:
        # After close(): frames still queued, then None once the close handshake completed both
        # ways; ModelError when it did not (no close frame back, a code other than 1000).
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            while await connection.recv() is not None:
                pass
    except (ModelError, TimeoutError) as exc:
        return [Finding(WARN, check, f"{text}, but it did not close cleanly ({exc or 'no close in time'})",
                        f"check the network between this machine and {shown_url(settings.openai_realtime_url)}")]
    return [Finding(OK, check, text + ", and closed cleanly")]


def refused_session(settings: Settings, exc: SessionRefused, voice: str) -> Finding:
    model, code, param = settings.openai_realtime_model, exc.code, str(exc.param or "")
    said = f"({code}: {exc.message[:160]})" if exc.message else f"({code})"
    if code in ("model_not_found", "invalid_model"):
        return Finding(FAIL, "OpenAI Realtime", f"OpenAI refused the model {model} {said}",
                       f"set OPENAI_REALTIME_MODEL to a Realtime model this key's project may use (unset means "
                       f"{DEFAULTS['OPENAI_REALTIME_MODEL']})")
    if code == "invalid_api_key":
        return Finding(FAIL, "OpenAI Realtime", f"OpenAI refused the key ({code})", "set OPENAI_API_KEY to a valid key")
    if "transcription" in param:
        return Finding(FAIL, "OpenAI Realtime", f"OpenAI refused the transcription model "
                       f"{settings.openai_transcription_model} {said}",
                       f"set OPENAI_TRANSCRIPTION_MODEL to a transcription model (unset means "
                       f"{DEFAULTS['OPENAI_TRANSCRIPTION_MODEL']})")
    if "voice" in param:
        return Finding(FAIL, "OpenAI Realtime", f"OpenAI refused the voice {voice} {said}",
                       f"choose a model that offers the scenarios' voices (OPENAI_REALTIME_MODEL={model})")
    return Finding(FAIL, "OpenAI Realtime", f"OpenAI refused the session {said}",
                   f"check OPENAI_REALTIME_MODEL={model} and OPENAI_TRANSCRIPTION_MODEL")


def unopened_session(settings: Settings, exc: BaseException, seconds: float) -> Finding:
    url = shown_url(settings.openai_realtime_url)
    cause = exc.__cause__
    if isinstance(cause, websockets.InvalidStatus):
        status = cause.response.status_code
        try:
            code = (orjson.loads(cause.response.body or b"{}").get("error") or {}).get("code")
        except (orjson.JSONDecodeError, AttributeError):
            code = None
        said = f"HTTP {status}" + (f", {code}" if code else "")
        if status == 401:
            return Finding(FAIL, "OpenAI Realtime", f"OpenAI refused the key ({said})",
                           "set OPENAI_API_KEY to a valid key (platform.openai.com → API keys)")
        if status == 403:
            return Finding(FAIL, "OpenAI Realtime", f"OpenAI refused access ({said})",
                           f"give the key's project access to the Realtime API and to "
                           f"{settings.openai_realtime_model} (platform.openai.com → project → limits)")
        if status == 404 or code == "model_not_found":
            return Finding(FAIL, "OpenAI Realtime", f"{url} answered {said}",
                           f"check OPENAI_REALTIME_URL (unset means {DEFAULTS['OPENAI_REALTIME_URL']}) and "
                           f"OPENAI_REALTIME_MODEL={settings.openai_realtime_model}")
        return Finding(FAIL, "OpenAI Realtime", f"{url} refused the connection ({said})",
                       "try again later; if it repeats, check OpenAI's status page")
    if isinstance(exc, TimeoutError) or isinstance(cause, OSError | TimeoutError):
        return Finding(FAIL, "OpenAI Realtime", f"{url}: {network_problem(exc, seconds)} (calls give the model "
                       f"MODEL_READY_TIMEOUT_MS={settings.model_ready_timeout_ms})",
                       "check OPENAI_REALTIME_URL and this machine's outbound network")
    return Finding(FAIL, "OpenAI Realtime", f"{url}: {str(exc)[:200]}",
                   "check OPENAI_REALTIME_URL and this machine's outbound network")

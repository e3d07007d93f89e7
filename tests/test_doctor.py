"""`python server.py admin doctor`, run as the operator runs it: a subprocess, against a real
PostgreSQL, a running Callgate on loopback for PUBLIC_URL, and the loopback Twilio REST and
OpenAI Realtime peers. Each failure test starts from a deployment where every check is ok
and breaks one thing."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from dataclasses import dataclass

import asyncpg
import pytest
from aiohttp import web

from config import DEVELOPMENT_PHONE_KEY
from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from db.sql import migrations
from helpers import AUTH_TOKEN, MODEL_KEY, ROOT, TEST_KEY, Harness, callgate
from tools.fake_realtime import FakeRealtime
from tools.fake_twilio_api import FakeTwilioApi

MODEL = "gpt-realtime-1.5"
US_NUMBER, AU_NUMBER = "+14155550100", "+61291234567"
ADMIN_TOKEN = "doctor-admin-token-0123456789abcdef"
STATUS_WIDTH, CHECK_WIDTH = 5, 19  # doctor.Finding.render's columns


@dataclass(frozen=True)
class Line:
    status: str
    check: str
    text: str
    fix: str


@dataclass
class Report:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[Line]:
        """The findings: a status, the check, what was found, and the fix line after it."""
        found = []
        for raw in self.stdout.splitlines():
            status = raw[:STATUS_WIDTH].strip()
            if status in ("ok", "warn", "FAIL", "skip"):
                found.append(Line(status, raw[STATUS_WIDTH + 1:STATUS_WIDTH + 1 + CHECK_WIDTH].strip(),
                                  raw[STATUS_WIDTH + CHECK_WIDTH + 2:], ""))
            elif raw.startswith(" " * (STATUS_WIDTH + 1) + "fix: ") and found:
                last = found.pop()
                found.append(Line(last.status, last.check, last.text, raw.strip().removeprefix("fix: ")))
        return found

    def checks(self, status: str) -> set[str]:
        return {line.check for line in self.lines if line.status == status}

    def only(self, check: str) -> Line:
        """The one line of ``check``."""
        lines = [line for line in self.lines if line.check == check]
        assert len(lines) == 1, f"{check!r}: {lines}\n{self.stdout}"
        return lines[0]


@dataclass
class Deployment:
    harness: Harness
    env: dict[str, str]

    @property
    def twilio(self) -> FakeTwilioApi:
        return self.harness.twilio_api

    @property
    def model(self) -> FakeRealtime:
        return self.harness.model

    async def doctor(self, **changes: str | None) -> Report:
        """Run the doctor with the deployment's environment, ``changes`` applied (None unsets)."""
        env = {k: v for k, v in {**self.env, **changes}.items() if v is not None}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "server.py", "admin", "doctor", cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return Report(process.returncode, out.decode(), err.decode())


def wire(api: FakeTwilioApi, number: str, public_url: str, **fields):
    """A number on the fake account, configured as Callgate's README says."""
    return api.add_number(number, **{"voice_url": f"{public_url}/twiml", "status_callback": f"{public_url}/twilio/status",
                                     **fields})


async def doctor_with_us_number(deployment, **fields) -> Report:
    """The doctor's report with the US caller id configured as the README says but for
    ``fields`` (the AU one as the README says)."""
    deployment.twilio.numbers.clear()
    wire(deployment.twilio, AU_NUMBER, deployment.harness.url)
    wire(deployment.twilio, US_NUMBER, deployment.harness.url, **fields)
    return await deployment.doctor()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def deployment(dsn, tmp_path):
    """A deployment where every check is ok: a Callgate answering at PUBLIC_URL, its database
    migrated, two caller ids on the Twilio account wired to it, and a model that serves MODEL."""
    async with FakeRealtime(models={MODEL}) as model, callgate(dsn, model=model) as harness:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "CALLGATE_DATA_DIR": str(tmp_path),
            "DATABASE_URL": dsn,
            "PHONE_ENCRYPTION_KEY": TEST_KEY,
            "PUBLIC_URL": harness.url,
            "TWILIO_ACCOUNT_SID": harness.twilio_api.account_sid,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_API_BASE_URL": harness.twilio_api.base_url,
            "TWILIO_PHONE_NUMBER_US": US_NUMBER,
            "TWILIO_PHONE_NUMBER_AU": AU_NUMBER,
            "OPENAI_API_KEY": MODEL_KEY,
            "OPENAI_REALTIME_URL": model.url,
            "OPENAI_REALTIME_MODEL": MODEL,
            "ADMIN_TOKEN": ADMIN_TOKEN,
        }
        for number in (US_NUMBER, AU_NUMBER):
            wire(harness.twilio_api, number, harness.url)
        yield Deployment(harness, env)


def assert_fails_only(report: Report, *checks: str) -> None:
    assert report.code == 1, report.stdout + report.stderr
    assert report.checks("FAIL") == set(checks), report.stdout
    assert "Traceback" not in report.stdout + report.stderr


# --- all good ---------------------------------------------------------------------------------


async def test_a_healthy_deployment_exits_0_with_every_line_ok(deployment):
    """Every check passes: exit 0, every line ok, each check present once per thing checked."""
    report = await deployment.doctor()
    assert report.code == 0, report.stdout + report.stderr
    assert {line.status for line in report.lines} == {"ok"}, report.stdout
    assert report.checks("ok") == {
        "configuration", "phone key", "Twilio credentials", "webhook shared key", "ADMIN_TOKEN", "database",
        "schema", "PUBLIC_URL", "/healthz", "Twilio account", "Twilio number US", "Twilio number AU",
        "OpenAI Realtime"}
    available = len(migrations())
    assert f"{available} of {available} migrations applied" in report.only("schema").text
    assert "answers ok (Callgate" in report.only("/healthz").text
    assert "closed cleanly" in report.only("OpenAI Realtime").text
    assert report.stdout.rstrip().endswith("everything checked is ok")


async def test_the_model_session_is_opened_as_a_call_opens_it_and_closed(deployment):
    """The doctor's session asks for MODEL, sends the GA session.update a call sends (μ-law, the
    default voice), asks for no response, and closes the socket."""
    await deployment.doctor()
    session = await deployment.model.wait_for_session()
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.model == MODEL
    audio = session.session_config["audio"]
    assert (audio["input"]["format"], audio["output"]["format"]) == ({"type": "audio/pcmu"}, {"type": "audio/pcmu"})
    assert audio["output"]["voice"] == "marin"
    assert "response.create" not in [event["type"] for event in session.events_in]


async def test_numbers_are_looked_up_by_twilio_s_phone_number_filter(deployment):
    """Each caller id is found with IncomingPhoneNumbers' PhoneNumber filter, authenticated."""
    await deployment.doctor()
    lookups = [r for r in deployment.twilio.requests if r.path.endswith("/IncomingPhoneNumbers.json")]
    assert sorted(r.value("PhoneNumber") for r in lookups) == sorted([US_NUMBER, AU_NUMBER])
    assert all(r.auth_ok and r.method == "GET" for r in lookups)


async def test_no_secret_and_no_full_phone_number_is_printed(deployment):
    """Keys, tokens, the DSN and the numbers appear nowhere in the output, even though Twilio's
    account resource carries the auth token; numbers show masked."""
    report = await deployment.doctor()
    output = report.stdout + report.stderr
    for secret in (TEST_KEY, AUTH_TOKEN, MODEL_KEY, ADMIN_TOKEN, deployment.env["DATABASE_URL"], US_NUMBER,
                   AU_NUMBER):
        assert secret not in output
    assert "+1415•••0100" in report.only("Twilio number US").text


# --- the database -----------------------------------------------------------------------------


async def test_an_unreachable_database_is_a_failed_line(deployment):
    """DATABASE_URL naming a port nothing listens on: refused, and the schema not checked."""
    report = await deployment.doctor(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port()}/callgate")
    assert_fails_only(report, "database")
    assert "unreachable: connection refused" in report.only("database").text
    assert "DATABASE_URL" in report.only("database").fix
    assert report.only("schema").status == "skip"


async def test_a_schema_behind_the_code_is_reported_and_not_migrated(deployment, dsn):
    """A migration the database has not recorded is named with the command that applies it,
    and the doctor itself applies nothing."""
    conn = await asyncpg.connect(dsn)
    try:
        last = await conn.fetchval("SELECT max(name) FROM schema_migrations")
        await conn.execute("DELETE FROM schema_migrations WHERE name = $1", last)
        report = await deployment.doctor()
        still_missing = await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE name = $1", last) == 0
    finally:
        await conn.close()
    assert_fails_only(report, "schema")
    available = len(migrations())
    assert f"{available - 1} of {available} migrations applied; not yet: {last}" in report.only("schema").text
    assert "python server.py admin migrate" in report.only("schema").fix
    assert still_missing


# --- PUBLIC_URL -------------------------------------------------------------------------------


async def test_an_http_public_url_fails_in_production(deployment):
    """In production PUBLIC_URL must be https, even when it answers."""
    report = await deployment.doctor(CALLGATE_ENV="production")
    assert_fails_only(report, "PUBLIC_URL")
    assert "is not https" in report.only("PUBLIC_URL").text
    assert report.only("/healthz").status == "ok"


async def test_an_unreachable_public_url_is_a_failed_line(deployment):
    """Nothing listening at PUBLIC_URL: /healthz fails, saying refused (numbers wired to it)."""
    public = f"http://127.0.0.1:{closed_port()}"
    deployment.twilio.numbers.clear()
    for number in (US_NUMBER, AU_NUMBER):
        wire(deployment.twilio, number, public)
    report = await deployment.doctor(PUBLIC_URL=public)
    assert_fails_only(report, "/healthz")
    assert "unreachable: connection refused" in report.only("/healthz").text


async def test_a_public_url_that_is_not_a_callgate_is_a_failed_line(deployment):
    """A server at PUBLIC_URL that answers /healthz with 404 is not taken for Callgate."""
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        public = f"http://127.0.0.1:{runner.addresses[0][1]}"
        deployment.twilio.numbers.clear()
        for number in (US_NUMBER, AU_NUMBER):
            wire(deployment.twilio, number, public)
        report = await deployment.doctor(PUBLIC_URL=public)
    finally:
        await runner.cleanup()
    assert_fails_only(report, "/healthz")
    assert "answers HTTP 404, but not as a Callgate does" in report.only("/healthz").text


# --- Twilio -----------------------------------------------------------------------------------


async def test_refused_twilio_credentials_fail_the_account_and_skip_the_numbers(deployment):
    """A wrong auth token: Twilio's 401 / 20003, the variables to fix, the numbers not checked."""
    report = await deployment.doctor(TWILIO_AUTH_TOKEN="not-the-token")
    assert_fails_only(report, "Twilio account")
    line = report.only("Twilio account")
    assert "refused the credentials (HTTP 401, code 20003)" in line.text
    assert "TWILIO_AUTH_TOKEN" in line.fix
    assert report.only("Twilio number US").status == "skip"
    assert "not-the-token" not in report.stdout + report.stderr


async def test_a_number_missing_from_the_account_is_a_failed_line(deployment):
    """A caller id that is on another account only: named by its variable, masked."""
    report = await doctor_with_us_number(deployment, account_sid="AC" + "0" * 32)
    assert_fails_only(report, "Twilio number US")
    line = report.only("Twilio number US")
    assert "+1415•••0100 (TWILIO_PHONE_NUMBER_US) is not a number of account" in line.text
    assert "TWILIO_PHONE_NUMBER_US" in line.fix


async def test_a_voice_webhook_pointing_elsewhere_is_a_failed_line(deployment):
    """'A call comes in' at another host: shown without its query, the fix names our /twiml."""
    report = await doctor_with_us_number(deployment, voice_url="https://old.example/twiml?scenario=x")
    assert_fails_only(report, "Twilio number US")
    line = report.only("Twilio number US")
    assert '"A call comes in" points at https://old.example/twiml?…' in line.text
    assert f"{deployment.harness.url}/twiml" in line.fix


async def test_a_voice_webhook_with_a_scenario_query_is_ok(deployment):
    """Our /twiml with a query choosing the scenario is what the README allows."""
    report = await doctor_with_us_number(deployment,
                                         voice_url=f"{deployment.harness.url}/twiml?scenario=customer-service")
    assert report.code == 0, report.stdout
    assert report.only("Twilio number US").status == "ok"


async def test_a_missing_status_callback_is_a_failed_line(deployment):
    """No 'Call status changes' URL: the line says so and what it costs; the fix names the URL."""
    report = await doctor_with_us_number(deployment, status_callback="")
    assert_fails_only(report, "Twilio number US")
    line = report.only("Twilio number US")
    assert '"Call status changes" is empty' in line.text
    assert f"{deployment.harness.url}/twilio/status" in line.fix


async def test_a_status_callback_sent_with_get_is_a_failed_line(deployment):
    """/twilio/status takes POST only: a GET status callback would be refused."""
    report = await doctor_with_us_number(deployment, status_callback_method="GET")
    assert_fails_only(report, "Twilio number US")
    assert "takes POST only" in report.only("Twilio number US").text


# --- OpenAI -----------------------------------------------------------------------------------


async def test_a_refused_openai_key_is_a_failed_line_with_its_code(deployment):
    """A wrong key: the handshake's 401 and OpenAI's error code, never the key."""
    report = await deployment.doctor(OPENAI_API_KEY="sk-wrong-key")
    assert_fails_only(report, "OpenAI Realtime")
    line = report.only("OpenAI Realtime")
    assert "refused the key (HTTP 401, invalid_api_key)" in line.text
    assert "OPENAI_API_KEY" in line.fix
    assert "sk-wrong-key" not in report.stdout + report.stderr


async def test_a_refused_model_is_a_failed_line_with_its_code(deployment):
    """A model the API does not serve: its error event's code, and the variable to change."""
    report = await deployment.doctor(OPENAI_REALTIME_MODEL="gpt-realtime-nonexistent")
    assert_fails_only(report, "OpenAI Realtime")
    line = report.only("OpenAI Realtime")
    assert "refused the model gpt-realtime-nonexistent (model_not_found" in line.text
    assert "OPENAI_REALTIME_MODEL" in line.fix


async def test_a_wrong_realtime_url_is_a_failed_line(deployment):
    """OPENAI_REALTIME_URL at a path the API does not serve: HTTP 404, and the variable."""
    report = await deployment.doctor(OPENAI_REALTIME_URL=deployment.model.url.replace("/v1/realtime", "/v2/rt"))
    assert_fails_only(report, "OpenAI Realtime")
    assert "answered HTTP 404" in report.only("OpenAI Realtime").text
    assert "OPENAI_REALTIME_URL" in report.only("OpenAI Realtime").fix


# --- the phone key ----------------------------------------------------------------------------


async def test_the_development_phone_key_fails(deployment):
    """Without PHONE_ENCRYPTION_KEY (development) the key is the public development key: FAIL."""
    report = await deployment.doctor(PHONE_ENCRYPTION_KEY=None)
    assert_fails_only(report, "phone key")
    assert "is the development key" in report.only("phone key").text
    assert "openssl rand -hex 32" in report.only("phone key").fix
    assert DEVELOPMENT_PHONE_KEY not in report.stdout


async def test_a_short_phone_key_fails(deployment):
    """A key shorter than production's minimum fails, saying how long it is."""
    report = await deployment.doctor(PHONE_ENCRYPTION_KEY="short-key")
    assert_fails_only(report, "phone key")
    assert "has 9 characters; production needs at least 32" in report.only("phone key").text


async def test_in_production_a_configuration_error_stops_before_any_check(deployment):
    """Production refuses the development key at the door: exit 2 and the configuration error."""
    report = await deployment.doctor(PHONE_ENCRYPTION_KEY=None, CALLGATE_ENV="production")
    assert report.code == 2
    assert report.lines == []
    assert "configuration error: PHONE_ENCRYPTION_KEY must be set" in report.stderr


# --- the embedded database --------------------------------------------------------------------


@pytest.fixture
async def embedded(tmp_path):
    """The embedded PostgreSQL a server would use with CALLGATE_DATA_DIR=tmp_path, migrated."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    await asyncio.to_thread(pg.start)
    try:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield pg
    finally:
        await asyncio.to_thread(pg.stop)


async def test_a_running_embedded_database_is_checked_and_left_running(deployment, embedded):
    """Without DATABASE_URL the server's running embedded PostgreSQL is checked, not stopped."""
    report = await deployment.doctor(DATABASE_URL=None)
    assert report.code == 0, report.stdout + report.stderr
    assert report.only("database").text.startswith(f"embedded PostgreSQL ({embedded.data_dir})")
    assert await asyncio.to_thread(lambda: embedded.running)


async def test_a_stopped_embedded_database_is_started_for_the_check_and_stopped(deployment, embedded):
    """With no server running on it, the doctor starts the embedded PostgreSQL and stops it after."""
    await asyncio.to_thread(embedded.stop)
    report = await deployment.doctor(DATABASE_URL=None)
    assert report.code == 0, report.stdout + report.stderr
    assert report.only("schema").status == "ok"
    assert not await asyncio.to_thread(lambda: embedded.running)

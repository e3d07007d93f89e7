"""What docs/operations.md ships, checked against a real server: the Grafana dashboard and the
Prometheus alert rules ask only for series a running Callgate's /metrics exports (with the
labels it gives them), the rules pass promtool and fire when they should, and a backup
restored into a wiped database keeps every limit as it was."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from appkeys import METRICS
from db.database import create_pool
from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from db.sql import migrations
from helpers import (
    PUBLIC_URL,
    ROOT,
    TEST_DB_TIMEOUT_MS,
    TEST_KEY,
    Clock,
    callgate,
    make_limiter,
    wait_until,
    with_database,
)
from scripts.dbbackup import tool
from tools.fake_realtime import FakeRealtime

DASHBOARD = ROOT / "ops" / "grafana" / "callgate-dashboard.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
BACKUP = ROOT / "scripts" / "dbbackup.py"
# Labels Prometheus itself puts on every scraped series.
TARGET_LABELS = {"instance", "job"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


# --- what a running server exports -------------------------------------------------------------


async def _scrape(server_dsn: str, template: str) -> str:
    """/metrics of a real Callgate after traffic that gives every labelled family a sample: a
    call whose greeting runs out of tokens and that sends a malformed frame, a rate check, a
    refused /logs origin."""
    name = f"t_ops_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        async with FakeRealtime(response_faults={0: "max_output_tokens"}) as model, \
                callgate(with_database(server_dsn, name), model=model) as h:
            def rendered() -> str:
                return h.app[METRICS].render().decode()

            call = h.call(audio=b"", from_="+14155550142")
            await call.webhook()
            await call.connect()
            await model.wait_for_session()
            await call.wait_for_audio(800)
            await call._ws.send("{not json")
            async with aiohttp.ClientSession() as http:
                with contextlib.suppress(aiohttp.WSServerHandshakeError):
                    await http.ws_connect(h.url + "/logs", headers={"Origin": "https://elsewhere.test"})
                async with http.ws_connect(h.url + "/logs", headers={"Origin": PUBLIC_URL}) as ws:
                    await ws.send_json({"type": "rate_limit_check", "phoneNumber": "+14155550142"})
                    await ws.receive_json(timeout=5)
                await wait_until(lambda: "callgate_model_response_failures_total{" in rendered(),
                                 what="the cut-short greeting to be counted")
                await call.stop()
                await wait_until(lambda: "callgate_calls_total{" in rendered(), what="the call's end to be counted")
                async with http.get(h.url + "/metrics") as resp:
                    assert resp.status == 200
                    return await resp.text()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
def exported(server_dsn, template_database) -> dict[str, set[str]]:
    """Every series name a running server exports (histograms' _bucket/_sum/_count, counters'
    _total included), with the label names its samples carry."""
    text = asyncio.run(_scrape(server_dsn, template_database))
    assert "5550142" not in text  # (and no number in any label)
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        assert family.samples, f"{family.name} has no sample: give it one in _scrape, or its labels go unchecked"
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


# --- reading PromQL ---------------------------------------------------------------------------


def _without_strings(expr: str) -> str:
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not its functions, keywords or labels)."""
    text = _without_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)                      # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                     # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if match.group() not in PROMQL_WORDS and not rest.startswith("("):
            names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    text = _without_strings(expr)
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels.update(label.strip() for label in grouping.split(",") if label.strip())
    return labels


def test_the_promql_reader_finds_names_and_labels():
    """The reader the checks below rest on: series, not functions, keywords, labels or ranges."""
    expr = ('histogram_quantile(0.99, sum by (le, op) (rate(callgate_limiter_latency_seconds_bucket'
            '{instance=~"$instance",op="hit"}[$__rate_interval]))) > 0.25 and on (instance) callgate_database_up == 1')
    assert metric_names(expr) == {"callgate_limiter_latency_seconds_bucket", "callgate_database_up"}
    assert label_names(expr) == {"le", "op", "instance"}
    assert metric_names("absent(callgate_database_up)") == {"callgate_database_up"}
    assert metric_names('sum(rate(no_such_metric{a="b"}[5m]))') == {"no_such_metric"}


def check_query(expr: str, exported: dict[str, set[str]], where: str) -> set[str]:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    missing = names - exported.keys()
    assert not missing, f"{where}: {sorted(missing)} not exported by /metrics"
    known = set().union(*(exported[n] for n in names)) | TARGET_LABELS
    if any(n.endswith("_bucket") for n in names):
        known.add("le")
    unknown = label_names(expr) - known
    assert not unknown, f"{where}: label(s) {sorted(unknown)} not on {sorted(names)}"
    return names


def family(series: str) -> str:
    return re.sub(r"_(?:bucket|sum|count|total|created)$", "", series)


# --- the dashboard ----------------------------------------------------------------------------


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_importable(dashboard):
    """Well-formed, with a Prometheus datasource variable every query uses, unique panel ids and
    unique query ids per panel, and panels that do not overlap."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    taken = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" and t["expr"].strip() for t in panel["targets"])


def test_dashboard_queries_only_what_the_server_exports(dashboard, exported):
    """Every query (panels and variables) selects series /metrics exports, with their labels;
    and every callgate_ family the server exports is on some panel."""
    used = set()
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            used |= check_query(target["expr"], exported, f"panel {panel['title']!r}")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert query, variable["definition"]
            assert query.group(1) in exported and query.group(2) in exported[query.group(1)] | TARGET_LABELS
    ours = {family(s) for s in exported if s.startswith("callgate_")}
    assert ours - {family(s) for s in used} == set(), "exported but on no panel"


# --- the alert rules --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_are_complete_and_ask_for_exported_series(rules, exported):
    """Each rule has a duration, a severity, and annotations saying what happened and what to do;
    its expression selects exported series and labels; its text names only labels its result has."""
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {"CallgateDatabaseDown", "CallgateFailModeActive", "CallgateLimiterLatencyHigh", "CallgateCallsFailing",
            "CallgateRelayLatencyHigh", "CallgateStreamFramesDropped"} <= set(names)
    for rule in rules:
        where = f"alert {rule['alert']}"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), where
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, where
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), where
        series = check_query(rule["expr"], exported, where)
        groupings = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
        carried = ({label.strip() for g in groupings for label in g.split(",")} if groupings
                   else set().union(*(exported[s] for s in series)) | TARGET_LABELS)
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in carried, f"{where}: its annotations use $labels.{label}, which its result lacks"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


@needs_promtool
def test_promtool_accepts_the_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, values: str, **labels: str) -> dict:
    labels = {"instance": "a:8081", "job": "callgate", **labels}
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def _buckets(name: str, le_values: dict[str, str], **labels: str) -> list[dict]:
    return [_series(name, values, le=le, **labels) for le, values in le_values.items()]


# Each case: input series (one sample a minute), then when each alert should (and should not) be
# firing, with the labels it fires with. "b:8081" is an instance that must stay quiet.
ALERT_CASES = {
    "CallgateDatabaseDown": (
        [_series("callgate_database_up", "1 1 0x10"), _series("callgate_database_up", "1x12", instance="b:8081")],
        [("2m", []), ("4m", [{"instance": "a:8081", "job": "callgate"}])]),
    "CallgateFailModeActive": (
        [_series("callgate_limiter_decisions_total", "0+5x20", op="hit", result="allowed", source="memory"),
         _series("callgate_limiter_decisions_total", "0+50x20", op="hit", result="allowed", source="database",
                 instance="b:8081")],
        [("1m", []), ("10m", [{"instance": "a:8081", "source": "memory"}])]),
    "CallgateWriteBackStuck": (
        [_series("callgate_limiter_pending", "3x20"), _series("callgate_calls_owed", "0x20"),
         _series("callgate_database_up", "1x20"),
         _series("callgate_limiter_pending", "3x20", instance="b:8081"),
         _series("callgate_calls_owed", "1x20", instance="b:8081"),
         _series("callgate_database_up", "0x20", instance="b:8081")],
        [("3m", []), ("10m", [{"instance": "a:8081", "job": "callgate"}])]),
    "CallgateLimiterLatencyHigh": (
        _buckets("callgate_limiter_latency_seconds_bucket", {"0.005": "0x30", "0.25": "0x30", "0.5": "0+10x30",
                                                            "+Inf": "0+10x30"}, op="hit")
        + _buckets("callgate_limiter_latency_seconds_bucket", {"0.005": "0+10x30", "0.25": "0+10x30",
                                                              "0.5": "0+10x30", "+Inf": "0+10x30"},
                   op="hit", instance="b:8081"),
        [("5m", []), ("15m", [{"instance": "a:8081"}])]),
    "CallgateCallsFailing": (
        [_series("callgate_calls_total", "0+3x30", outcome="model_failed"),
         _series("callgate_calls_total", "0+7x30", outcome="caller_hangup"),
         _series("callgate_calls_total", "0+1x30", outcome="model_unavailable", instance="b:8081"),
         _series("callgate_calls_total", "0+9x30", outcome="caller_hangup", instance="b:8081")],
        [("5m", []), ("15m", [{"instance": "a:8081"}])]),
    "CallgateRelayLatencyHigh": (
        _buckets("callgate_relay_latency_seconds_bucket", {"0.01": "0x20", "0.025": "0x20", "0.05": "0+3000x20",
                                                           "+Inf": "0+3000x20"}, direction="model_to_caller")
        + _buckets("callgate_relay_latency_seconds_bucket", {"0.01": "0+3000x20", "0.025": "0+3000x20",
                                                             "0.05": "0+3000x20", "+Inf": "0+3000x20"},
                   direction="caller_to_model"),
        [("3m", []), ("10m", [{"instance": "a:8081", "direction": "model_to_caller"}])]),
    "CallgateStreamFramesDropped": (
        [_series("callgate_stream_frames_rejected_total", "0+120x30", reason="too_fast"),
         _series("callgate_stream_frames_rejected_total", "0+30x30", reason="malformed")],
        [("5m", []), ("15m", [{"instance": "a:8081", "reason": "too_fast"}])]),
    "CallgateQueueOverflow": (
        [_series("callgate_frontend_dropped_total", "0x10 1x20", reason="behind"),
         _series("callgate_fanout_dropped_total", "0x30", reason="queue_full"),
         _series("callgate_frontend_dropped_total", "0x30", reason="behind", instance="b:8081"),
         _series("callgate_fanout_dropped_total", "0x30", reason="queue_full", instance="b:8081")],
        [("9m", []), ("18m", [{"instance": "a:8081"}])]),
    "CallgateFrontendRefusals": (
        [_series("callgate_frontend_refused_total", "0+300x30", reason="origin")],
        [("5m", []), ("15m", [{"instance": "a:8081", "reason": "origin"}])]),
    "CallgateMetricsAbsent": (
        [_series("callgate_active_calls", "0x10")],
        [("3m", []), ("6m", [{}])]),
}


@needs_promtool
def test_each_alert_fires_when_it_should_and_not_before(rules, tmp_path):
    """promtool's rule unit tests over the real rules (their annotations left out: promtool
    compares them verbatim, and they are prose): each alert fires after its `for:` on the
    instance in trouble, and not on the healthy one."""
    assert set(ALERT_CASES) == {r["alert"] for r in rules}, "every alert needs a case here"
    bare = [{k: v for k, v in rule.items() if k != "annotations"} for rule in rules]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "callgate", "rules": bare}]}))
    severity = {r["alert"]: r["labels"]["severity"] for r in rules}
    tests = []
    for alert, (series, checks) in ALERT_CASES.items():
        tests.append({"interval": "1m", "input_series": series, "alert_rule_test": [
            {"eval_time": at, "alertname": alert,
             "exp_alerts": [{"exp_labels": {**labels, "severity": severity[alert]}} for labels in firing]}
            for at, firing in checks]})
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m",
                                                        "tests": tests}))
    result = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- backup and restore -----------------------------------------------------------------------


NUMBERS = [f"+1415555{n:04d}" for n in range(100, 130)]


def _with_password(dsn: str) -> tuple[str, str]:
    """``dsn`` carrying a password (the test server trusts loopback, so any will do), and it."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, parts.password
    secret = "not-to-be-printed-" + uuid.uuid4().hex[:8]
    return dsn.replace(f"{parts.username}@", f"{parts.username}:{secret}@", 1), secret


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FLY_DATABASE_URL", "CALLGATE_DATA_DIR")}
    return env | {"PHONE_ENCRYPTION_KEY": TEST_KEY} | changes


async def _script(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(BACKUP), *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode()


async def _charge(pool, clock: Clock) -> None:
    """Real limiter state: number i charged i % 3 times (0, 1 or 2 of its 2), a full number
    charged once more (refused), one charge refunded."""
    limiter = make_limiter(pool, clock=clock)
    for i, number in enumerate(NUMBERS):
        for k in range(i % 3 + (1 if i % 3 == 2 else 0)):
            await limiter.hit(number, f"charge-{i}-{k}")
            clock.advance(1000)
    assert await limiter.refund("charge-4-0")


async def _limits(pool, clock: Clock) -> dict[str, tuple]:
    limiter = make_limiter(pool, clock=clock)
    answers = {}
    for number in NUMBERS:
        d = await limiter.test(number)
        answers[number] = (d.allowed, d.remaining, d.reset_time, d.reason, d.source)
    return answers


async def _schema(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]
    finally:
        await conn.close()


def _quiet(output: str, secret: str) -> None:
    """Nothing printed that must not be: the DSN's password, any number (whole or its digits)."""
    assert secret not in output
    for number in NUMBERS:
        assert number not in output and number[2:] not in output and number[-7:] not in output


async def test_a_restored_backup_keeps_every_limit(server_dsn, dsn, tmp_path):
    """External PostgreSQL (DATABASE_URL): charge numbers, back up, drop the database and make it
    again empty, restore: every number gets the same answer (remaining, reset time, refusal),
    charge ids stay idempotent, the schema is at the current migration; nothing printed holds
    the password or a number."""
    clock = Clock()
    pool = await create_pool(dsn, 4, client_timeout_ms=TEST_DB_TIMEOUT_MS)
    try:
        await _charge(pool, clock)
        before = await _limits(pool, clock)
        stats_before = await make_limiter(pool, clock=clock).stats()
    finally:
        await pool.close()
    assert {a[1] for a in before.values()} == {0, 1, 2} and any(a[3] == "limit_reached" for a in before.values())

    secret_dsn, secret = _with_password(dsn)
    file = tmp_path / "callgate.dump"
    code, out = await _script("backup", str(file), env=_env(DATABASE_URL=secret_dsn))
    assert code == 0, out
    assert file.stat().st_mode & 0o077 == 0  # the owner's only
    _quiet(out, secret)
    dumped = subprocess.run([tool("pg_restore"), "--file=-", str(file)], capture_output=True, text=True,
                            check=True).stdout
    _quiet(dumped, secret)  # the database holds no number, so neither does its backup

    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval("SELECT to_regclass('public.phone_limits')") is None  # wiped
    await conn.close()

    code, out = await _script("restore", str(file), env=_env(DATABASE_URL=secret_dsn))
    assert code == 0, out
    _quiet(out, secret)
    assert await _schema(dsn) == [name for name, _ in migrations()]

    pool = await create_pool(dsn, 4, client_timeout_ms=TEST_DB_TIMEOUT_MS)
    try:
        assert await _limits(pool, clock) == before
        limiter = make_limiter(pool, clock=clock)
        assert await limiter.stats() == stats_before
        # Charge ids made before the backup are still known: a replay charges nothing more.
        again = await limiter.hit(NUMBERS[1], "charge-1-0")
        assert (again.allowed, again.remaining) == (True, before[NUMBERS[1]][1])
        assert (await limiter.hit(NUMBERS[2], "charge-new")).reason == "limit_reached"
        assert (await limiter.hit(NUMBERS[1], "charge-new")).remaining == 0
    finally:
        await pool.close()


async def test_restore_refuses_while_a_server_is_connected(dsn, tmp_path):
    """A running Callgate would write its in-memory limiter state back over a restore: the
    restore refuses, says why, and changes nothing."""
    file = tmp_path / "callgate.dump"
    code, out = await _script("backup", str(file), env=_env(DATABASE_URL=dsn))
    assert code == 0, out
    pool = await create_pool(dsn, 2, client_timeout_ms=TEST_DB_TIMEOUT_MS)
    try:
        await make_limiter(pool).hit(NUMBERS[0], "after-the-backup")
    finally:
        await pool.close()
    async with callgate(dsn) as h:
        async with aiohttp.ClientSession() as http, http.get(h.url + "/healthz") as resp:
            assert (await resp.json())["database"] == "ok"  # its pool is open on the database
        code, out = await _script("restore", str(file), env=_env(DATABASE_URL=dsn))
    assert code == 1
    assert "Callgate connection(s)" in out and "stop every instance" in out
    pool = await create_pool(dsn, 2, client_timeout_ms=TEST_DB_TIMEOUT_MS)
    try:
        assert (await make_limiter(pool).test(NUMBERS[0])).remaining == 1  # the later charge is still there
    finally:
        await pool.close()


@pytest.fixture
def folder():
    """A folder of our own for embedded servers, not pytest's tmp_path: as root they run as
    another user, who needs to walk down to it, and each pytest session that starts takes that
    right away from pytest's base folder."""
    path = Path(tempfile.mkdtemp(prefix="callgate-test-ops-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_backup_and_restore_of_the_embedded_database(folder):
    """No DATABASE_URL: the backup starts the embedded PostgreSQL in CALLGATE_DATA_DIR, dumps it
    and stops it again; restoring into a new machine's empty CALLGATE_DATA_DIR gives the same
    limits; one already running is used and left running."""
    old, new = EmbeddedPostgres(folder / "old" / "pg"), EmbeddedPostgres(folder / "new" / "pg")
    clock = Clock()
    try:
        dsn = await asyncio.to_thread(old.start)
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.close()
        pool = await create_pool(dsn, 4, client_timeout_ms=TEST_DB_TIMEOUT_MS)
        try:
            await _charge(pool, clock)
            before = await _limits(pool, clock)
        finally:
            await pool.close()
        await asyncio.to_thread(old.stop)

        file = folder / "embedded.dump"
        code, out = await _script("backup", str(file), env=_env(CALLGATE_DATA_DIR=str(folder / "old")))
        assert code == 0, out
        assert "(embedded)" in out and not old.running  # stopped again: it was not running before
        code, out = await _script("restore", str(file), env=_env(CALLGATE_DATA_DIR=str(folder / "new")))
        assert code == 0, out
        assert not new.running

        dsn = await asyncio.to_thread(new.start)
        assert await _schema(dsn) == [name for name, _ in migrations()]
        pool = await create_pool(dsn, 4, client_timeout_ms=TEST_DB_TIMEOUT_MS)
        try:
            assert await _limits(pool, clock) == before
        finally:
            await pool.close()
        # A PostgreSQL already running (a server's) is backed up as it is, and left running.
        code, out = await _script("backup", str(folder / "live.dump"), env=_env(CALLGATE_DATA_DIR=str(folder / "new")))
        assert code == 0, out
        assert new.running
    finally:
        for pg in (old, new):
            await asyncio.to_thread(pg.stop)


async def test_backup_of_a_missing_embedded_database_says_so(tmp_path):
    """Backing up an embedded database that was never made fails plainly, and makes none."""
    code, out = await _script("backup", str(tmp_path / "x.dump"), env=_env(CALLGATE_DATA_DIR=str(tmp_path)))
    assert code == 1 and "no embedded database" in out
    assert not (tmp_path / "pg").exists() and not (tmp_path / "x.dump").exists()

"""Docs that cannot lie: what README.md and docs/*.md name must exist in the code.

- every ``sh`` command: the scripts and files it runs exist, ``server.py``'s arguments are
  accepted by its parser (``./scripts/run`` passes them through), and a bench or tools
  script's ``--flags`` are ones its argparse defines; a fence right after a line
  ``<!-- runnable -->`` is run (bash, in the repository, no network, a scratch data folder)
  and must exit 0;
- every ``ALL_CAPS_NAME`` in backticks (or assigned in a command) is a variable of
  ``config.VARIABLES``, a constant the code defines, or one of another system's names listed
  below with the reason; and every variable is explained somewhere by hand (README.md or a
  page other than the generated configuration page);
- every route in backticks (``/x``, ``GET /x``) is one of the application's routes; every
  /logs message type in backticks is one of protocol.py's; every ``callgate_*`` metric is
  one that /metrics exports; every JSON example of a /logs message matches its schema.

The pages are read with their generated parts filled in (scripts/docs_hooks.py), so what
protocol.py and config.py say on them is checked too.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from aiohttp import web

import config
import metrics
import protocol
import worker_metrics
from bridge.fanout import CHANNEL
from helpers import ROOT, settings_for
from logs_traffic import problem_with
from server import create_app, parse_args

# scripts/ is not a package: the hooks are loaded by path, as MkDocs loads them.
_spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
docs_hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_hooks)

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
GENERATED_PAGE = ROOT / "docs" / "configuration.md"  # the table of config.VARIABLES itself

# ALL_CAPS names in backticks that are not Callgate's variables, by whose they are.
OTHER_NAMES = {
    # the docs' own build: MkDocs' switch for its 2.0 notice
    "NO_MKDOCS_2_WARNING",
    # the operating system's: the socket option that lets workers share a port; the HTTP proxy variable
    "SO_REUSEPORT", "HTTPS_PROXY",
    # Twilio's names for its two signature algorithms (twilio.request_validator)
    "HMAC_SHA1", "HMAC_SHA256",
}
# phone-screen's own variables, named only where the migration guide maps them onto ours.
PHONE_SCREEN_NAMES = {
    "NEXT_PUBLIC_ALLOWED_SCENARIOS", "NEXT_PUBLIC_TURNSTILE_ENABLED", "NEXT_PUBLIC_TURNSTILE_SITE_KEY",
    "NEXT_PUBLIC_WEBSOCKET_SERVER_URL", "NODE_ENV", "RATE_LIMIT_MAX_CALLS", "RATE_LIMIT_MAX_CONCURRENT_CONNECTIONS",
    "RATE_LIMIT_MAX_REQUESTS", "RATE_LIMIT_SUSPENSION_DURATION", "RATE_LIMIT_WINDOW_MS",
}
MIGRATION_PAGE = "docs/migrating.md"
# Paths in backticks that are not routes: the machine's files, and other systems' endpoints.
NOT_ROUTES = (
    "/usr/", "/tmp/", "/etc/", "/var/", "/opt/", "/home/", "/root/", "/dev/", "/proc/", "/app/", "/data",
    "/work/",
    "/v1/realtime",          # OpenAI's Realtime endpoint (tools/fake_realtime.py serves it on loopback)
    "/2010-04-01/",          # Twilio's REST API
    "/Calls",                # ...its calls resource
    "/-/",                   # Prometheus's own lifecycle endpoints (/-/reload)
)
# Hosts in commands whose paths are this server's routes.
OUR_HOSTS = re.compile(r"^(127\.0\.0\.1|localhost):8081$|\.fly\.dev$|^callgate\.local$")
RUN_TIMEOUT_S = 120


# --- reading the pages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    page: Path
    line: int
    info: str
    text: str
    runnable: bool

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@cache
def rendered(page: Path) -> str:
    """The page as the site shows it: generated parts filled in."""
    return docs_hooks.on_page_markdown(page.read_text(), None, None, None)


def split(text: str) -> tuple[list[tuple[int, str, str, bool]], str]:
    """(fences as (line, info, text, runnable), the prose with the fences blanked out)."""
    fences, prose, lines = [], [], text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            prose.append(lines[i])
            i += 1
            continue
        indent, ticks = len(opening["indent"]), opening["ticks"]
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body, start = [], i + 1
        i += 1
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        fences.append((start, opening["info"].strip().split(" ")[0], "\n".join(body), before == "<!-- runnable -->"))
        prose.extend([""] * (len(body) + 2))
        i += 1
    return fences, "\n".join(prose)


def fences(*infos: str, generated: bool = False) -> list[Fence]:
    """The pages' fences of these kinds: as written (their line numbers are the file's), or
    with the generated parts (the schemas) too."""
    found = []
    for page in PAGES:
        for line, info, text, runnable in split(rendered(page) if generated else page.read_text())[0]:
            if info in infos:
                found.append(Fence(page, line, info, text, runnable))
    return found


CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def spans(page: Path) -> list[str]:
    """The page's inline code, outside its fences."""
    return [m.group(2).strip() for m in CODE_SPAN.finditer(split(rendered(page))[1])]


def all_spans() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), span) for page in PAGES for span in spans(page)]


# --- shell commands -----------------------------------------------------------------------------


OPERATORS = {"&&", "||", "|", ";", "&", "(", ")", "$(", "`"}


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: comments dropped, continuations joined, split at
    operators."""
    joined = re.sub(r"\\\n", " ", script)
    found = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()`")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in OPERATORS or set(token) <= set(";&|()`"):
                if current:
                    found.append(current)
                current = []
            else:
                current.append(token)
        if current:
            found.append(current)
    return found


ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


def without_assignments(command: list[str]) -> list[str]:
    i = 0
    while i < len(command) and ASSIGNMENT.match(command[i]):
        i += 1
    return command[i:]


PYTHON = re.compile(r"^(\S*/)?python3?$")


def server_argv_problem(argv: list[str]) -> str | None:
    """Why server.py would refuse ``argv`` (None: it parses)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return out.getvalue().strip().splitlines()[-1] if out.getvalue().strip() else f"exit {exc.code}"
    return None


@cache
def argparse_options(script: Path) -> frozenset[str] | None:
    """The option strings a script's argparse defines (read from its source, not run); None
    when it defines none."""
    options = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                        and a.value.startswith("-")}
    return frozenset(options | {"-h", "--help"}) if options else None


def script_problems(path: str, args: list[str]) -> list[str]:
    """What is wrong with running ``path`` (relative to the repository) with ``args``."""
    path = path.removeprefix("./").removeprefix("/app/")  # /app: the image's copy (Dockerfile WORKDIR)
    target = ROOT / path
    if not target.exists():
        return [f"{path} does not exist"]
    if path in ("server.py", "scripts/run"):
        problem = server_argv_problem(args)
        return [f"server.py {' '.join(args)}: {problem}"] if problem else []
    if target.suffix == ".py" and (options := argparse_options(target)) is not None:
        return [f"{path}: no option {arg.split('=')[0]}" for arg in args
                if arg.startswith("--") and arg.split("=")[0] not in options]
    return []


def command_problems(command: list[str]) -> list[str]:
    words = without_assignments(command)
    problems = []
    if not words:
        return problems
    program, args = words[0], words[1:]
    if PYTHON.match(program):
        if args and args[0] == "-m":
            module = args[1] if len(args) > 1 else ""
            local = ROOT / (module.replace(".", "/") + ".py")
            if module.split(".")[0] in ("bench", "tools", "scripts", "db") and not local.exists():
                problems.append(f"python -m {module}: no such module here")
        elif args and args[0].endswith(".py"):
            problems += script_problems(args[0], args[1:])
    elif program.startswith(("./", "scripts/", "bench/", "tools/")):
        problems += script_problems(program, args)
    # A command handed to another one as one argument (fly ssh console -C "python server.py ...").
    for arg in args:
        if " " in arg and re.search(r"(^|/)python3?\s+\S+\.py", arg):
            for inner in commands(arg):
                problems += command_problems(inner)
    return problems


SHELL = ("sh", "bash", "shell")


@pytest.mark.parametrize("fence", fences(*SHELL), ids=str)
def test_shell_commands_run_what_exists(fence):
    problems = [p for command in commands(fence.text) for p in command_problems(command)]
    assert problems == [], f"{fence}: {problems}"


def test_the_command_checks_can_fail():
    """The checks above, on commands that must fail them and commands that must pass."""
    assert command_problems(["./scripts/nope"]) == ["scripts/nope does not exist"]
    assert command_problems([".venv/bin/python", "server.py", "--prot", "1"])
    assert command_problems(["python", "server.py", "admin", "frobnicate"])
    assert command_problems(["PORT=1", "./scripts/run", "--workers", "two"])
    assert command_problems([".venv/bin/python", "tools/simulate_call.py", "--no-such-flag"])
    assert command_problems(["fly", "ssh", "console", "-C", "python server.py admin doctr"])
    assert command_problems(["PORT=1", "./scripts/run", "--port", "9000"]) == []
    assert command_problems(["python", "server.py", "admin", "reset", "+14155550100"]) == []
    assert commands("A=1 ./x --y \\\n  --z  # note\n# only a comment\nb && c | d") == \
        [["A=1", "./x", "--y", "--z"], ["b"], ["c"], ["d"]]


@pytest.mark.parametrize("fence", [f for f in fences(*SHELL) if f.runnable], ids=str)
def test_runnable_fences_exit_0(fence, tmp_path):
    """Run as a reader would, in the repository: no network (a namespace of its own with only
    loopback, where this machine can make one), a scratch data folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FLY_DATABASE_URL")}
    env["CALLGATE_DATA_DIR"] = str(tmp_path / "data")
    script = "set -euo pipefail\n" + fence.text
    argv = ["bash", "-c", script]
    if shutil.which("unshare") and shutil.which("ip") and subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode == 0:
        argv = ["unshare", "-n", "bash", "-c", "ip link set lo up\n" + script]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"{fence} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


# --- environment variables ----------------------------------------------------------------------


VARIABLES = {v.name for v in config.VARIABLES}
CAPS = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b(_<)?")


@cache
def python_files() -> tuple[Path, ...]:
    return tuple(p for p in ROOT.rglob("*.py")
                 if not any(part.startswith(".") or part == "node_modules" for part in p.relative_to(ROOT).parts))


@cache
def code_constants() -> frozenset[str]:
    """Module-level ALL_CAPS names the project's Python defines (a page may name a constant)."""
    names = set()
    for path in python_files():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and name.id.isupper():
                        names.add(name.id)
    return frozenset(names)


@cache
def env_reads() -> frozenset[str]:
    """Environment variables the project's Python reads itself (os.environ / os.getenv) outside
    config.VARIABLES: the benchmarks' and tools' own switches (SOAK_KEEP_LOGS)."""
    names = set()
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv", "environ.get"):
                key = node.args[0] if node.args else None
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
                key = node.slice
            else:
                continue
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                names.add(key.value)
    return frozenset(names)


def unknown_name(match: re.Match, page: str) -> str | None:
    name = match.group(0).removesuffix("_<")
    if match.group(1):  # NAME_<region>: a family of variables
        return None if any(v.startswith(name + "_") for v in VARIABLES) else match.group(0)
    if name in VARIABLES or name in OTHER_NAMES or name in code_constants() or name in env_reads():
        return None
    if page == MIGRATION_PAGE and name in PHONE_SCREEN_NAMES:
        return None
    return name


def test_every_variable_named_exists():
    unknown = {(page, name) for page, span in all_spans() for m in CAPS.finditer(span)
               if (name := unknown_name(m, page)) is not None}
    for fence in fences(*SHELL):
        for command in commands(fence.text):
            for token in command:
                if (m := ASSIGNMENT.match(token)) and m.group(1).isupper() and "_" in m.group(1):
                    if m.group(1) not in VARIABLES | OTHER_NAMES | env_reads():
                        unknown.add((str(fence), m.group(1)))
    assert sorted(unknown) == [], sorted(unknown)


def test_every_variable_is_explained_by_hand():
    """The generated table lists them all; each must also be explained where a person reads."""
    text = "\n".join(p.read_text() for p in PAGES if p != GENERATED_PAGE)
    assert [v for v in sorted(VARIABLES) if not re.search(rf"\b{v}\b", text)] == []


# --- routes, message types, metrics -------------------------------------------------------------


@cache
def app_routes() -> tuple[tuple[str, str, bool], ...]:
    """(method, path, is a prefix) of every route of the application."""
    app = create_app(settings_for("postgresql://127.0.0.1:1/unused"))
    found = []
    for route in app.router.routes():
        prefix = isinstance(route.resource, web.StaticResource)
        found.append((route.method, route.resource.canonical + ("/" if prefix else ""), prefix))
    return tuple(found)


def is_route(method: str | None, path: str) -> bool:
    path = path.split("?")[0].split("#")[0]
    method = {"WS": "GET", None: None}.get(method, method)
    for route_method, route_path, prefix in app_routes():
        if (path.startswith(route_path) if prefix else path == route_path) and \
                (method is None or route_method in (method, "*")):
            return True
    return False


ROUTE = re.compile(r"^(?:(GET|POST|HEAD|PUT|PATCH|DELETE|OPTIONS|WS) )?(/[^\s`]*)$")


def test_every_route_named_exists():
    wrong = set()
    for page, span in all_spans():
        if (m := ROUTE.match(span)) and not m.group(2).startswith(NOT_ROUTES) and not is_route(m.group(1), m.group(2)):
            wrong.add((page, span))
    for fence in fences(*SHELL):
        for command in commands(fence.text):
            for token in command:
                url = re.match(r"^https?://([^/\s]+)(/[^\s]*)?$", token)
                if url and OUR_HOSTS.search(url.group(1)) and url.group(2) and not is_route(None, url.group(2)):
                    wrong.add((str(fence), token))
    assert sorted(wrong) == [], sorted(wrong)


def test_the_route_check_can_fail():
    assert is_route("GET", "/healthz") and is_route("POST", "/twiml?charge=x") and is_route(None, "/static/app.js")
    assert not is_route(None, "/helthz") and not is_route("POST", "/healthz")


FILE_SUFFIXES = ("py", "md", "js", "sql", "toml", "json", "html", "css", "txt", "yml", "yaml", "sh", "ulaw", "dump")
MESSAGE_TYPE = re.compile(r"^((?:call|transcript)\.[a-z_]+|rate_limit_[a-z_]+)(?![.\w])")


def message_type(span: str) -> str | None:
    """The /logs message type a span names (``call.start``, ``call.subscribe {callSid, token}``),
    not a file (``call.py``)."""
    m = MESSAGE_TYPE.match(span)
    return m.group(1) if m and m.group(1).rsplit(".", 1)[-1] not in FILE_SUFFIXES else None


def test_every_message_type_named_exists():
    known = set(protocol.BY_TYPE) | set(protocol.REFUSED)
    named = {(page, kind) for page, span in all_spans() if (kind := message_type(span))}
    assert named, "no message type found on any page: the pattern is broken"
    assert sorted((page, t) for page, t in named if t not in known) == []


def test_json_examples_of_logs_messages_match_their_schemas():
    """A JSON fence (a whole document, or one message a line) holding /logs messages."""
    wrong, checked = [], 0
    for fence in fences("json", generated=True):
        try:
            documents = [json.loads(fence.text)]
        except json.JSONDecodeError:
            documents = [json.loads(line) for line in fence.text.splitlines() if line.strip().startswith("{")]
        for message in documents:
            known = isinstance(message, dict) and protocol.BY_TYPE.get(message.get("type"))
            if known:
                checked += 1
                if problem := problem_with(message, known.direction):
                    wrong.append((str(fence), message["type"], problem))
    assert checked, "no JSON example of a /logs message on any page"
    assert wrong == []


@cache
def exported_metrics() -> frozenset[str]:
    """Every name /metrics exports: each family, and the samples' names by the family's type."""
    names = set()
    for family in metrics.Metrics().registry.collect():
        names.add(family.name)
        names |= {family.name + s for s in {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum",
                  "_count", "_created"), "summary": ("_sum", "_count", "_created")}.get(family.type, ())}
        names |= {sample.name for sample in family.samples}
    names.add(worker_metrics.MISSING)  # added by a worker of several, to the merged answer
    return frozenset(names)


METRIC = re.compile(r"\bcallgate_[a-z0-9_]+")
NOT_METRICS = {CHANNEL}  # the LISTEN/NOTIFY channel between instances (bridge/fanout.py)


def test_every_metric_named_is_exported():
    exported = exported_metrics()
    assert "callgate_calls_total" in exported
    named = {(page, m.group(0)) for page, span in all_spans() for m in METRIC.finditer(span)}
    for fence in fences(*SHELL, "promql", "text"):
        named |= {(str(fence), m.group(0)) for m in METRIC.finditer(fence.text)}
    assert sorted((p, n) for p, n in named if n not in exported and n not in NOT_METRICS) == []

"""Every /logs frame of the test suite, checked against protocol.py as it passes.

Checked where all of it goes through: the server's side of each connection
(handlers/frontend.py ``Client``), so the test clients, the page in Chromium and the
operator page are all covered without each test doing anything. What a test sends is the
client's business: tests send malformed frames on purpose, so a frame that does not match a
browser → server schema is only counted. What the server sends is ours: each message must
match its server → browser schema, and a frame that matches its schema must never be
answered as malformed (the schema would be looser than the server). ``problems`` fails the
test that produced them (tests/conftest.py).
"""

from __future__ import annotations

import contextvars
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import orjson

import protocol
from handlers import frontend

# Answers that say "your frame is malformed": a frame its schema accepts must never get one.
MALFORMED = frozenset({"invalid_json", "invalid_message", "unknown_type"})

_VALIDATORS = {m.type: jsonschema.Draft202012Validator(protocol.schema(m)) for m in protocol.MESSAGES}


def problem_with(message: Any, direction: str) -> str | None:
    """Why ``message`` (parsed JSON) is not a valid ``direction`` message of protocol.py; None
    when it is."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return "not an object with a string type"
    kind = message["type"]
    known = protocol.BY_TYPE.get(kind)
    if known is None or known.direction != direction:
        return f"{kind!r} is not a {direction} message"
    errors = sorted(_VALIDATORS[kind].iter_errors(message), key=lambda e: list(e.absolute_path))
    if errors:
        return "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(message)'}: {e.message}" for e in errors[:3])
    return None


@dataclass
class Frame:
    """One frame a browser sent, and what the server answered while handling it."""

    client: object
    text: str
    problem: str | None  # why it does not match a browser → server schema
    kind: str | None
    answers: list[dict] = field(default_factory=list)


_ANSWERING: contextvars.ContextVar[Frame | None] = contextvars.ContextVar("answering", default=None)


@dataclass
class Traffic:
    inbound: list[Frame] = field(default_factory=list)
    outbound: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# The whole session's counts, for the summary at the end of the run.
SEEN: Counter = Counter()


def _parse(text: str) -> tuple[Any, str | None]:
    try:
        return orjson.loads(text), None
    except orjson.JSONDecodeError:
        return None, "not JSON"


def install(monkeypatch, traffic: Traffic) -> None:
    """Check every /logs frame from now on (until ``monkeypatch`` is undone) into ``traffic``."""
    handle, send = frontend.Client._handle, frontend.Client.send

    async def checked_handle(self, data: str) -> None:
        message, problem = _parse(data)
        problem = problem or problem_with(message, protocol.IN)
        kind = message.get("type") if isinstance(message, dict) and isinstance(message.get("type"), str) else None
        frame = Frame(self, data, problem, kind)
        traffic.inbound.append(frame)
        SEEN["in", kind if problem is None else f"invalid {kind or 'frame'}"] += 1
        token = _ANSWERING.set(frame)  # a call.start's background task inherits it
        try:
            await handle(self, data)
        finally:
            _ANSWERING.reset(token)
        if kind in protocol.REFUSED and not any(a.get("code") == "not_supported" for a in frame.answers):
            traffic.problems.append(f"{kind} was not answered with not_supported: {frame.answers}")

    def checked_send(self, message: dict) -> None:
        wire = orjson.loads(orjson.dumps(message))  # exactly what goes on the socket
        traffic.outbound.append(wire)
        problem = problem_with(wire, protocol.OUT)
        SEEN["out", wire.get("type") if problem is None else f"invalid {wire.get('type')}"] += 1
        if problem is not None:
            traffic.problems.append(f"the server sent {_short(wire)}: {problem}")
        frame = _ANSWERING.get()
        if frame is not None and frame.client is self:
            frame.answers.append(wire)
            if frame.problem is None and wire.get("type") == "error" and wire.get("code") in MALFORMED:
                traffic.problems.append(f"{_short(frame.text)} matches its schema but was answered {_short(wire)}")
        send(self, message)

    monkeypatch.setattr(frontend.Client, "_handle", checked_handle)
    monkeypatch.setattr(frontend.Client, "send", checked_send)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 300 else text[:300] + "…"


def summary() -> list[str]:
    """Lines for the end of the run: what was checked, and which message types no test used."""
    if not SEEN:
        return []
    lines = []
    for direction, label in (("in", protocol.IN), ("out", protocol.OUT)):
        counts = {k: n for (d, k), n in SEEN.items() if d == direction}
        total = sum(counts.values())
        shown = ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"{label}: {total} frame(s) checked: {shown}")
    unseen = [m.type for m in protocol.MESSAGES if not SEEN[("in" if m.direction == protocol.IN else "out", m.type)]]
    if unseen:
        lines.append(f"never seen in this run: {', '.join(unseen)}")
    return lines

"""The function tools the agent may call, in one registry. ``GET /tools`` lists their schemas.

A tool gets its parsed arguments and the call's context, and returns a JSON-able value; the
bridge sends it to the model once, as a string, then asks for the next response.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

log = logging.getLogger("callgate.tools")

TOOL_TIMEOUT_S = 5.0


class CallContext(Protocol):
    call_sid: str

    def request_end(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], CallContext], Awaitable[Any]]

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters}


async def _end_call(args: dict[str, Any], call: CallContext) -> Any:
    # A fixed reason: the model's own words (in the function_call event) could hold anything,
    # a phone number included, and the reason becomes a metric label and a database value.
    call.request_end("agent_ended")
    return {"ok": True, "note": "say a short goodbye now; the call ends when it has played"}


async def _current_time(args: dict[str, Any], call: CallContext) -> Any:
    name = str(args.get("timezone") or "UTC")
    try:
        zone = zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return {"error": f"unknown time zone {name!r}"}
    now = dt.datetime.now(zone)
    return {"timezone": name, "iso": now.isoformat(timespec="minutes"), "spoken": now.strftime("%A %-d %B, %H:%M")}


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("end_call", "End the phone call after you have said goodbye.",
             {"type": "object", "properties": {"reason": {"type": "string", "description": "why the call ends"}},
              "additionalProperties": False}, _end_call),
        Tool("get_current_time", "The current date and time in a time zone.",
             {"type": "object", "properties": {"timezone": {"type": "string", "description": "IANA name, e.g. America/New_York"}},
              "additionalProperties": False}, _current_time),
    )
}


def schemas(names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    return [t.schema() for n, t in TOOLS.items() if names is None or n in names]


async def run(name: str, arguments: str, call: CallContext) -> str:
    """Run one tool; always returns the output string for the model (errors included)."""
    tool = TOOLS.get(name)
    if tool is None:
        return orjson.dumps({"error": f"no tool named {name!r}"}).decode()
    try:
        args = orjson.loads(arguments or "{}")
        if not isinstance(args, dict):
            raise ValueError("arguments are not an object")
    except (orjson.JSONDecodeError, ValueError) as exc:
        return orjson.dumps({"error": f"bad arguments: {exc}"}).decode()
    try:
        async with asyncio.timeout(TOOL_TIMEOUT_S):
            result = await tool.run(args, call)
    except TimeoutError:
        result = {"error": f"{name} took too long"}
    except Exception as exc:  # noqa: BLE001 - a broken tool must not end the call
        log.exception("tool %s failed", name)
        result = {"error": f"{name} failed: {type(exc).__name__}"}
    return orjson.dumps(result).decode()

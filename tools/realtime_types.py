"""The OpenAI Realtime GA event types, as the official ``openai`` SDK defines them.

The loopback model peer (``tools/fake_realtime.py``) and the tests check every event with
these, so neither side can drift from what the real API accepts and sends. The SDK is a
development dependency: production code never imports this module.

Two facts about the SDK shape how this module checks:

- its unions (``RealtimeClientEvent``, ``RealtimeServerEvent``) carry their discriminator as
  the SDK's own annotation, which pydantic does not read: validating against the union
  tries every member and reports the wrong one. We pick the model by ``type`` ourselves;
- its models accept unknown fields silently (``extra="allow"``), where the real API answers
  an unknown parameter with an ``error``. We walk ``__pydantic_extra__`` to find them.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import pydantic
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent, RealtimeSessionCreateResponse


def _models_by_type(alias: Any) -> dict[str, type[pydantic.BaseModel]]:
    union = typing.get_args(alias)[0]  # Annotated[Union[...], PropertyInfo(...)]
    models: dict[str, type[pydantic.BaseModel]] = {}
    for model in typing.get_args(union):
        for name in typing.get_args(model.model_fields["type"].annotation):
            models[name] = model
    return models


CLIENT_EVENTS = _models_by_type(RealtimeClientEvent)
SERVER_EVENTS = _models_by_type(RealtimeServerEvent)
# The SDK types the session of session.created/.updated as the *request* model, while the API
# sends the session object itself (RealtimeSessionCreateResponse: also id, object, expires_at).
_SESSION_OBJECT_FIELDS = frozenset(f"session.{name}" for name in RealtimeSessionCreateResponse.model_fields)
_SESSION_EVENTS = frozenset({"session.created", "session.updated"})


@dataclass(frozen=True)
class Problem:
    """What is wrong with an event, worded as the real API words its ``error`` events."""

    code: str      # unknown_parameter, missing_required_parameter, invalid_type, invalid_value
    message: str
    param: str | None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def unknown_fields(model: pydantic.BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of every field the SDK's models do not declare, however deep."""
    found = [f"{prefix}{name}" for name in (model.__pydantic_extra__ or {})]
    for name in type(model).model_fields:
        found += _unknown_in(getattr(model, name), f"{prefix}{name}")
    return found


def _unknown_in(value: Any, path: str) -> list[str]:
    if isinstance(value, pydantic.BaseModel):
        return unknown_fields(value, f"{path}.")
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _unknown_in(v, f"{path}[{i}]")]
    return []


def _member(loc: tuple) -> tuple:
    """The location up to the innermost union member it passes through (by class name)."""
    for i in range(len(loc) - 1, -1, -1):
        if isinstance(loc[i], str) and loc[i][:1].isupper():
            return loc[:i + 1]
    return ()


def _relevant(errors: list[dict]) -> dict:
    """The error that matters: not one from a union member whose ``type`` does not match
    (the SDK's unions are tried member by member, and every wrong member complains)."""
    wrong = {_member(e["loc"]) for e in errors if e["type"] == "literal_error" and e["loc"][-1] == "type"}
    return next((e for e in errors if not _member(e["loc"]) or _member(e["loc"]) not in wrong), errors[0])


def _problem_from(error: pydantic.ValidationError) -> Problem:
    first = _relevant(error.errors())
    # Union members show in the location by class name (e.g. "AudioPCMU"): not a field.
    parts = [f"[{p}]" if isinstance(p, int) else p for p in first["loc"] if isinstance(p, int) or p[:1].islower()]
    param = ".".join(parts).replace(".[", "[") or None
    kind = first["type"]
    if kind == "missing":
        return Problem("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    if kind.endswith("_type") or kind in ("model_type", "dict_type", "list_type"):
        return Problem("invalid_type", f"Invalid type for '{param}': {first['msg']}.", param)
    return Problem("invalid_value", f"Invalid value for '{param}': {first['msg']}.", param)


def check(event: Any, models: dict[str, type[pydantic.BaseModel]]) -> Problem | None:
    """None when ``event`` is a valid event of one of ``models``, with no unknown field."""
    if not isinstance(event, dict):
        return Problem("invalid_type", "An event must be a JSON object.", None)
    kind = event.get("type")
    if not isinstance(kind, str):
        return Problem("missing_required_parameter", "Missing required parameter: 'type'.", "type")
    model = models.get(kind)
    if model is None:
        return Problem("invalid_value", f"Invalid value: '{kind[:80]}'. Supported values are: "
                       f"{', '.join(repr(k) for k in sorted(models))}.", "type")
    try:
        parsed = model.model_validate(event)
    except pydantic.ValidationError as exc:
        return _problem_from(exc)
    extra = unknown_fields(parsed)
    if kind in _SESSION_EVENTS and models is SERVER_EVENTS:
        extra = [path for path in extra if path not in _SESSION_OBJECT_FIELDS]
    if extra:
        return Problem("unknown_parameter", f"Unknown parameter: '{extra[0]}'.", extra[0])
    return None


def check_client_event(event: Any) -> Problem | None:
    """What the real API would refuse in a client event, or None."""
    return check(event, CLIENT_EVENTS)


def check_server_event(event: Any) -> Problem | None:
    """What the SDK would find wrong in a server event, or None."""
    return check(event, SERVER_EVENTS)

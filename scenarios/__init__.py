"""Call scenarios: what the agent is for on a call, the fields a caller fills in, its voices.

A scenario validates its config (the fields a frontend sends), then renders the agent's
instructions and the greeting from it. ``GET /scenarios`` publishes ``schema()`` of each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The Realtime API's voices (GA).
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")


class ScenarioError(ValueError):
    """A scenario id or config that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    required: bool = False
    max_length: int = 200
    options: tuple[str, ...] = ()
    placeholder: str = ""

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "label": self.label, "type": "select" if self.options else "text",
                               "required": self.required, "maxLength": self.max_length}
        if self.options:
            out["options"] = list(self.options)
        if self.placeholder:
            out["placeholder"] = self.placeholder
        return out

    def clean(self, value: object) -> str:
        if value is None or (isinstance(value, str) and not value.strip()):
            if self.required:
                raise ScenarioError(f"{self.label} is required")
            return ""
        if not isinstance(value, str):
            raise ScenarioError(f"{self.label} must be text")
        text = " ".join(value.split())  # one line: it is spliced into instructions
        if len(text) > self.max_length:
            raise ScenarioError(f"{self.label} is longer than {self.max_length} characters")
        if self.options and text not in self.options:
            raise ScenarioError(f"{self.label} must be one of: {', '.join(self.options)}")
        return text


@dataclass(frozen=True)
class Scenario:
    id: str
    name: str
    description: str
    fields: tuple[Field, ...]
    default_voice: str
    instructions: Callable[[Mapping[str, str]], str]
    greeting: Callable[[Mapping[str, str]], str]
    voices: tuple[str, ...] = VOICES
    tools: tuple[str, ...] = field(default=("end_call", "get_current_time"))

    def schema(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "description": self.description,
                "fields": [f.schema() for f in self.fields],
                "voices": list(self.voices), "defaultVoice": self.default_voice}

    def validate(self, config: object) -> dict[str, str]:
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise ScenarioError("config must be an object")
        known = {f.name for f in self.fields}
        unknown = sorted(str(k) for k in config if k not in known)
        if unknown:
            raise ScenarioError(f"unknown config field(s) for {self.id}: {', '.join(unknown)}")
        return {f.name: f.clean(config.get(f.name)) for f in self.fields}

    def voice(self, requested: object) -> str:
        if requested in (None, ""):
            return self.default_voice
        if requested not in self.voices:
            raise ScenarioError(f"voice must be one of: {', '.join(self.voices)}")
        return str(requested)


def _interview_instructions(c: Mapping[str, str]) -> str:
    who = c.get("candidateName") or "the candidate"
    company = c.get("company") or "the company"
    focus = c.get("focus") or "general"
    return (
        f"You are a friendly, professional interviewer from {company} holding a short phone screen "
        f"with {who} for the role of {c['role']}. Focus: {focus} questions. Ask one question at a "
        "time, listen, ask a brief follow-up when an answer is vague, and keep each turn under "
        "three sentences. After four or five questions, thank the candidate, tell them the team "
        "will be in touch, and end the call with the end_call tool. Never invent facts about the "
        "company; if asked something you do not know, say a recruiter will follow up."
    )


def _interview_greeting(c: Mapping[str, str]) -> str:
    who = f" {c['candidateName']}" if c.get("candidateName") else ""
    company = f" from {c['company']}" if c.get("company") else ""
    return f"Hi{who}, this is the interviewer{company}, calling about the {c['role']} role. Is now still a good time?"


def _service_instructions(c: Mapping[str, str]) -> str:
    company = c.get("company") or "our company"
    issue = c.get("issue")
    context = f" The customer wrote ahead that their issue is: {issue}." if issue else ""
    return (
        f"You are a calm, helpful customer service agent for {company}, speaking on the phone."
        f"{context} Find out what the customer needs, confirm details back to them, and resolve "
        "what you can. Keep turns short and plain. You cannot make payments or change accounts; "
        "when something needs a human, say a colleague will follow up. When the customer is done, "
        "say goodbye and use the end_call tool."
    )


def _service_greeting(c: Mapping[str, str]) -> str:
    who = f" {c['customerName']}" if c.get("customerName") else ""
    company = c.get("company") or "customer service"
    return f"Hello{who}, thanks for calling {company}. How can I help you today?"


SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in (
        Scenario(
            id="job-interview",
            name="Job interview",
            description="A first-round phone screen: the agent interviews a candidate for a role.",
            fields=(
                Field("candidateName", "Candidate name", max_length=80, placeholder="Ada Lovelace"),
                Field("role", "Role", required=True, max_length=120, placeholder="Backend engineer"),
                Field("company", "Company", max_length=120, placeholder="Acme"),
                Field("focus", "Focus", options=("general", "technical", "behavioral")),
            ),
            default_voice="marin",
            instructions=_interview_instructions,
            greeting=_interview_greeting,
        ),
        Scenario(
            id="customer-service",
            name="Customer service",
            description="A support line: the agent helps a customer with a question or problem.",
            fields=(
                Field("customerName", "Customer name", max_length=80, placeholder="Sam"),
                Field("company", "Company", max_length=120, placeholder="Acme Telecom"),
                Field("issue", "Issue", max_length=500, placeholder="My internet keeps dropping"),
            ),
            default_voice="coral",
            instructions=_service_instructions,
            greeting=_service_greeting,
        ),
    )
}

DEFAULT_SCENARIO = "customer-service"


def get(scenario_id: object) -> Scenario:
    if scenario_id in (None, ""):
        scenario_id = DEFAULT_SCENARIO
    try:
        return SCENARIOS[scenario_id]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ScenarioError(f"unknown scenario {scenario_id!r}; known: {', '.join(SCENARIOS)}") from None

"""Call scenarios: what the agent is for on a call, the fields a caller fills in, its voices.

``GET /scenarios`` publishes ``schema()`` of each in phone-screen's shape (its webapp renders
them as they are): ``{id, name, description, icon, fields: [{key, label, type, required,
placeholder, options: [{value, label}], validation: {minLength, maxLength}}], voiceOptions:
[{value, label, description}]}``, the default voice first. The field keys are phone-screen's
(``jobTitle``, ``company``, ``jobDescription``; ``companyName``, ``serviceType``,
``supportLevel``), so its webhook URLs and saved configurations work unchanged.

A scenario checks a config two ways:
- ``validate(config)``: strictly, for a person filling in a form (``call.start``): a missing
  required field, an unknown field or a bad value is a ``ScenarioError`` naming the field;
- ``validate(config, lenient=True)``: for a call already ringing (the voice webhook's URL,
  a stream's parameters): nobody can fix the form any more, so unknown fields are dropped,
  and a missing or bad value becomes the field's default (a required field with no default
  is left empty, and the instructions read well without it). What was dropped is returned
  so the caller of ``validate`` can log it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

# The Realtime API's voices (GA), with the words a form shows for them.
VOICES: dict[str, str] = {
    "marin": "Natural and clear",
    "cedar": "Warm and steady",
    "alloy": "Neutral and balanced",
    "ash": "Neutral, balanced tone",
    "ballad": "Friendly, melodic",
    "coral": "Warm and friendly",
    "echo": "Calm and resonant",
    "sage": "Professional and clear",
    "shimmer": "Bright and energetic",
    "verse": "Expressive and energetic",
}


class ScenarioError(ValueError):
    """A scenario id or config that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Field:
    key: str
    label: str
    type: str = "text"  # text | textarea | select
    required: bool = False
    placeholder: str = ""
    options: tuple[tuple[str, str], ...] = ()  # (value, label)
    min_length: int = 0
    max_length: int = 200
    default: str = ""  # used when a ringing call's config lacks the field or has a bad value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "label": self.label, "type": self.type, "required": self.required}
        if self.placeholder:
            out["placeholder"] = self.placeholder
        if self.options:
            out["options"] = [{"value": value, "label": label} for value, label in self.options]
        else:
            out["validation"] = {"maxLength": self.max_length, **({"minLength": self.min_length} if self.min_length else {})}
        return out

    def clean(self, value: object) -> str:
        """The value as the agent's instructions will use it; ScenarioError naming the field."""
        if value is None or (isinstance(value, str) and not value.strip()):
            if self.required:
                raise ScenarioError(f"{self.label} is required")
            return ""
        if not isinstance(value, str):
            raise ScenarioError(f"{self.label} must be text")
        # One line for text and choices; a textarea keeps its line breaks (a job description),
        # never control characters. Either way it is spliced into instructions as plain text.
        value = "".join(ch if ch in "\n\t" or not unicodedata.category(ch).startswith("C") else " " for ch in value)
        lines = [" ".join(line.split()) for line in value.splitlines()] if self.type == "textarea" else [" ".join(value.split())]
        text = "\n".join(line for line in lines if line)
        if len(text) > self.max_length:
            raise ScenarioError(f"{self.label} is longer than {self.max_length} characters")
        if len(text) < self.min_length:
            raise ScenarioError(f"{self.label} needs at least {self.min_length} characters")
        if self.options and text not in (value for value, _ in self.options):
            raise ScenarioError(f"{self.label} must be one of: {', '.join(v for v, _ in self.options)}")
        return text


@dataclass(frozen=True)
class Scenario:
    id: str
    name: str
    description: str
    icon: str
    fields: tuple[Field, ...]
    voices: tuple[str, ...]  # the first is the default
    instructions: Callable[[Mapping[str, str]], str]
    greeting: Callable[[Mapping[str, str]], str]
    tools: tuple[str, ...] = field(default=("end_call", "get_current_time"))

    @property
    def default_voice(self) -> str:
        return self.voices[0]

    def schema(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "description": self.description, "icon": self.icon,
                "fields": [f.schema() for f in self.fields],
                "voiceOptions": [{"value": v, "label": v.capitalize(), "description": VOICES[v]} for v in self.voices]}

    def validate(self, config: object, *, lenient: bool = False) -> dict[str, str]:
        """The config with every field cleaned (see the module docstring for the two modes)."""
        return self.check(config, lenient=lenient)[0]

    def check(self, config: object, *, lenient: bool = False) -> tuple[dict[str, str], list[str]]:
        """``validate``, also returning (in lenient mode) why fields were dropped or defaulted."""
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            if not lenient:
                raise ScenarioError("config must be an object")
            config = {}
        known = {f.key for f in self.fields}
        unknown = sorted(str(k)[:40] for k in config if k not in known)
        if unknown and not lenient:
            raise ScenarioError(f"unknown config field(s) for {self.id}: {', '.join(unknown)}")
        notes = [f"unknown field(s) dropped: {', '.join(unknown)}"] if unknown else []
        cleaned = {}
        for f in self.fields:
            raw = config.get(f.key)
            try:
                cleaned[f.key] = f.clean(raw) or f.default
            except ScenarioError as exc:
                if not lenient:
                    raise
                cleaned[f.key] = f.default
                if raw not in (None, ""):
                    notes.append(f"{exc}: its default is used")
        return cleaned, notes

    def voice(self, requested: object, *, lenient: bool = False) -> str:
        if requested in (None, ""):
            return self.default_voice
        if requested not in VOICES:
            if lenient:
                return self.default_voice
            raise ScenarioError(f"voice must be one of: {', '.join(VOICES)}")
        return str(requested)


# --- the scenarios ----------------------------------------------------------------------------


def _interview_instructions(c: Mapping[str, str]) -> str:
    role = c.get("jobTitle") or "the open position"
    company = c.get("company") or "the company"
    description = c.get("jobDescription")
    context = (f"\n\nWhat the role involves, as the hiring team wrote it:\n{description}\n\nBase your "
               "questions on it.") if description else ""
    return (
        f"You are a friendly, professional interviewer from {company}, holding a short first-round phone "
        f"screen with a candidate for {role}. Ask one question at a time, listen, ask a brief follow-up when "
        "an answer is vague, and keep each turn under three sentences. Cover the candidate's background, the "
        "skills the role needs, how they solve problems and why they want the job. After five or six questions, "
        "ask whether they have questions of their own, thank them, say the team will be in touch, and end the "
        "call with the end_call tool. Never invent facts about the company or the role; if asked something "
        f"you do not know, say a recruiter will follow up.{context}"
    )


def _interview_greeting(c: Mapping[str, str]) -> str:
    company = f" from {c['company']}" if c.get("company") else ""
    role = f"the {c['jobTitle']} role" if c.get("jobTitle") else "your application"
    return f"Hello, this is the interviewer{company}, calling about {role}. Is now still a good time to talk?"


SERVICE_TYPES = (("general", "General inquiries"), ("technical", "Technical support"),
                 ("billing", "Billing and accounts"), ("sales", "Sales"))
SUPPORT_LEVELS = (("basic", "Basic"), ("premium", "Premium"), ("enterprise", "Enterprise"))


def _service_instructions(c: Mapping[str, str]) -> str:
    company = c.get("companyName") or "the company"
    kind = dict(SERVICE_TYPES).get(c.get("serviceType", ""), "General inquiries").lower()
    level = c.get("supportLevel") or "basic"
    return (
        f"You are a calm, helpful customer service agent for {company}, answering the phone line for {kind}. "
        f"The customer has {level} support. Find out what they need, confirm details back to them, and resolve "
        "what you can. Keep turns short and plain. You cannot take payments or change accounts; when something "
        "needs a person, say a colleague will follow up. When the customer is done, say goodbye and use the "
        "end_call tool."
    )


def _service_greeting(c: Mapping[str, str]) -> str:
    company = f" {c['companyName']}" if c.get("companyName") else ""
    return f"Hello, thank you for calling{company}. How can I help you today?"


SCENARIOS: dict[str, Scenario] = {
    s.id: s
    for s in (
        Scenario(
            id="job-interview",
            name="Job interview",
            description="A first-round phone screen: the agent interviews a candidate for a role.",
            icon="💼",
            fields=(
                Field("jobTitle", "Job title", required=True, placeholder="e.g. Backend engineer",
                      min_length=2, max_length=100),
                Field("company", "Company", required=True, placeholder="e.g. Acme", min_length=2, max_length=100),
                Field("jobDescription", "Job description", type="textarea",
                      placeholder="Paste the job description or the key requirements", max_length=5000),
            ),
            voices=("marin", "cedar", "ash", "ballad", "coral", "sage", "verse"),
            instructions=_interview_instructions,
            greeting=_interview_greeting,
        ),
        Scenario(
            id="customer-service",
            name="Customer service",
            description="A support line: the agent helps a customer with a question or problem.",
            icon="🎧",
            fields=(
                Field("companyName", "Company name", required=True, placeholder="e.g. Acme Telecom",
                      min_length=2, max_length=100),
                Field("serviceType", "Service type", type="select", options=SERVICE_TYPES, default="general"),
                Field("supportLevel", "Support level", type="select", options=SUPPORT_LEVELS, default="basic"),
            ),
            voices=("coral", "marin", "cedar", "ash", "sage"),
            instructions=_service_instructions,
            greeting=_service_greeting,
        ),
    )
}

# phone-screen's default too: a webhook URL that names no scenario gets an interview.
DEFAULT_SCENARIO = "job-interview"


def get(scenario_id: object) -> Scenario:
    if scenario_id in (None, ""):
        scenario_id = DEFAULT_SCENARIO
    try:
        return SCENARIOS[scenario_id]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ScenarioError(f"unknown scenario {str(scenario_id)[:60]!r}; known: {', '.join(SCENARIOS)}") from None


# phone-screen's webhook URLs name an interview's fields directly (?jobTitle=&company=...).
QUERY_FIELDS = ("jobTitle", "company", "jobDescription")


def from_query(query: Mapping[str, str]) -> tuple[Scenario, dict[str, str], str, list[str]]:
    """What a voice webhook's URL asks for: ``scenario`` or ``scenarioId``, ``config`` (a JSON
    object), phone-screen's ``jobTitle``/``company``/``jobDescription`` (which choose the
    interview when no scenario is named, and fill what ``config`` leaves out) and ``voice``.
    The call is ringing: what cannot be used gets the defaults (see ``Scenario.check``).
    Returns (scenario, config, voice, notes on what was dropped); an unknown scenario is a
    ScenarioError (a mistake in the URL that only its owner can fix)."""
    wanted = query.get("scenarioId") or query.get("scenario")
    if not wanted and any(query.get(k) for k in QUERY_FIELDS):
        wanted = "job-interview"
    scenario = get(wanted)
    notes: list[str] = []
    config: dict[str, Any] = {}
    if query.get("config"):
        try:
            parsed = orjson.loads(query["config"])
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            config.update(parsed)
        else:
            notes.append("config is not a JSON object: ignored")
    keys = {f.key for f in scenario.fields}
    for key in QUERY_FIELDS:
        if query.get(key) and key in keys:
            config.setdefault(key, query[key])
    config, more = scenario.check(config, lenient=True)
    voice = scenario.voice(query.get("voice"), lenient=True)
    if query.get("voice") and voice != query["voice"]:
        notes.append(f"voice {query['voice'][:20]!r} is not one of {', '.join(VOICES)}: {voice} is used")
    return scenario, config, voice, notes + more

"""Scenarios: schemas, validation naming the field, voices, instructions and greetings."""

from __future__ import annotations

import pytest

import scenarios


def test_both_scenarios_publish_a_schema():
    """job-interview and customer-service publish id, name, fields and voices."""
    for sid in ("job-interview", "customer-service"):
        schema = scenarios.get(sid).schema()
        assert schema["id"] == sid and schema["fields"] and schema["defaultVoice"] in schema["voices"]


def test_interview_needs_a_role_and_renders_it():
    """The role is required, and the greeting and instructions use the config."""
    s = scenarios.get("job-interview")
    with pytest.raises(scenarios.ScenarioError, match="Role is required"):
        s.validate({})
    config = s.validate({"role": "  Backend   engineer ", "candidateName": "Ada", "focus": "technical"})
    assert config["role"] == "Backend engineer"
    assert "Backend engineer" in s.instructions(config) and "Ada" in s.greeting(config)


@pytest.mark.parametrize(("config", "message"), [
    ({"role": "x", "focus": "chess"}, "Focus must be one of"),
    ({"role": "x" * 500}, "longer than 120"),
    ({"role": 5}, "must be text"),
    ({"role": "x", "salary": "1"}, "unknown config field"),
    ("role", "config must be an object"),
])
def test_bad_config_names_the_field(config, message):
    """Bad config values are refused with a message naming the field."""
    with pytest.raises(scenarios.ScenarioError, match=message):
        scenarios.get("job-interview").validate(config)


def test_voices_and_unknown_scenarios():
    """Voices come from the list; unknown scenario ids are refused; no id means the default."""
    s = scenarios.get("customer-service")
    assert s.voice(None) == s.default_voice and s.voice("cedar") == "cedar"
    with pytest.raises(scenarios.ScenarioError):
        s.voice("robot")
    with pytest.raises(scenarios.ScenarioError, match="unknown scenario"):
        scenarios.get("poker")
    assert scenarios.get(None).id == scenarios.DEFAULT_SCENARIO

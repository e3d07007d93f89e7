"""Scenarios: phone-screen's schema shape, strict and lenient validation naming the field,
voices, instructions and greetings, and what a webhook URL's query asks for."""

from __future__ import annotations

import pytest

import scenarios

JOB = {"jobTitle": "Backend engineer", "company": "Acme"}


def test_schemas_are_in_phone_screens_shape():
    """Each schema has id, name, description, icon, fields keyed by `key` with type, required,
    placeholder, {value, label} options or validation lengths, and voiceOptions."""
    for sid in ("job-interview", "customer-service"):
        schema = scenarios.get(sid).schema()
        assert {"id", "name", "description", "icon", "fields", "voiceOptions"} <= set(schema) and schema["id"] == sid
        for field in schema["fields"]:
            assert {"key", "label", "type", "required"} <= set(field) and field["type"] in ("text", "textarea", "select")
            if field["type"] == "select":
                assert all(set(o) == {"value", "label"} for o in field["options"])
            else:
                assert field["validation"]["maxLength"] > 0
        assert all(set(v) == {"value", "label", "description"} for v in schema["voiceOptions"])
        assert schema["voiceOptions"][0]["value"] == scenarios.get(sid).default_voice


def test_phone_screens_field_keys_types_and_limits():
    """The interview takes jobTitle and company (2-100, required) and jobDescription (a
    textarea up to 5000); customer service companyName and two choices."""
    interview = {f["key"]: f for f in scenarios.get("job-interview").schema()["fields"]}
    service = {f["key"]: f for f in scenarios.get("customer-service").schema()["fields"]}
    assert list(interview) == ["jobTitle", "company", "jobDescription"]
    assert interview["jobTitle"]["validation"] == {"minLength": 2, "maxLength": 100} and interview["jobTitle"]["required"]
    assert (interview["jobDescription"]["type"], interview["jobDescription"]["validation"]["maxLength"]) == ("textarea", 5000)
    assert list(service) == ["companyName", "serviceType", "supportLevel"]
    assert [o["value"] for o in service["supportLevel"]["options"]] == ["basic", "premium", "enterprise"]


def test_the_interview_renders_its_config():
    """The greeting and instructions use the config; a job description keeps its lines."""
    s = scenarios.get("job-interview")
    config = s.validate({"jobTitle": "  Backend   engineer ", "company": "Acme", "jobDescription": "Python.\r\n\r\nSQL."})
    assert config == {"jobTitle": "Backend engineer", "company": "Acme", "jobDescription": "Python.\nSQL."}
    assert "Backend engineer" in s.instructions(config) and "Python.\nSQL." in s.instructions(config)
    assert "Acme" in s.greeting(config) and "Backend engineer" in s.greeting(config)


@pytest.mark.parametrize(("config", "message"), [
    ({"company": "Acme"}, "Job title is required"),
    ({**JOB, "company": "A"}, "Company needs at least 2 characters"),
    ({**JOB, "jobTitle": "x" * 101}, "longer than 100"),
    ({**JOB, "jobTitle": 5}, "must be text"),
    ({**JOB, "salary": "1"}, "unknown config field"),
    ("role", "config must be an object"),
])
def test_strict_validation_names_the_field(config, message):
    """A form's bad config is refused with a message naming the field."""
    with pytest.raises(scenarios.ScenarioError, match=message):
        scenarios.get("job-interview").validate(config)


def test_a_bad_choice_is_refused_strictly_and_defaulted_leniently():
    """A choice outside the options: refused for a form, the default on a ringing call."""
    s = scenarios.get("customer-service")
    with pytest.raises(scenarios.ScenarioError, match="Support level must be one of"):
        s.validate({"companyName": "Acme", "supportLevel": "gold"})
    config, notes = s.check({"companyName": "Acme", "supportLevel": "gold"}, lenient=True)
    assert config == {"companyName": "Acme", "serviceType": "general", "supportLevel": "basic"}
    assert notes and "Support level" in notes[0]


def test_lenient_validation_runs_a_call_nobody_configured():
    """With nothing filled in, a ringing call still gets instructions and a greeting that read
    well: required fields are left empty, choices take their defaults."""
    for s in scenarios.SCENARIOS.values():
        config = s.validate({}, lenient=True)
        assert set(config) == {f.key for f in s.fields}
        assert "{" not in s.instructions(config) and s.greeting(config).endswith("?")


def test_voices_and_unknown_scenarios():
    """Any GA voice may be chosen; an unknown one is refused (or defaulted leniently); unknown
    scenario ids are refused; no id means the default, the interview, as in phone-screen."""
    s = scenarios.get("customer-service")
    assert s.voice(None) == s.default_voice and s.voice("verse") == "verse"
    with pytest.raises(scenarios.ScenarioError):
        s.voice("robot")
    assert s.voice("robot", lenient=True) == s.default_voice
    with pytest.raises(scenarios.ScenarioError, match="unknown scenario"):
        scenarios.get("poker")
    assert scenarios.get(None).id == scenarios.DEFAULT_SCENARIO == "job-interview"


@pytest.mark.parametrize(("query", "scenario", "config", "voice"), [
    ({}, "job-interview", {"jobTitle": "", "company": "", "jobDescription": ""}, "marin"),
    ({"scenario": "job-interview"}, "job-interview", {"jobTitle": "", "company": "", "jobDescription": ""}, "marin"),
    ({"jobTitle": "Chef", "company": "Bistro", "jobDescription": "Cook.", "voice": "ash"},
     "job-interview", {"jobTitle": "Chef", "company": "Bistro", "jobDescription": "Cook."}, "ash"),
    ({"scenarioId": "customer-service", "config": '{"companyName": "Acme", "serviceType": "billing"}', "voice": "sage"},
     "customer-service", {"companyName": "Acme", "serviceType": "billing", "supportLevel": "basic"}, "sage"),
    ({"scenarioId": "job-interview", "config": '{"jobTitle": "Chef"}', "company": "Bistro"},
     "job-interview", {"jobTitle": "Chef", "company": "Bistro", "jobDescription": ""}, "marin"),
])
def test_what_a_webhook_url_asks_for(query, scenario, config, voice):
    """scenario/scenarioId, config as JSON, phone-screen's jobTitle/company/jobDescription and
    voice choose the call's setup; what nobody filled in gets the defaults."""
    s, got, v, notes = scenarios.from_query(query)
    assert (s.id, got, v, notes) == (scenario, config, voice, [])


def test_a_webhook_url_with_unusable_values_still_runs_and_says_why():
    """Bad JSON, unknown fields, a too-long title and an unknown voice are dropped with a note
    each; an unknown scenario is an error only its URL's owner can fix."""
    s, config, voice, notes = scenarios.from_query(
        {"scenarioId": "job-interview", "config": '{"salary": 1, "jobTitle": "' + "x" * 200 + '"}', "voice": "robot"})
    assert config["jobTitle"] == "" and voice == "marin" and len(notes) == 3
    assert scenarios.from_query({"config": "{not json"})[3] == ["config is not a JSON object: ignored"]
    with pytest.raises(scenarios.ScenarioError):
        scenarios.from_query({"scenario": "poker"})


def test_control_characters_never_reach_the_instructions():
    """Escape sequences and NULs in a field become spaces; a textarea keeps its line breaks."""
    config = scenarios.get("job-interview").validate(
        {"jobTitle": "Chef\x1b[31m\x00", "company": "Bistro\x07", "jobDescription": "Cook.\nClean\x0b up."})
    assert config == {"jobTitle": "Chef [31m", "company": "Bistro", "jobDescription": "Cook.\nClean up."}

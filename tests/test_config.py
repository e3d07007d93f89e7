"""Settings from the environment: defaults, checks naming the variable, hidden secrets."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

from config import VARIABLES, ConfigError, Settings
from helpers import ROOT

STRONG_KEY = "k" * 40
TWILIO = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t" * 32}


def test_defaults_follow_the_spec():
    """With nothing set, the documented defaults apply."""
    s = Settings.from_env({})
    assert (s.port, s.phone_max_calls, s.phone_window_ms, s.limiter_fail_mode) == (8081, 2, 3_600_000, "memory")
    assert s.public_url == "http://localhost:8081"
    assert s.allowed_regions == frozenset({"US", "AU", "IN"})
    assert "http://localhost:8081" in s.allowed_origins
    assert s.dsn is None
    assert any("PHONE_ENCRYPTION_KEY" in w for w in s.warnings)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PORT": "eighty"}, "PORT='eighty' must be a whole number"),
        ({"RATE_LIMIT_PHONE_MAX_CALLS": "0"}, "RATE_LIMIT_PHONE_MAX_CALLS='0' must be between 1"),
        ({"LIMITER_FAIL_MODE": "maybe"}, "LIMITER_FAIL_MODE='maybe' must be one of memory, closed, open"),
        ({"ALLOWED_REGIONS": "US,XX"}, "ALLOWED_REGIONS='US,XX' unknown region code(s) XX"),
        ({"PUBLIC_URL": "example.com"}, "PUBLIC_URL='example.com' must be an absolute"),
        ({"ALLOWED_ORIGINS": "https://a.example/path"}, "ALLOWED_ORIGINS="),
        ({"TWILIO_PHONE_NUMBER_US": "12"}, "TWILIO_PHONE_NUMBER_US='12'"),
    ],
)
def test_bad_values_name_the_variable(env, needle):
    """A bad value fails with the variable's name, the value and what is wrong with it."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert needle in str(info.value)


def test_production_requires_a_strong_phone_key():
    """CALLGATE_ENV=production refuses a missing, default or short PHONE_ENCRYPTION_KEY."""
    for env in ({}, {"PHONE_ENCRYPTION_KEY": "short"},
                {"PHONE_ENCRYPTION_KEY": "callgate-development-key-do-not-use-in-production"},
                {"PHONE_ENCRYPTION_KEY": "default-dev-key-change-in-production"}):  # phone-screen's
        with pytest.raises(ConfigError, match="PHONE_ENCRYPTION_KEY"):
            Settings.from_env({"CALLGATE_ENV": "production", **env})
    s = Settings.from_env({"CALLGATE_ENV": "production", "PHONE_ENCRYPTION_KEY": STRONG_KEY, **TWILIO})
    assert s.warnings == ()
    assert s.allowed_origins == ("http://localhost:8081",)


def test_production_requires_twilio_credentials():
    """CALLGATE_ENV=production refuses to run without Twilio credentials to check signatures."""
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN"):
        Settings.from_env({"CALLGATE_ENV": "production", "PHONE_ENCRYPTION_KEY": STRONG_KEY})


def test_secrets_never_show():
    """Secrets stay out of repr and out of error messages."""
    env = {"PHONE_ENCRYPTION_KEY": "super-secret-value-123", "TWILIO_AUTH_TOKEN": "tok-456",
           "DATABASE_URL": "postgresql://u:pw-789@db/x", "ADMIN_TOKEN": "adm-000"}
    text = repr(Settings.from_env(env))
    for secret in env.values():
        assert secret not in text
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"DATABASE_URL": "mysql://u:pw-789@db/x"})
    assert "pw-789" not in str(info.value) and "DATABASE_URL" in str(info.value)


def test_fly_database_url_is_used_without_database_url():
    """FLY_DATABASE_URL is the fallback DSN."""
    s = Settings.from_env({"FLY_DATABASE_URL": "postgres://fly@db/x"})
    assert s.dsn.value == "postgres://fly@db/x"


def test_help_lists_every_variable():
    """`python server.py --help` lists every environment variable and the admin commands."""
    out = subprocess.run([sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for var in VARIABLES:
        assert var.name in out
    assert "admin" in out


def test_bad_value_stops_the_server_with_its_name():
    """A bad value stops `python server.py` at once with exit code 2 and the variable's name."""
    result = subprocess.run([sys.executable, "server.py"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "RATE_LIMIT_PHONE_WINDOW_MS": "soon"}, timeout=60)
    assert result.returncode == 2
    assert "RATE_LIMIT_PHONE_WINDOW_MS='soon' must be a whole number" in result.stderr


def _sdk_deprecated(model_class) -> set[str]:
    """The values the openai SDK lists under "Deprecated values:" in a model field's docstring."""
    source = inspect.getsource(model_class)
    block = source[source.index("Deprecated values:"):].split('"""')[0]
    return set(re.findall(r'"([^"]+)"', block))


def test_the_deprecation_table_matches_the_sdk_and_the_defaults_are_current():
    """Every model the SDK lists as deprecated is warned about, and the defaults are none of them."""
    from openai.types.realtime import AudioTranscription, RealtimeSessionCreateRequest

    from config import DEPRECATED_REALTIME_MODELS, DEPRECATED_TRANSCRIPTION_MODELS

    assert _sdk_deprecated(RealtimeSessionCreateRequest) == set(DEPRECATED_REALTIME_MODELS)
    assert _sdk_deprecated(AudioTranscription) == set(DEPRECATED_TRANSCRIPTION_MODELS)
    s = Settings.from_env({"PHONE_ENCRYPTION_KEY": STRONG_KEY})
    assert s.openai_realtime_model not in DEPRECATED_REALTIME_MODELS
    assert s.openai_transcription_model not in DEPRECATED_TRANSCRIPTION_MODELS
    assert s.warnings == ()


def test_a_deprecated_model_is_warned_about_with_its_shutdown_date():
    """A configured model with an announced shutdown gives a start-up warning naming it and the date."""
    s = Settings.from_env({"PHONE_ENCRYPTION_KEY": STRONG_KEY, "OPENAI_REALTIME_MODEL": "gpt-realtime",
                           "OPENAI_TRANSCRIPTION_MODEL": "gpt-4o-mini-transcribe"})
    assert any("OPENAI_REALTIME_MODEL=gpt-realtime" in w and "2027-01-20" in w for w in s.warnings)
    assert any("OPENAI_TRANSCRIPTION_MODEL=gpt-4o-mini-transcribe" in w and "2027-02-26" in w for w in s.warnings)


def test_a_lost_database_connection_logged_by_asyncpg_is_one_warning_line():
    """asyncpg's error-with-traceback for a lost connection becomes one WARNING line with the
    reason; an asyncpg error that is not an outage keeps its traceback."""
    import logging

    from logsetup import ExpectedOutages

    def record(exc: BaseException, logger: str = "asyncpg.pool", message: str = "connection lost") -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys as _sys
            return logging.LogRecord(logger, logging.ERROR, __file__, 1, message, None, _sys.exc_info())

    lost, bug = record(ConnectionResetError("reset by peer")), record(KeyError("x"))
    # What asyncio logs when a connection is lost while asyncpg cancels a request on it.
    cancelled = record(ConnectionError("unexpected connection_lost() call"), "asyncio",
                       "Future exception was never retrieved")
    other = record(ConnectionError("something else"), "asyncio", "Future exception was never retrieved")
    for r in (lost, bug, cancelled, other):
        ExpectedOutages().filter(r)
    assert (lost.levelname, lost.exc_info, lost.getMessage()) == (
        "WARNING", None, "connection lost (ConnectionResetError: reset by peer)")
    assert (cancelled.levelname, cancelled.exc_info) == ("WARNING", None)
    assert bug.levelname == "ERROR" and bug.exc_info is not None
    assert other.levelname == "ERROR" and other.exc_info is not None

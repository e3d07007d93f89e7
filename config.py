"""Settings, read once from the environment at start.

Every variable is declared once in ``VARIABLES`` (name, default, meaning, parser); ``--help``
is built from that table. A bad value stops the server with the variable's name and what is
wrong with it. Secrets are wrapped in ``Secret`` so they never show in a ``repr``, a log
line or an error message.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import phonenumbers

VERSION = "0.1.0"

DEVELOPMENT_PHONE_KEY = "callgate-development-key-do-not-use-in-production"
# phone-screen's built-in default key: public, so as good as none, and a deployment migrated
# from phone-screen that never set a key of its own would carry it over.
PHONE_SCREEN_DEFAULT_KEY = "default-dev-key-change-in-production"
# The largest HTTP body or WebSocket message any edge accepts (a webhook form, a media frame, a
# /logs message); larger WebSocket messages close the socket with 1009.
MAX_MESSAGE_BYTES = 64 * 1024
# The longest wait for any socket to close cleanly (a model's, Twilio's) before it is cut.
CLOSE_TIMEOUT_S = 2.0

# Models with an announced shutdown, as the official openai SDK (3.57) lists them in the
# docstrings of RealtimeSessionCreateRequest.model and AudioTranscription.model
# (tests/test_config.py checks this table against the installed SDK).
DEPRECATED_REALTIME_MODELS = dict.fromkeys(
    ("gpt-realtime", "gpt-realtime-2025-08-28", "gpt-realtime-mini", "gpt-realtime-mini-2025-12-15",
     "gpt-audio-mini", "gpt-audio-mini-2025-12-15"), "2027-01-20")
DEPRECATED_TRANSCRIPTION_MODELS = dict.fromkeys(
    ("whisper-1", "gpt-4o-mini-transcribe", "gpt-4o-mini-transcribe-2025-12-15", "gpt-4o-transcribe",
     "gpt-4o-transcribe-diarize"), "2027-02-26")
MIN_PRODUCTION_KEY_LENGTH = 32


class ConfigError(ValueError):
    """A variable has a value the server cannot run with; the message names it."""


class Secret:
    """A secret string: ``str()`` and ``repr()`` hide it; ``.value`` reveals it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self.value.encode(), other.value.encode())

    def __hash__(self) -> int:
        return hash(self.value)


# --- parsers: each takes the raw text and returns the value or raises ValueError(why) ---


def _int(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be at least {low}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(f"must be an absolute {' or '.join(schemes)} URL")
        return value

    return parse


def _dsn(text: str) -> Secret:
    value = text.strip()
    if urlsplit(value).scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    return Secret(value)


def _secret(text: str) -> Secret:
    return Secret(text.strip())


def _secret_list(text: str) -> tuple[Secret, ...]:
    return tuple(Secret(part.strip()) for part in text.split(",") if part.strip())


def _regions(text: str) -> frozenset[str]:
    regions = frozenset(part.strip().upper() for part in text.split(",") if part.strip())
    unknown = sorted(r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS)
    if unknown:
        raise ValueError(f"unknown region code(s) {', '.join(unknown)}; use ISO 3166 codes such as US,AU,IN")
    if not regions:
        raise ValueError("must name at least one region")
    return regions


def _region(text: str) -> str:
    value = text.strip().upper()
    if value not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError("must be an ISO 3166 region code such as US")
    return value


def normalise_origin(origin: str) -> str:
    """scheme://host[:port] in lower case, without a default port: how browsers send Origin."""
    parts = urlsplit(origin.strip().rstrip("/").lower())
    netloc = parts.netloc
    if (parts.scheme, parts.port) in (("http", 80), ("https", 443)):
        netloc = parts.hostname or netloc
    return f"{parts.scheme}://{netloc}"


def origin_in(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request's Origin header names one of ``allowed`` (normalised). A header that
    is not an origin at all (a port out of range, say) is simply not allowed."""
    try:
        return normalise_origin(origin) in allowed
    except ValueError:
        return False


def _origins(text: str) -> tuple[str, ...]:
    origins = []
    for part in text.split(","):
        part = part.strip().rstrip("/")
        if not part:
            continue
        parsed = urlsplit(part)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path:
            raise ValueError(f"{part!r} is not an origin (scheme://host[:port])")
        origins.append(normalise_origin(part))
    return tuple(origins)


def _phone(text: str) -> str:
    value = text.strip()
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ValueError("must be an E.164 number such as +14155550100") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError("is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _text(text: str) -> str:
    return text.strip()


@dataclass(frozen=True)
class Variable:
    name: str
    default: str | None
    help: str
    parse: Callable[[str], Any]
    field: str
    secret: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable("PORT", "8081", "listen port", _int(0, 65535), "port"),
    Variable("PUBLIC_URL", None, "URL Twilio and browsers use (default http://localhost:$PORT)", _url("http", "https"), "public_url"),
    Variable("DATABASE_URL", None, "PostgreSQL DSN (default: embedded PostgreSQL under ./.callgate/pg)", _dsn, "database_url", True),
    Variable("FLY_DATABASE_URL", None, "PostgreSQL DSN used when DATABASE_URL is unset", _dsn, "fly_database_url", True),
    Variable("CALLGATE_DATA_DIR", ".callgate", "where the embedded PostgreSQL keeps its data (<dir>/pg)", Path, "data_dir"),
    Variable("PHONE_ENCRYPTION_KEY", None, "HMAC-SHA256 key for phone hashes (required in production)", _secret, "phone_key", True),
    Variable("PHONE_ENCRYPTION_PREVIOUS_KEYS", "", "comma-separated older keys, honoured so a rotation loses no counts", _secret_list, "phone_previous_keys", True),
    Variable("PHONE_DEFAULT_REGION", "US", "region assumed for numbers written without a country code", _region, "default_region"),
    Variable("ALLOWED_REGIONS", "US,AU,IN", "ISO regions calls may be placed to or taken from", _regions, "allowed_regions"),
    Variable("RATE_LIMIT_PHONE_MAX_CALLS", "2", "calls per number per rolling window", _int(1, 10_000), "phone_max_calls"),
    Variable("RATE_LIMIT_PHONE_WINDOW_MS", "3600000", "rolling window, ms", _int(1000), "phone_window_ms"),
    Variable("RATE_LIMIT_PHONE_COOLDOWN_MS", "0", "minimum gap between two calls to one number, ms", _int(0), "phone_cooldown_ms"),
    Variable("RATE_LIMIT_MAX_CONCURRENT_CALLS", "10", "live calls across all instances", _int(1), "max_concurrent_calls"),
    Variable("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "5", "open /logs sockets per client IP", _int(1), "max_connections_per_ip"),
    Variable("RATE_LIMIT_SESSION_DURATION", "300000", "longest call, ms", _int(1000), "session_duration_ms"),
    Variable("SHUTDOWN_DRAIN_MS", "120000", "on SIGTERM, how long live calls may go on before they are ended, ms", _int(0, 3_600_000), "shutdown_drain_ms"),
    Variable("LIMITER_FAIL_MODE", "memory", "when PostgreSQL is unreachable: memory, closed or open", _choice("memory", "closed", "open"), "limiter_fail_mode"),
    Variable("LIMITER_TIMEOUT_MS", "2000", "longest wait for any one database call (the limiter's, the call store's, the fan-out's: pool acquire + statement), ms", _int(50, 60_000), "database_timeout_ms"),
    Variable("DATABASE_POOL_SIZE", "10", "connections in the PostgreSQL pool", _int(1, 100), "pool_size"),
    Variable("ALLOWED_ORIGINS", None, "browser origins accepted on /logs (default: PUBLIC_URL's, plus localhost in development)", _origins, "allowed_origins"),
    Variable("TURNSTILE_SECRET_KEY", None, "when set, call.start needs a verified Turnstile token", _secret, "turnstile_secret", True),
    Variable("TURNSTILE_SITE_KEY", None, "Turnstile site key the web page shows the widget with (public)", _text, "turnstile_site_key"),
    Variable("TURNSTILE_VERIFY_URL", "https://challenges.cloudflare.com/turnstile/v0/siteverify", "Turnstile verification endpoint", _url("http", "https"), "turnstile_verify_url"),
    Variable("OPENAI_API_KEY", None, "enables the real model (without it: the offline agent)", _secret, "openai_api_key", True),
    Variable("OPENAI_REALTIME_URL", "wss://api.openai.com/v1/realtime", "model endpoint", _url("ws", "wss"), "openai_realtime_url"),
    Variable("OPENAI_REALTIME_MODEL", "gpt-realtime-1.5", "Realtime model (GA; audio/pcmu, server VAD and function tools)", _text, "openai_realtime_model"),
    Variable("OPENAI_TRANSCRIPTION_MODEL", "gpt-live-transcribe", "model that transcribes the caller's speech for the frontend", _text, "openai_transcription_model"),
    Variable("MODEL_READY_TIMEOUT_MS", "10000", "longest wait for the model to connect and accept the session, ms (then the call ends)", _int(100, 60_000), "model_ready_timeout_ms"),
    Variable("TWILIO_ACCOUNT_SID", None, "Twilio account for REST calls", _text, "twilio_account_sid"),
    Variable("TWILIO_AUTH_TOKEN", None, "Twilio auth token: REST calls and webhook signature checks", _secret, "twilio_auth_token", True),
    Variable("TWILIO_WEBHOOK_SHARED_KEY", None, "secret of the Twilio Webhooks rule's shared key: checks requests the rule signs (HMAC-SHA1 or HMAC-SHA256, as X-Twilio-Webhooks-Signature-Settings says)", _secret, "twilio_shared_key", True),
    Variable("TWILIO_PHONE_NUMBER_US", None, "caller id for US calls (and the fallback)", _phone, "twilio_number_us"),
    Variable("TWILIO_PHONE_NUMBER_AU", None, "caller id for AU calls", _phone, "twilio_number_au"),
    Variable("TWILIO_PHONE_NUMBER_IN", None, "caller id for IN calls", _phone, "twilio_number_in"),
    Variable("TWILIO_REST_TIMEOUT_MS", "10000", "longest wait for one Twilio REST request, ms", _int(100, 60_000), "twilio_rest_timeout_ms"),
    Variable("TWILIO_API_BASE_URL", "https://api.twilio.com", "Twilio REST base URL", _url("http", "https"), "twilio_api_base_url"),
    Variable("CALLGATE_ENV", "development", "development or production (missing secrets are fatal)", _choice("development", "production"), "env"),
    Variable("TRUST_FLY_CLIENT_IP", "auto", "take the client's address from Fly-Client-IP: yes, no, or auto (yes on a Fly.io machine, where FLY_APP_NAME is set; anyone can send the header elsewhere)", _choice("auto", "yes", "no"), "trust_fly_client_ip"),
    Variable("FLY_APP_NAME", None, "set by Fly.io on its machines (read, never needed by hand)", _text, "fly_app_name"),
    Variable("ADMIN_TOKEN", None, "bearer token for admin routes and the all-calls monitor", _secret, "admin_token", True),
    Variable("LOG_FORMAT", "text", "text, or json for one JSON object per line", _choice("text", "json"), "log_format"),
    Variable("LOG_LEVEL", "info", "debug, info, warning or error", _choice("debug", "info", "warning", "error"), "log_level"),
    Variable("WEB_CONCURRENCY", "1", "server processes sharing the port (SO_REUSEPORT), one per core: a process relays on one core at most", _int(1, 64), "workers"),
    Variable("EVENT_LOOP", "uvloop", "uvloop (falls back to asyncio's own when uvloop is not installed) or asyncio", _choice("uvloop", "asyncio"), "event_loop"),
)


@dataclass(frozen=True)
class Settings:
    """One field per variable of ``VARIABLES`` (its ``field``), filled by ``from_env``: the
    defaults live in that table only. Derived defaults (PUBLIC_URL's, ALLOWED_ORIGINS', the
    development phone key) are filled by ``checked``."""

    port: int
    public_url: str
    database_url: Secret | None
    fly_database_url: Secret | None
    data_dir: Path
    phone_key: Secret
    phone_previous_keys: tuple[Secret, ...]
    default_region: str
    allowed_regions: frozenset[str]
    phone_max_calls: int
    phone_window_ms: int
    phone_cooldown_ms: int
    max_concurrent_calls: int
    max_connections_per_ip: int
    session_duration_ms: int
    shutdown_drain_ms: int
    limiter_fail_mode: str
    database_timeout_ms: int
    pool_size: int
    allowed_origins: tuple[str, ...]
    turnstile_secret: Secret | None
    turnstile_site_key: str | None
    turnstile_verify_url: str
    openai_api_key: Secret | None
    openai_realtime_url: str
    openai_realtime_model: str
    openai_transcription_model: str
    model_ready_timeout_ms: int
    twilio_account_sid: str | None
    twilio_auth_token: Secret | None
    twilio_shared_key: Secret | None
    twilio_number_us: str | None
    twilio_number_au: str | None
    twilio_number_in: str | None
    twilio_rest_timeout_ms: int
    twilio_api_base_url: str
    env: str
    trust_fly_client_ip: str
    fly_app_name: str | None
    admin_token: Secret | None
    log_format: str
    log_level: str
    workers: int
    event_loop: str
    # Warnings found while reading (e.g. the development phone key); logged at start.
    warnings: tuple[str, ...] = ()

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def trusts_fly_client_ip(self) -> bool:
        """Fly-Client-IP is the client's address only behind Fly's proxy, which sets it."""
        return self.trust_fly_client_ip == "yes" or (self.trust_fly_client_ip == "auto" and bool(self.fly_app_name))

    @property
    def dsn(self) -> Secret | None:
        """The configured PostgreSQL DSN, or None for the embedded server."""
        return self.database_url or self.fly_database_url

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read every variable; raise ConfigError naming the first bad one."""
        values: dict[str, Any] = {}
        for var in VARIABLES:
            raw = environ.get(var.name)
            if raw is None or (raw.strip() == "" and var.default is None):
                raw = var.default
            if raw is None:
                values[var.field] = None
                continue
            try:
                values[var.field] = var.parse(raw)
            except ValueError as exc:
                shown = "(hidden)" if var.secret else repr(raw)
                raise ConfigError(f"{var.name}={shown} {exc}") from None
        return cls(**values).checked()

    def checked(self) -> Settings:
        """Fill derived defaults and refuse combinations that cannot run."""
        warnings = list(self.warnings)
        public_url = self.public_url or f"http://localhost:{self.port}"
        phone_key = self.phone_key or Secret(DEVELOPMENT_PHONE_KEY)
        key = phone_key.value
        if self.production:
            if key == DEVELOPMENT_PHONE_KEY:
                raise ConfigError("PHONE_ENCRYPTION_KEY must be set when CALLGATE_ENV=production")
            if key == PHONE_SCREEN_DEFAULT_KEY:
                raise ConfigError("PHONE_ENCRYPTION_KEY is phone-screen's published default key; "
                                  "set a secret one (e.g. `openssl rand -hex 32`)")
            if len(key) < MIN_PRODUCTION_KEY_LENGTH:
                raise ConfigError(
                    f"PHONE_ENCRYPTION_KEY is too short for production ({len(key)} characters; "
                    f"use at least {MIN_PRODUCTION_KEY_LENGTH}, e.g. `openssl rand -hex 32`)"
                )
        elif key == DEVELOPMENT_PHONE_KEY:
            warnings.append(
                "PHONE_ENCRYPTION_KEY is not set: using the DEVELOPMENT key. Phone hashes made now "
                "will not match a production key. Set PHONE_ENCRYPTION_KEY before real use."
            )
        if not key:
            raise ConfigError("PHONE_ENCRYPTION_KEY is empty")
        if self.production and not (self.twilio_auth_token and self.twilio_account_sid):
            raise ConfigError(
                "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set when CALLGATE_ENV=production "
                "(without them Twilio's requests cannot be verified)"
            )
        if self.phone_cooldown_ms > self.phone_window_ms:
            raise ConfigError(
                f"RATE_LIMIT_PHONE_COOLDOWN_MS={self.phone_cooldown_ms} is longer than "
                f"RATE_LIMIT_PHONE_WINDOW_MS={self.phone_window_ms}; the cooldown is measured within the window"
            )
        for name, model, table in (
                ("OPENAI_REALTIME_MODEL", self.openai_realtime_model, DEPRECATED_REALTIME_MODELS),
                ("OPENAI_TRANSCRIPTION_MODEL", self.openai_transcription_model, DEPRECATED_TRANSCRIPTION_MODELS)):
            if model in table:
                warnings.append(f"{name}={model} is deprecated: OpenAI has announced its shutdown for "
                                f"{table[model]}. Choose a current model before then "
                                "(https://developers.openai.com/api/docs/deprecations).")
        if any(not k.value for k in self.phone_previous_keys):
            raise ConfigError("PHONE_ENCRYPTION_PREVIOUS_KEYS has an empty key")
        origins = self.allowed_origins
        if not origins:
            origins = (normalise_origin(public_url),)
            if not self.production:
                origins += tuple(f"http://{h}:{self.port}" for h in ("localhost", "127.0.0.1"))
        return dataclasses.replace(self, public_url=public_url, allowed_origins=origins, phone_key=phone_key,
                                   warnings=tuple(dict.fromkeys(warnings)))


def help_text() -> str:
    """The environment variables, for ``--help``."""
    width = max(len(v.name) for v in VARIABLES)
    lines = ["environment variables:"]
    for var in VARIABLES:
        default = "" if var.default is None else f" [default: {var.default}]"
        lines.append(f"  {var.name:<{width}}  {var.help}{default}")
    return "\n".join(lines)

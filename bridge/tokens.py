"""Per-call stream tokens: minted in the TwiML, presented in the Media Stream's ``start``.

A token is ``base64url(payload).base64url(HMAC-SHA256(secret, payload))``; the payload binds
it to one CallSid and to the stream parameters it was issued with, and carries an expiry and a
unique id (``jti``). Single use across instances is enforced by the database
(``sql/calls_stream_start.sql``), not here. Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

TOKEN_PARAMETER = "token"
LIFETIME_S = 120  # Twilio opens the stream within seconds of fetching the TwiML


class TokenError(ValueError):
    """The token is missing, malformed, forged, expired or for another call."""


@dataclass(frozen=True)
class TokenClaims:
    call_sid: str
    jti: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_secret(master: str) -> bytes:
    """A key of its own for tokens, derived from the deployment's phone key."""
    return hmac.new(master.encode(), b"callgate stream token v1", hashlib.sha256).digest()


def _params_digest(params: Mapping[str, str]) -> str:
    canonical = orjson.dumps({k: v for k, v in params.items() if k != TOKEN_PARAMETER}, option=orjson.OPT_SORT_KEYS)
    return _b64(hashlib.sha256(canonical).digest()[:16])


def mint(secret: bytes, call_sid: str, params: Mapping[str, str], now: float | None = None) -> str:
    payload = orjson.dumps({
        "c": call_sid,
        "p": _params_digest(params),
        "e": int((now if now is not None else time.time()) + LIFETIME_S),
        "j": secrets.token_urlsafe(12),
    })
    return f"{_b64(payload)}.{_b64(hmac.new(secret, payload, hashlib.sha256).digest())}"


def verify(secret: bytes, token: str | None, call_sid: str, params: Mapping[str, str],
           now: float | None = None) -> TokenClaims:
    """Check signature, call, parameters and expiry; returns the claims or raises TokenError."""
    if not token:
        raise TokenError("no stream token in the start message")
    try:
        body, signature = token.split(".")
        payload = _unb64(body)
        given = _unb64(signature)
    except ValueError:
        raise TokenError("malformed stream token") from None
    if not hmac.compare_digest(given, hmac.new(secret, payload, hashlib.sha256).digest()):
        raise TokenError("stream token signature does not match")
    claims = orjson.loads(payload)
    if claims.get("c") != call_sid:
        raise TokenError("stream token is for another call")
    if claims.get("p") != _params_digest(params):
        raise TokenError("stream parameters differ from those the token was issued with")
    if int(claims.get("e", 0)) < (now if now is not None else time.time()):
        raise TokenError("stream token expired")
    return TokenClaims(call_sid, str(claims["j"]), int(claims["e"]))


# --- subscription tokens: what lets a frontend follow (and end) one call -------------------


def subscription_token(secret: bytes, call_sid: str) -> str:
    """Stateless, so any instance can check it: HMAC of the CallSid under a key of its own."""
    mac = hmac.new(secret, b"subscribe|" + call_sid.encode(), hashlib.sha256).digest()
    return _b64(mac[:24])


def check_subscription(secret: bytes, call_sid: object, token: object) -> bool:
    if not isinstance(call_sid, str) or not isinstance(token, str):
        return False
    return hmac.compare_digest(token.encode(), subscription_token(secret, call_sid).encode())

"""Per-call stream tokens: bound to one call and its parameters, short-lived, unforgeable."""

from __future__ import annotations

import pytest

from bridge import tokens

SECRET = tokens.derive_secret("k" * 40)
PARAMS = {"scenarioId": "job-interview", "config": '{"role":"Engineer"}', "voice": "marin"}


def test_a_token_verifies_for_its_call():
    """A fresh token verifies for the call and parameters it was minted for."""
    token = tokens.mint(SECRET, "CA1", PARAMS, now=1000)
    claims = tokens.verify(SECRET, token, "CA1", {**PARAMS, "token": token}, now=1001)
    assert claims.call_sid == "CA1" and claims.jti


@pytest.mark.parametrize(("change", "message"), [
    ({"call_sid": "CA2"}, "another call"),
    ({"params": {**PARAMS, "voice": "cedar"}}, "parameters differ"),
    ({"now": 1000 + tokens.LIFETIME_S + 1}, "expired"),
    ({"secret": tokens.derive_secret("other" * 10)}, "signature"),
])
def test_tokens_are_refused_off_their_call(change, message):
    """Another call, changed parameters, an expired token or another secret are refused."""
    token = tokens.mint(SECRET, "CA1", PARAMS, now=1000)
    with pytest.raises(tokens.TokenError, match=message):
        tokens.verify(change.get("secret", SECRET), token, change.get("call_sid", "CA1"),
                      change.get("params", PARAMS), now=change.get("now", 1001))


@pytest.mark.parametrize("token", [None, "", "abc", "a.b.c", "!!!.???"])
def test_malformed_tokens_are_refused(token):
    """Missing or malformed tokens raise TokenError, nothing else."""
    with pytest.raises(tokens.TokenError):
        tokens.verify(SECRET, token, "CA1", PARAMS)


def test_each_token_is_unique():
    """Two tokens for one call differ (each has its own id for single use)."""
    a, b = tokens.mint(SECRET, "CA1", PARAMS), tokens.mint(SECRET, "CA1", PARAMS)
    assert a != b
    assert tokens.verify(SECRET, a, "CA1", PARAMS).jti != tokens.verify(SECRET, b, "CA1", PARAMS).jti

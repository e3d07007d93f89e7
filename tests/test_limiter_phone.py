"""Phone numbers: normalisation, refusal reasons, masking, keys. Pure, no I/O."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from limiter.errors import InvalidNumber
from limiter.phone import PhoneKeyer, mask, parse

ALLOWED = {"US", "AU", "IN"}


def p(raw, default_region="US", allowed=ALLOWED):
    return parse(raw, default_region=default_region, allowed_regions=allowed)


@pytest.mark.parametrize("raw", ["+1 (415) 555-0100", "4155550100", "+14155550100", "1-415-555-0100",
                                 "+١٤١٥٥٥٥٠١٠٠"])
def test_common_formats_normalise_to_e164(raw):
    """Ways people write one US number (Arabic-Indic digits too) all become +14155550100."""
    assert p(raw).e164 == "+14155550100"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("911", "not_callable"),
        ("112", "not_callable"),
        ("+1 900 555 0100", "not_callable"),
        ("+61 1900 123 456", "not_callable"),
        ("+44 20 7946 0000", "region_not_allowed"),
        ("12345", "invalid"),
        ("+1415555", "invalid"),
        ("call me", "unparseable"),
        ("9" * 70, "unparseable"),
        ("+14155550100\x00", "unparseable"),
        ("+14155550100\n+19005550100", "unparseable"),
        ("+14155550100;ext=9001", "not_callable"),
        ("+1 415 555 0100 x12", "not_callable"),
        (None, "missing"),
        (14155550100, "missing"),
    ],
)
def test_refusals_say_why(raw, code):
    """Emergency, premium-rate, off-list, malformed and missing numbers are refused with a code."""
    with pytest.raises(InvalidNumber) as info:
        p(raw)
    assert info.value.code == code
    assert info.value.message


def test_toll_free_and_mobile_numbers_pass():
    """Toll-free and mobile numbers are callable."""
    assert p("+1 800 555 0100").region == "US"
    assert p("+91 98765 43210").region == "IN"
    assert p("0412 345 678", default_region="AU").e164 == "+61412345678"


def test_mask_hides_the_middle():
    """Logs show the country code and area, dots, and the last four digits."""
    assert mask("+14155550100") == "+1415•••0100"
    assert "5550100" not in repr(p("+14155550100"))


def test_keys_depend_on_the_secret():
    """The key is HMAC-SHA256(secret, E.164): the same number and secret give the same key,
    on any instance; another secret another."""
    a, b = PhoneKeyer("k1"), PhoneKeyer("k2", previous=["k1"])
    assert a.key("+14155550100") == PhoneKeyer("k1").key("+14155550100") == hmac.new(
        b"k1", b"+14155550100", hashlib.sha256).digest()
    assert a.key("+14155550100") != b.key("+14155550100")
    assert b.previous("+14155550100") == [a.key("+14155550100")]

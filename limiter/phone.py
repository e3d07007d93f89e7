"""Phone numbers as the limiter sees them: parsed, checked, masked for logs, keyed by HMAC.

The number itself is never stored: the limiter's key is HMAC-SHA256(PHONE_ENCRYPTION_KEY,
E.164 form). Logs show ``mask()``: the country code and area, dots, the last four digits.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType, shortnumberinfo

from limiter.errors import InvalidNumber

# Number types a voice agent may call or be called from. Everything else (premium-rate,
# shared-cost, personal, pager, UAN, voicemail, unknown) invites toll fraud or makes no
# sense for a call.
CALLABLE_TYPES = frozenset({
    PhoneNumberType.FIXED_LINE,
    PhoneNumberType.MOBILE,
    PhoneNumberType.FIXED_LINE_OR_MOBILE,
    PhoneNumberType.TOLL_FREE,
    PhoneNumberType.VOIP,
})

MAX_INPUT_LENGTH = 64


@dataclass(frozen=True)
class PhoneNumber:
    e164: str
    region: str

    @property
    def masked(self) -> str:
        return mask(self.e164)

    def __repr__(self) -> str:  # never the number itself, even in a traceback
        return f"PhoneNumber({self.masked!r}, region={self.region!r})"

    __str__ = __repr__


def mask(e164: str) -> str:
    """``+14155550100`` -> ``+1415•••0100``: enough to tell numbers apart in a log, no more."""
    if len(e164) <= 8:
        return e164[:2] + "•••"
    return f"{e164[:5]}•••{e164[-4:]}"


def parse(raw: object, *, default_region: str, allowed_regions: Iterable[str]) -> PhoneNumber:
    """Normalise a number to E.164 and check that it may be called; else raise InvalidNumber."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidNumber("missing", "a phone number is required")
    return _parse(raw.strip(), default_region, frozenset(allowed_regions))


# phonenumbers takes ~0.1 ms a parse, and the same numbers come back (the page re-checks as
# the user types, webhooks repeat): remember recent answers. Refusals raise, so are not kept.
@functools.lru_cache(maxsize=4096)
def _parse(text: str, default_region: str, allowed: frozenset[str]) -> PhoneNumber:
    if len(text) > MAX_INPUT_LENGTH:
        raise InvalidNumber("unparseable", "that is too long to be a phone number")
    # phonenumbers skips what it does not understand; a control character (a NUL, a newline
    # before a second number) is never part of a number someone typed.
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise InvalidNumber("unparseable", "that has characters a phone number does not")
    try:
        parsed = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException:
        raise InvalidNumber("unparseable", "that is not a phone number") from None
    if parsed.extension:
        # We would dial the main number and never the extension: say so rather than call it.
        raise InvalidNumber("not_callable", "numbers with an extension cannot be called: send the number alone")
    region = phonenumbers.region_code_for_number(parsed) or ""
    if _is_emergency_or_short(text, parsed, region or default_region):
        raise InvalidNumber("not_callable", "emergency and short-code numbers cannot be called")
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidNumber("invalid", "that is not a valid phone number")
    if region not in allowed:
        raise InvalidNumber(
            "region_not_allowed",
            f"numbers in {region or 'that region'} are not allowed here (allowed: {', '.join(sorted(allowed))})",
        )
    number_type = phonenumbers.number_type(parsed)
    if number_type not in CALLABLE_TYPES:
        kind = {
            PhoneNumberType.PREMIUM_RATE: "premium-rate",
            PhoneNumberType.SHARED_COST: "shared-cost",
            PhoneNumberType.PERSONAL_NUMBER: "personal",
            PhoneNumberType.PAGER: "pager",
            PhoneNumberType.UAN: "UAN",
            PhoneNumberType.VOICEMAIL: "voicemail",
        }.get(number_type, "this type of")
        raise InvalidNumber("not_callable", f"{kind} numbers cannot be called")
    return PhoneNumber(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164), region)


def _is_emergency_or_short(text: str, parsed: phonenumbers.PhoneNumber, region: str) -> bool:
    # Short codes are dialled without a country code; "+1415555" is just a bad number.
    dialled_locally = not text.startswith("+")
    return shortnumberinfo.is_emergency_number(text, region) or (
        dialled_locally
        and len(str(parsed.national_number)) <= 6
        and shortnumberinfo.is_valid_short_number_for_region(parsed, region)
    )


class PhoneKeyer:
    """Turns an E.164 number into the limiter's keys: HMAC-SHA256 under each configured key.

    ``key()`` uses the current key (every write); ``previous()`` the older ones, so rows made
    before a rotation are still found and moved.
    """

    def __init__(self, key: str, previous: Iterable[str] = ()) -> None:
        self._current = key.encode()
        self._previous = tuple(k.encode() for k in previous if k and k.encode() != self._current)

    def key(self, e164: str) -> bytes:
        return hmac.new(self._current, e164.encode(), hashlib.sha256).digest()

    def previous(self, e164: str) -> list[bytes]:
        return [hmac.new(k, e164.encode(), hashlib.sha256).digest() for k in self._previous]

    @property
    def rotating(self) -> bool:
        return bool(self._previous)

    @staticmethod
    def short(key: bytes) -> str:
        """A short hex prefix of a key, for logs."""
        return key.hex()[:12]

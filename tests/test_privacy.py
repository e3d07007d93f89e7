"""No phone number is stored in any form: only keyed hashes."""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

import phonenumbers

from db.embedded import _bin_dir
from helpers import make_limiter

NUMBERS = ["+14155550100", "+1 (212) 555-0147", "+61 2 9374 4000", "+91 98765 43210"]


def _forms(number: str) -> set[str]:
    """Every way the number might have been written down."""
    parsed = phonenumbers.parse(number, "US")
    forms = {phonenumbers.format_number(parsed, f) for f in (
        phonenumbers.PhoneNumberFormat.E164, phonenumbers.PhoneNumberFormat.INTERNATIONAL,
        phonenumbers.PhoneNumberFormat.NATIONAL)}
    national = str(parsed.national_number)
    forms |= {national, f"{parsed.country_code}{national}", number}
    return {f for f in forms if f}


async def test_database_dump_holds_no_number(dsn, pool):
    """After charges, refunds and status reads, a full dump of the database contains none of
    the numbers used, in any format."""
    limiter = make_limiter(pool)
    for i, number in enumerate(NUMBERS):
        await limiter.hit(number, f"CA{i}")
        await limiter.hit(number, f"CB{i}")
        await limiter.test(number)
    await limiter.refund("CA0")
    parts = urlsplit(dsn)
    dump = subprocess.run(
        [str(_bin_dir() / "pg_dump"), "--data-only", "--no-owner", "-h", parts.hostname,
         "-p", str(parts.port), "-U", parts.username or "postgres", parts.path.lstrip("/")],
        check=True, capture_output=True, text=True,
    ).stdout
    assert "phone_limits" in dump and dump.count("\\x") >= len(NUMBERS)  # the hashed keys are there
    for number in NUMBERS:
        for form in _forms(number):
            assert form not in dump, f"{form!r} found in the dump"


async def test_logs_hold_no_number(pool, caplog):
    """Charging, refusing, refunding, resetting and an outage log masked numbers only."""
    import logging

    caplog.set_level(logging.DEBUG)
    limiter = make_limiter(pool, max_calls=1)
    for number in NUMBERS:
        await limiter.hit(number, f"CA{abs(hash(number))}")
        await limiter.hit(number, f"CB{abs(hash(number))}")  # refused: logged
        await limiter.reset(number)
    await pool.close()  # PostgreSQL "goes away" for this limiter: the outage path logs too
    await limiter.hit(NUMBERS[0], "CC1")
    text = caplog.text
    assert "•••" in text
    for number in NUMBERS:
        for form in _forms(number):
            assert form not in text, f"{form!r} found in the logs"

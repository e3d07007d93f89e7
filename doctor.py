"""``python server.py admin doctor``: checks a real deployment from the operator's shell.

Placeholder: the checks are being written (issue 11)."""

from __future__ import annotations

from config import Settings


async def run(settings: Settings) -> int:
    print("doctor: not written yet")
    return 1

"""Fault scenarios, slow ones: each runs real Callgate processes against a real PostgreSQL
that the scenario restarts, crashes or cuts off (bench/soak/stage.py), checks what an operator
paying for every call would check, and prints what it measured.

    .venv/bin/python bench/soak/run.py pg-restart       # one scenario
    .venv/bin/python bench/soak/run.py all              # every scenario, one after another
    .venv/bin/python bench/soak/run.py --list
    .venv/bin/python bench/soak/run.py sigkill --record # and write the outcome into docs/reliability.md

Exit status 0 when every check of every scenario held. docs/reliability.md says what each
scenario does and holds the last outcome of each (``--record`` rewrites that scenario's block).
SOAK_KEEP_LOGS=folder keeps the servers' logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.soak import abuse, calls, database, instances  # noqa: E402
from bench.soak.stage import Outcome  # noqa: E402

SCENARIOS: dict[str, Callable[[], Awaitable[Outcome]]] = {
    "pg-restart": database.pg_restart,
    "crash-restart": database.crash_restart,
    "black-hole": database.black_hole,
    "down-at-start": database.down_at_start,
    "burst-stall": database.burst_stall,
    "model-faults": calls.model_faults,
    "twilio-faults": calls.twilio_faults,
    "soak": calls.soak,
    "replays": calls.replays,
    "sigterm": instances.sigterm,
    "sigkill": instances.sigkill,
    "floods": abuse.floods,
}
DOCS = ROOT / "docs" / "reliability.md"


def record(outcome: Outcome) -> None:
    """Replace the scenario's outcome block in docs/reliability.md."""
    text = DOCS.read_text()
    begin, end = f"<!-- outcome:{outcome.scenario} -->", f"<!-- /outcome:{outcome.scenario} -->"
    if begin not in text:
        print(f"docs/reliability.md has no block for {outcome.scenario}: not recorded", file=sys.stderr)
        return
    day = time.strftime("%Y-%m-%d", time.gmtime(outcome.started))
    lines = [f"Last run {day}: **{'passed' if outcome.passed else 'FAILED'}**.", ""]
    lines += [f"- {name}: {value}" for name, value in outcome.figures.items()]
    lines += [f"- [{'x' if ok else ' '}] {what}" for what, ok in outcome.checks]
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    DOCS.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S))


async def main(names: list[str], keep: bool) -> int:
    failed = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        outcome = await SCENARIOS[name]()
        print(outcome.report(), flush=True)
        if keep:
            record(outcome)
        if not outcome.passed:
            failed.append(name)
    if len(names) > 1:
        print(f"\n{len(names) - len(failed)} of {len(names)} scenarios passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="*", help="scenario names, or all")
    parser.add_argument("--list", action="store_true", help="list the scenarios")
    parser.add_argument("--record", action="store_true", help="write the outcomes into docs/reliability.md")
    args = parser.parse_args()
    if args.list or not args.scenario:
        print("\n".join(SCENARIOS))
        sys.exit(0)
    chosen = list(SCENARIOS) if args.scenario == ["all"] else args.scenario
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(chosen, args.record)))

"""The SQL the server runs, read once at start from ``sql/*.sql``, and the migrations.

Each file is one statement with a header saying what ``$1..$n`` mean and what comes back.
``Queries`` declares every file as a field: loading fails, naming the file, when one is
missing or when a file has no field (a statement nobody runs, or a typo in a name); a test
prepares every one against the migrated schema. Code says ``queries.limiter_hit`` and a
misspelt name is an AttributeError at the line that has it, found by any linter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"


class SqlFilesError(RuntimeError):
    """The files in sql/ are not the set ``Queries`` declares."""


@dataclass(frozen=True)
class Queries:
    """The text of each ``sql/<field>.sql``."""

    admin_stats: str
    call_requests_get: str
    call_requests_put: str
    calls_admit: str
    calls_admit_lock: str
    calls_cleanup: str
    calls_end_reason: str
    calls_get: str
    calls_hold: str
    calls_mark_refunded: str
    calls_record: str
    calls_release_hold: str
    calls_status: str
    calls_statuses: str
    calls_unfinished: str
    calls_stream_start: str
    database_ping: str
    events_notify: str
    instances_heartbeat: str
    instances_leave: str
    instances_reap: str
    limiter_cleanup: str
    limiter_hit: str
    limiter_refund: str
    limiter_refund_at: str
    limiter_rekey: str
    limiter_rekey_charges: str
    limiter_reset: str
    limiter_status: str

    @classmethod
    def load(cls, directory: Path = SQL_DIR) -> Queries:
        files = {path.stem: path.read_text() for path in sorted(directory.glob("*.sql"))}
        declared = {f.name for f in dataclasses.fields(cls)}
        problems = []
        if missing := sorted(declared - files.keys()):
            problems.append("missing " + ", ".join(f"sql/{name}.sql" for name in missing))
        if extra := sorted(files.keys() - declared):
            problems.append("not declared in db/sql.py: " + ", ".join(f"sql/{name}.sql" for name in extra))
        if problems:
            raise SqlFilesError("the SQL files and db/sql.py's Queries disagree: " + "; ".join(problems))
        return cls(**files)


def migrations(directory: Path = MIGRATIONS_DIR) -> list[tuple[str, str]]:
    """(name, text) of every migration, in name order (``NNN_name.sql``)."""
    return [(path.name, path.read_text()) for path in sorted(directory.glob("*.sql"))]

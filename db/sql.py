"""The SQL the server runs, read once at start from ``sql/*.sql``.

Each file is one statement with a header saying what ``$1..$n`` mean and what comes back.
A missing file fails at start, naming the file, not at the first call that needs it.
"""

from __future__ import annotations

from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"


class Queries:
    """``queries.limiter_hit`` is the text of ``sql/limiter_hit.sql``, and so on."""

    def __init__(self, directory: Path = SQL_DIR) -> None:
        self._text = {path.stem: path.read_text() for path in sorted(directory.glob("*.sql"))}

    def __getattr__(self, name: str) -> str:
        try:
            return self._text[name]
        except KeyError:
            raise AttributeError(f"no SQL file sql/{name}.sql") from None

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self._text]
        if missing:
            raise FileNotFoundError(f"missing SQL files: {', '.join(f'sql/{n}.sql' for n in missing)}")


def migrations(directory: Path = MIGRATIONS_DIR) -> list[tuple[str, str]]:
    """(name, text) of every migration, in name order (``NNN_name.sql``)."""
    return [(path.name, path.read_text()) for path in sorted(directory.glob("*.sql"))]

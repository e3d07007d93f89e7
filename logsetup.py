"""Logging: plain text by default, one JSON object per line with LOG_FORMAT=json."""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

# With WEB_CONCURRENCY > 1 each line says which worker wrote it (workers.py sets this).
WORKER = os.environ.get("CALLGATE_WORKER")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if WORKER:
            entry["worker"] = int(WORKER)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class ExpectedOutages(logging.Filter):
    """asyncpg logs a lost connection (PostgreSQL restarting, a network cut) as an error with
    its traceback; and when a lost connection had a request being cancelled (our timeout), its
    internal future's "unexpected connection_lost() call" reaches asyncio's "exception never
    retrieved" (asyncpg issue 1211). For us both are an outage we handle (the database gate says
    so in one line): one WARNING line with the reason, no traceback. Anything else is untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno >= logging.ERROR and self._outage(record):
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args, record.exc_info, record.exc_text = None, None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    @staticmethod
    def _outage(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1]
        if record.name.startswith("asyncpg"):
            from db.errors import AWAY  # (here: logsetup must not import the database at start)

            return isinstance(exc, AWAY)
        return (record.name == "asyncio" and type(exc) is ConnectionError
                and str(exc) == "unexpected connection_lost() call")


def configure(log_format: str = "text", level: str = "info") -> None:
    # Nothing we format reads a record's source file, thread or process: skip finding them
    # (the logging HOWTO's "Optimization"); walking the stack for each line was most of the
    # cost of a call's four log lines.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ExpectedOutages())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        worker = f"w{WORKER} " if WORKER else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {worker}%(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per webhook and health probe; ours are enough.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # twilio-python logs each REST request at INFO, parameters included: a placed call's To
    # and From are phone numbers, which never go to our logs.
    logging.getLogger("twilio").setLevel(logging.WARNING)


class Throttled:
    """Log lines that a client can cause at will (refused requests) at most once per
    ``every_s`` per key, so a client retrying in a loop cannot flood the log; the next line
    for a key says how many were left out since the last."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, max_keys: int = 1000) -> None:
        self._log = logger
        self._every = every_s
        self._max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key → (when last logged, left out since)

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, left_out = self._last.get(key, (float("-inf"), 0))
        if now - last < self._every:
            self._last[key] = (last, left_out + 1)
            return
        if len(self._last) >= self._max_keys:  # bounded: forget the oldest keys
            for old in sorted(self._last, key=lambda k: self._last[k][0])[:self._max_keys // 10]:
                del self._last[old]
        self._last[key] = (now, 0)
        if left_out:
            message += " (%d like it not logged in the last %.0f s)"
            args = (*args, left_out, now - last)
        self._log.warning(message, *args)

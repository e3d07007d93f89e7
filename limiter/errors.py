"""The limiter's own exceptions: nothing from asyncpg leaves the package."""

from __future__ import annotations


class LimiterError(Exception):
    """Base class of everything the limiter raises."""


class InvalidNumber(LimiterError):
    """A number that may not be charged or called. ``code`` is stable; ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LimiterUnavailable(LimiterError):
    """PostgreSQL did not answer in time or could not be reached.

    ``sent`` tells whether the statement may have reached the server: if it did, its outcome
    is unknown and a charge must be counted as made.
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent

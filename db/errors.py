"""Which asyncpg failures mean "PostgreSQL is away", shared by everything that talks to it.

The connection cannot be made or broke, the server is shutting down, out of connections or
resources, or did not answer in time. Anything else (a constraint, a bad parameter, a typo in
SQL) is a bug, never an outage, and must not be handled as one.
"""

from __future__ import annotations

import asyncpg

AWAY = (
    asyncpg.PostgresConnectionError,      # SQLSTATE 08: connection exceptions
    asyncpg.CannotConnectNowError,        # 57P03: starting up
    asyncpg.AdminShutdownError,           # 57P01
    asyncpg.CrashShutdownError,           # 57P02
    asyncpg.InsufficientResourcesError,   # 53: too many connections, out of memory or disk
    asyncpg.QueryCanceledError,           # 57014: statement_timeout
    asyncpg.LockNotAvailableError,        # 55P03: lock_timeout
    asyncpg.InterfaceError,               # the connection closed under us
    OSError,
    TimeoutError,
)
RETRY_ONCE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)

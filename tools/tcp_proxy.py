"""A TCP proxy on loopback that can fail the way a network or a database server does.

Tests, benchmarks and the soak scenarios put it between Callgate and PostgreSQL::

    async with proxied(dsn) as proxy:   # proxy.dsn goes through it
        proxy.stall()    # a black hole: connections accepted, nothing answered
        proxy.mute()     # requests arrive, answers are swallowed
        proxy.cut()      # every connection reset, new ones refused at once
        proxy.restore()  # forward again (connections open during the fault are dropped)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit


@contextlib.asynccontextmanager
async def proxied(dsn: str) -> AsyncIterator[TcpProxy]:
    """A TcpProxy in front of ``dsn``'s server; its ``dsn`` goes through it."""
    parts = urlsplit(dsn)
    proxy = await TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    user = parts.netloc.rpartition("@")[0]
    proxy.dsn = urlunsplit(parts._replace(netloc=f"{user + '@' if user else ''}127.0.0.1:{proxy.port}"))
    try:
        yield proxy
    finally:
        await proxy.close()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target`` until told to fail (``mode``)."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"
        self.port = port  # 0: any free port (start() sets the real one)
        self.dsn: str | None = None  # set by proxied(): the database URL through the proxy
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.close()
            return
        self._writers.add(writer)
        try:
            if self.mode == "stall":
                await reader.read()  # hold the connection, answer nothing
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            pumps = [asyncio.create_task(self._pump(reader, up_writer, upstream=True)),
                     asyncio.create_task(self._pump(up_reader, writer, upstream=False))]
            self._tasks.update(pumps)
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()
            up_writer.close()
            self._writers.discard(up_writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.mode == "stall" or (self.mode == "mute" and not upstream):
                    continue  # swallow: the peer waits for an answer that never comes
                writer.write(data)
                await writer.drain()

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        self.mode = "cut"
        self._drop_all()

    def stall(self) -> None:
        self.mode = "stall"

    def mute(self) -> None:
        self.mode = "mute"

    def restore(self) -> None:
        self._drop_all()
        self.mode = "forward"

    async def close(self) -> None:
        self._drop_all()
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()

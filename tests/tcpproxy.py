"""A loopback TCP proxy that a test can cut or stall: PostgreSQL "going away" as a client sees it.

``cut()`` closes every open connection and refuses new ones (a stopped server); ``stall()``
accepts and holds bytes without forwarding them (a server that does not answer); ``mute()``
forwards requests but drops the replies (the server did the work, the answer was lost: a
"ghost write"); ``restore()`` drops what is open, as a restarted server would, and forwards
again.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
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

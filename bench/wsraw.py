"""The least WebSocket (RFC 6455) a load generator needs, on asyncio protocols: no task, no
future and no copy per message, writes batched per read. bench/calls.py's callers and echo
model use it so that the load they generate costs them a small share of a core: with
aiohttp and websockets on both peers, the load for 300 calls took all of one (and set the
pace instead of the relay under test). Never used by the server.

Frames are never fragmented here and only text, ping/pong and close are handled; frames we
send as a client carry the all-zero mask, which RFC 6455 allows (the key must be unpredictable
to defeat proxy cache poisoning, which a loopback benchmark has nothing to fear from) and which
makes masking free.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import struct
from collections.abc import Iterator

from websockets.speedups import apply_mask  # C: unmasking what a real client sends

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
ZERO_MASK = b"\0\0\0\0"


def frame(payload: bytes, opcode: int = TEXT, *, masked: bool = False) -> bytes:
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    return head + ZERO_MASK + payload if masked else head + payload


class FrameReader:
    """Bytes in, (opcode, payload) out, for whole unfragmented frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b1, b2 = buf[pos], buf[pos + 1]
            n, at = b2 & 0x7F, pos + 2
            if n == 126:
                if end - at < 2:
                    break
                n, at = struct.unpack_from("!H", buf, at)[0], at + 2
            elif n == 127:
                if end - at < 8:
                    break
                n, at = struct.unpack_from("!Q", buf, at)[0], at + 8
            mask = None
            if b2 & 0x80:
                if end - at < 4:
                    break
                mask, at = bytes(buf[at:at + 4]), at + 4
            if end - at < n:
                break
            payload = bytes(buf[at:at + n])
            if mask is not None and mask != ZERO_MASK:
                payload = apply_mask(payload, mask)
            pos = at + n
            yield b1 & 0x0F, payload
        del buf[:pos]


def accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


class Peer(asyncio.Protocol):
    """One WebSocket connection. Subclasses implement ``opened`` and ``text`` and call
    ``send`` (writes are gathered and flushed once per read)."""

    client = False  # a client masks what it sends

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._reader: FrameReader | None = None
        self._out: list[bytes] = []
        self._in_read = False
        self.closed = asyncio.get_running_loop().create_future()

    # -- what subclasses implement ----------------------------------------------------------

    def opened(self, head: str) -> None: ...

    def text(self, payload: bytes) -> None: ...

    def handshake(self, head: str) -> bool:
        """The other side's handshake (request or response); True to go on."""
        raise NotImplementedError

    # -- the machinery ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        data = frame(payload, opcode, masked=self.client)
        if self._in_read:
            self._out.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send(struct.pack("!H", 1000), CLOSE)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._in_read = True
        try:
            if self._reader is None:
                self._head += data
                end = self._head.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, data = self._head[:end].decode("latin-1"), bytes(self._head[end + 4:])
                self._reader = FrameReader()
                if not self.handshake(head):
                    self.transport.close()
                    return
                self.opened(head)
            for opcode, payload in self._reader.feed(data):
                if opcode == TEXT:
                    self.text(payload)
                elif opcode == PING:
                    self.send(payload, PONG)
                elif opcode == CLOSE:
                    self.send(payload[:2], CLOSE)
                    self._flush()
                    self.transport.close()
                    return
        finally:
            self._in_read = False
            self._flush()

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self._out)
        self._out = []


class ServerPeer(Peer):
    path = ""

    def handshake(self, head: str) -> bool:
        match = re.search(r"(?im)^sec-websocket-key:\s*(\S+)", head)
        if not match:
            return False
        self.path = head.split(" ", 2)[1]
        self.transport.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {accept(match.group(1))}\r\n\r\n").encode())
        return True


class ClientPeer(Peer):
    client = True
    status = 0

    def request(self, host: str, path: str, headers: dict[str, str]) -> None:
        key = base64.b64encode(hashlib.md5(str(id(self)).encode()).digest()).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                 *(f"{name}: {value}" for name, value in headers.items())]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def handshake(self, head: str) -> bool:
        self.status = int(head.split(" ", 2)[1])
        return self.status == 101

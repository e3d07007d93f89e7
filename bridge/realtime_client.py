"""The model side of a call: one connection per call, speaking Realtime GA events as text.

``RealtimeConnector`` opens a ``websockets`` client connection to OpenAI (or to a peer at
``OPENAI_REALTIME_URL``); ``offline.OfflineConnector`` answers locally behind the same
interface. A ``ModelConnection`` sends text frames, returns received frames until the peer
closes (ending quietly on a clean close, raising ``ModelError`` on a broken one), and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import urllib.request
from typing import Protocol
from urllib.parse import urlencode, urlsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.protocol import State

from config import CLOSE_TIMEOUT_S

log = logging.getLogger("callgate.model")

MAX_FRAME_BYTES = 4 * 1024 * 1024  # an audio delta is a few KiB; this bounds a broken peer


class ModelError(Exception):
    """The model connection could not be opened, or broke."""


class ModelConnection(Protocol):
    async def send(self, frame: str) -> None: ...

    async def recv(self) -> str | bytes | None: ...  # None: closed cleanly; ModelError: broken

    async def close(self) -> None: ...


class ModelConnector(Protocol):
    name: str

    async def connect(self) -> ModelConnection: ...


class RealtimeConnection:
    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def send(self, frame: str) -> None:
        ws = self._ws
        # The common case (50 times a second per call) through websockets' Sans-I/O protocol:
        # open, no fragmented message under way, the write buffer under its limit. ws.send()
        # would do the same inside a context manager and then yield to the event loop once
        # per frame: a fifth of the relay's CPU (bench/calls.py). Anything else takes that path.
        if ws.protocol.state is State.OPEN and ws.send_in_progress is None and not ws.paused:
            ws.protocol.send_text(frame.encode())
            ws.send_data()
            return
        try:
            await ws.send(frame)
        except websockets.ConnectionClosed as exc:
            raise ModelError(f"model connection closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})") from exc

    async def recv(self) -> str | bytes | None:
        """The next frame; None once the peer closed cleanly. (A method, not an async iterator:
        a generator layer per frame, twice over with websockets' own, cost 2 % of the relay.)"""
        try:
            return await self._ws.recv()
        except websockets.ConnectionClosedOK:
            return None
        except websockets.ConnectionClosedError as exc:
            raise ModelError(f"model connection broke ({exc.rcvd.code if exc.rcvd else 'no close frame'})") from exc

    async def close(self) -> None:
        """Close within CLOSE_TIMEOUT_S. Frames still arriving are read and dropped meanwhile:
        with its receive queue full, websockets stops reading and would never see the peer's
        close frame (a model mid-reply sends dozens of audio deltas)."""
        discarding = asyncio.create_task(self._discard_incoming())
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._ws.close()
        except TimeoutError:
            self._ws.transport.abort()
        finally:
            discarding.cancel()

    async def _discard_incoming(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for _ in self._ws:
                pass


def _proxy_for(url: str) -> str | None:
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get("wss" if parts.scheme == "wss" else "ws") or proxies.get(
        "https" if parts.scheme == "wss" else "http")


class RealtimeConnector:
    name = "openai-realtime"

    def __init__(self, url: str, model: str, api_key: str, open_timeout: float) -> None:
        self._url = f"{url}?{urlencode({'model': model})}"
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._open_timeout = open_timeout
        # HTTPS_PROXY and friends are read once, not on every call's connect as websockets does
        # by default (its environment lookups were 2 % of a call's set-up).
        self._proxy = _proxy_for(url)

    async def connect(self) -> RealtimeConnection:
        try:
            ws = await connect(
                self._url,
                additional_headers=self._headers,
                open_timeout=self._open_timeout,
                max_size=MAX_FRAME_BYTES,
                # A connection that dies without a close (a lost route, a frozen peer) is noticed
                # within ~20 s instead of the caller hearing nothing until the time limit.
                ping_interval=10,
                ping_timeout=10,
                close_timeout=CLOSE_TIMEOUT_S,
                compression=None,  # audio is base64 noise to deflate: pure CPU cost
                proxy=self._proxy,
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise ModelError(f"could not open the model connection: {type(exc).__name__}: {exc}") from exc
        # The handshake is over: its request and response headers (~2 KiB, the API key among
        # them) need not live as long as the call (bench/calls.py: RSS per call). websockets
        # wants a response there once the handshake is done: an empty one stands in.
        ws.request = None
        ws.response = dataclasses.replace(ws.response, headers=Headers(), body=b"")
        return RealtimeConnection(ws)

"""Who a request comes from: the one rule for a client's address (per-address caps, rate limits,
Turnstile, log lines' keyed hashes)."""

from __future__ import annotations

from aiohttp import web

from appkeys import SETTINGS


def client_ip(request: web.Request) -> str:
    """Behind Fly's proxy the client's address is in Fly-Client-IP, set by the proxy itself;
    elsewhere anyone could send that header, so only the peer's address counts
    (TRUST_FLY_CLIENT_IP). X-Forwarded-For can be written by anyone and is never trusted."""
    if request.app[SETTINGS].trusts_fly_client_ip and request.headers.get("Fly-Client-IP"):
        return request.headers["Fly-Client-IP"]
    return request.remote or "unknown"

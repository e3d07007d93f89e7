"""Cloudflare Turnstile verification for call.start (when TURNSTILE_SECRET_KEY is set).

Fails closed: no answer in time, a network error or anything but ``"success": true`` is a "no".
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger("callgate.turnstile")

VERIFY_TIMEOUT_S = 5.0


async def verify(session: aiohttp.ClientSession, url: str, secret: str, token: object,
                 remote_ip: str | None, timeout: float = VERIFY_TIMEOUT_S) -> bool:
    if not isinstance(token, str) or not token or len(token) > 4096:
        return False
    form = {"secret": secret, "response": token}
    if remote_ip:
        form["remoteip"] = remote_ip
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, data=form) as resp:
                if resp.status != 200:
                    log.warning("Turnstile answered HTTP %d", resp.status)
                    return False
                body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("Turnstile verification failed: %s", type(exc).__name__)
        return False
    return isinstance(body, dict) and body.get("success") is True

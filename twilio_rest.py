"""Twilio's REST API, the little we use of it: hang a call up (and, for the frontend, place one).

Built on twilio-python's aiohttp-based async client, pointed at ``TWILIO_API_BASE_URL`` (a
loopback peer in tests). Without credentials (development) every call is a logged no-op.
"""

from __future__ import annotations

import asyncio
import logging

from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

log = logging.getLogger("callgate.twilio")

REST_TIMEOUT_S = 10.0
# Twilio's answers for a call that has already ended: not found, or "not in progress".
ALREADY_ENDED_CODES = frozenset({20404, 21220})


class TwilioRest:
    def __init__(self, account_sid: str | None, auth_token: str | None, base_url: str,
                 timeout: float = REST_TIMEOUT_S) -> None:
        self.enabled = bool(account_sid and auth_token)
        self._timeout = timeout
        self._client: Client | None = None
        if self.enabled:
            self._http = AsyncTwilioHttpClient(timeout=timeout)
            self._client = Client(account_sid, auth_token, http_client=self._http)
            self._client.api.base_url = base_url

    async def hangup(self, call_sid: str) -> bool:
        """End a call; True when it is ended (now or already). Never raises."""
        if self._client is None:
            log.debug("no Twilio credentials: not hanging up %s over REST", call_sid)
            return False
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.calls(call_sid).update_async(status="completed")
        except TwilioRestException as exc:
            if exc.status == 404 or exc.code in ALREADY_ENDED_CODES:
                return True
            log.warning("REST hang-up of %s refused: %s %s", call_sid, exc.status, exc.code)
            return False
        except Exception as exc:  # noqa: BLE001 - a hang-up must never raise (timeouts, sockets, HTTP)
            log.warning("REST hang-up of %s failed: %s", call_sid, type(exc).__name__)
            return False
        log.info("hung up %s over REST", call_sid)
        return True

    async def close(self) -> None:
        if self._client is not None:
            await self._http.close()

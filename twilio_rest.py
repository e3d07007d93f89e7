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

RING_TIMEOUT_S = 30  # how long Twilio lets an outbound call ring before giving up (no-answer)

# Twilio's answers for a call that has already ended: not found, or "not in progress".
ALREADY_ENDED_CODES = frozenset({20404, 21220})


class CallRefused(Exception):
    """Twilio definitely did not place the call (a 4xx answer): the charge can be released."""

    def __init__(self, status: int, code: int | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class CallOutcomeUnknown(Exception):
    """No answer in time, or a server error: the call may or may not have been placed."""


class TwilioRest:
    def __init__(self, account_sid: str | None, auth_token: str | None, base_url: str,
                 timeout: float) -> None:
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

    async def create_call(self, *, to: str, from_: str, url: str, status_callback: str) -> str:
        """Place an outbound call; returns its CallSid. Raises CallRefused (4xx: nothing placed)
        or CallOutcomeUnknown (timeout, 5xx, network: it may have been placed). Never retried:
        one request, at most one call."""
        if self._client is None:
            raise CallRefused(503, None, "Twilio credentials are not configured")
        try:
            async with asyncio.timeout(self._timeout):
                call = await self._client.calls.create_async(
                    to=to, from_=from_, url=url, method="POST",
                    status_callback=status_callback, status_callback_method="POST",
                    status_callback_event=["initiated", "ringing", "answered", "completed"],
                    timeout=RING_TIMEOUT_S,
                )
        except TwilioRestException as exc:
            if 400 <= exc.status < 500:
                raise CallRefused(exc.status, exc.code, str(exc.msg)[:200]) from exc
            raise CallOutcomeUnknown(f"Twilio answered {exc.status}") from exc
        except Exception as exc:  # noqa: BLE001 - timeouts, sockets, HTTP: all leave the outcome open
            raise CallOutcomeUnknown(type(exc).__name__) from exc
        return call.sid

    async def close(self) -> None:
        if self._client is not None:
            await self._http.close()

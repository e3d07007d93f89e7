"""What the workflows in ``calls/`` may use: one object, built once by ``server.create_app``."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from bridge.events import EventBus
from config import Settings
from db.calls import CallStore
from lifecycle import Lifecycle
from limiter.limiter import Limiter
from twilio_rest import TwilioRest


@dataclass(frozen=True)
class Services:
    settings: Settings
    limiter: Limiter
    store: CallStore
    bus: EventBus
    rest: TwilioRest
    http: aiohttp.ClientSession  # outgoing HTTP (Turnstile)
    token_secret: bytes          # stream and subscription tokens (bridge/tokens.py)
    lifecycle: Lifecycle

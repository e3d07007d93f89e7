"""Typed keys for what the application shares between handlers (aiohttp ``AppKey``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from config import Settings
from db.database import Database
from limiter.limiter import Limiter
from metrics import Metrics


@dataclass
class Lifecycle:
    """Process-wide facts the health routes report."""

    started_at: float = field(default_factory=time.time)
    draining: bool = False
    active_calls: int = 0


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
DATABASE = web.AppKey("database", Database)
LIMITER = web.AppKey("limiter", Limiter)

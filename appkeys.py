"""Typed keys for what the application shares between handlers (aiohttp ``AppKey``): keys only.
Each value is made in ``server.create_app`` (or its cleanup contexts) and owned there."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from bridge.call import CallServices
from bridge.events import EventBus
from bridge.fanout import PgFanout
from calls.services import Services
from config import Settings
from db.calls import CallStore
from db.database import Database
from lifecycle import FrontendState, Lifecycle
from limiter.limiter import Limiter
from logsetup import Throttled
from metrics import Metrics
from twilio_rest import TwilioRest
from worker_metrics import WorkerMetrics

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
DATABASE = web.AppKey("database", Database)
LIMITER = web.AppKey("limiter", Limiter)
CALL_STORE = web.AppKey("call_store", CallStore)
BUS = web.AppKey("bus", EventBus)
CALL_SERVICES = web.AppKey("call_services", CallServices)  # what a running call uses (bridge/)
SERVICES = web.AppKey("services", Services)                # what the workflows use (calls/)
TWILIO_REST = web.AppKey("twilio_rest", TwilioRest)
TOKEN_SECRET = web.AppKey("token_secret", bytes)
HTTP = web.AppKey("http", aiohttp.ClientSession)  # outgoing HTTP (Turnstile)
FRONTEND = web.AppKey("frontend", FrontendState)
FANOUT = web.AppKey("fanout", PgFanout)
WORKER_METRICS = web.AppKey("worker_metrics", WorkerMetrics)  # in a worker of several: /metrics for all
REFUSALS = web.AppKey("refusals", Throttled)  # log lines for refused requests, throttled per reason

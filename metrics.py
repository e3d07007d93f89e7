"""Prometheus metrics, one registry per application (tests build many apps in one process).

No label ever holds a phone number: results, sources and outcomes only.
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from limiter.rules import Decision

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


# Codes and reasons of failed and incomplete responses that get a label of their own.
KNOWN_RESPONSE_CODES = frozenset({
    "server_error", "rate_limit_exceeded", "inference_rate_limit_exceeded", "insufficient_quota",
    "max_output_tokens", "content_filter",
})


class RelayMeter:
    """callgate_relay_frames_total and callgate_relay_latency_seconds, observed per frame (100
    times a second per call) into plain lists and turned into metrics only when scraped: a
    prometheus_client Histogram takes a lock and walks its label children on every observe, 5 %
    of the relay's CPU (bench/calls.py). One event loop thread observes, so no lock is needed."""

    DIRECTIONS = ("caller_to_model", "model_to_caller")
    BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

    def __init__(self) -> None:
        # direction → [count per bucket (the last: above every bound)], and the sums
        self._counts = {d: [0] * (len(self.BUCKETS) + 1) for d in self.DIRECTIONS}
        self._sums = dict.fromkeys(self.DIRECTIONS, 0.0)

    def observe(self, direction: str, seconds: float) -> None:
        self._counts[direction][bisect.bisect_left(self.BUCKETS, seconds)] += 1
        self._sums[direction] += seconds

    def describe(self):
        return []  # (registered without a describe-time collect)

    def collect(self):
        frames = CounterMetricFamily("callgate_relay_frames", "Audio frames relayed, by direction",
                                     labels=["direction"])
        latency = HistogramMetricFamily(
            "callgate_relay_latency_seconds",
            "Time from a frame's arrival to its relay being sent on (model_to_caller: audio and any mark)",
            labels=["direction"])
        for direction in self.DIRECTIONS:
            counts = self._counts[direction]
            total, cumulative = sum(counts), []
            running = 0
            for bound, n in zip(self.BUCKETS, counts):
                running += n
                cumulative.append((repr(float(bound)), running))
            cumulative.append(("+Inf", total))
            frames.add_metric([direction], total)
            latency.add_metric([direction], cumulative, self._sums[direction])
        yield frames
        yield latency


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds: a relay is bound by
        # one core and by memory per call, so these size a deployment (ops/grafana).
        ProcessCollector(registry=self.registry)
        self.limiter_decisions = Counter(
            "callgate_limiter_decisions_total",
            "Limiter answers by operation, result and who decided (database, memory, open, closed, validation)",
            ["op", "result", "source"], registry=self.registry,
        )
        self.limiter_latency = Histogram(
            "callgate_limiter_latency_seconds", "Time to answer one limiter call", ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.limiter_pending = Gauge(
            "callgate_limiter_pending", "Charges and refunds decided while PostgreSQL was away, not yet written back",
            registry=self.registry,
        )
        self.instances_alive = Gauge(
            "callgate_instances_alive", "Instances this one counted alive at its last heartbeat (itself included)",
            registry=self.registry)
        self.calls_owed = Gauge(
            "callgate_calls_owed", "Call records and statuses made while PostgreSQL was away, not yet written back",
            registry=self.registry)
        self.database_up = Gauge("callgate_database_up", "1 when PostgreSQL answered the last check", registry=self.registry)
        self.pool_size = Gauge("callgate_db_pool_connections", "Connections open in the pool", registry=self.registry)
        self.pool_in_use = Gauge("callgate_db_pool_in_use", "Pool connections lent out now", registry=self.registry)
        self.active_calls = Gauge("callgate_active_calls", "Calls live on this instance", registry=self.registry)
        self.calls = Counter("callgate_calls_total", "Calls ended, by outcome", ["outcome"], registry=self.registry)
        self.relay = RelayMeter()
        self.setup = Histogram(
            "callgate_call_setup_seconds",
            "A call's set-up by stage: webhook (the voice webhook answered), stream (its Media Stream's "
            "start to the model ready for audio)", ["stage"],
            buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.registry.register(self.relay)
        self.open_sockets = Gauge("callgate_open_sockets", "Open WebSockets, by kind", ["kind"], registry=self.registry)
        self.frontend_refused = Counter(
            "callgate_frontend_refused_total", "/logs upgrades refused, by reason (origin, per_ip_cap, handshake_rate)",
            ["reason"], registry=self.registry)
        self.frames_rejected = Counter(
            "callgate_stream_frames_rejected_total",
            "Frames from Twilio's side dropped unrelayed, by reason (malformed, binary, too_fast)",
            ["reason"], registry=self.registry)
        # Queues that overflow rather than wait: a browser that cannot keep up is cut off, and
        # call events that cannot reach the other instances are dropped (never a call slowed).
        self.frontend_dropped = Counter(
            "callgate_frontend_dropped_total",
            "/logs clients disconnected for not keeping up, by reason (behind: its queue overflowed; "
            "stopped_reading: one message took over 5 s to go out)", ["reason"], registry=self.registry)
        self.fanout_dropped = Counter(
            "callgate_fanout_dropped_total",
            "Call events not sent to the other instances, by reason: queue_full and too_big count events, "
            "database_away and refused count NOTIFY batches of them", 
            ["reason"], registry=self.registry)
        for reason in ("behind", "stopped_reading"):
            self.frontend_dropped.labels(reason)  # exported as 0 from the start: rate() sees the first one
        for reason in ("queue_full", "database_away", "refused", "too_big"):
            self.fanout_dropped.labels(reason)
        self.response_failures = Counter(
            "callgate_model_response_failures_total",
            "Model responses that failed or were cut short, by status (failed, incomplete) and code or reason",
            ["status", "code"], registry=self.registry)

    def observe_limiter(self, op: str, decision: Decision | None, seconds: float) -> None:
        if decision is not None:
            result = "allowed" if decision.allowed else (decision.reason or "refused")
            self.limiter_decisions.labels(op, result, decision.source).inc()
        self.limiter_latency.labels(op).observe(seconds)

    def frame_observer(self):
        return self.relay.observe

    def count_response_failure(self, status: str, code: str | None) -> None:
        """A failed or incomplete model response. The API's codes are open-ended: only the known
        ones become labels, the rest count as "other" (a label set must stay small)."""
        self.response_failures.labels(status, code if code in KNOWN_RESPONSE_CODES else "other").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

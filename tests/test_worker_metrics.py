"""Merging the workers' metrics into one answer (worker_metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker_metrics import merge, parse


def _worker(calls: int, live: int) -> str:
    registry = CollectorRegistry()
    Counter("callgate_calls_total", "Calls ended", ["outcome"], registry=registry).labels("ended").inc(calls)
    Gauge("callgate_live", "Live calls", registry=registry).set(live)
    Histogram("callgate_setup_seconds", "Set-up", buckets=(0.1, 1.0), registry=registry).observe(0.5)
    return generate_latest(registry).decode()


def test_every_workers_series_is_kept_with_its_worker_and_each_family_once():
    text = merge({"1": parse(_worker(3, 5)), "2": parse(_worker(4, 7))}, missing=1).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    calls = {s.labels["worker"]: s.value for s in families["callgate_calls"].samples if s.name.endswith("_total")}
    live = {s.labels["worker"]: s.value for s in families["callgate_live"].samples}
    buckets = [s for s in families["callgate_setup_seconds"].samples if s.name.endswith("_bucket")]
    assert (calls, live) == ({"1": 3, "2": 4}, {"1": 5, "2": 7})
    assert {s.labels["worker"] for s in buckets} == {"1", "2"} and len(buckets) == 6  # 0.1, 1, +Inf each
    assert families["callgate_metrics_workers_missing"].samples[0].value == 1
    assert text.count("# TYPE callgate_calls_total counter") == 1


def test_an_answer_that_is_not_an_exposition_is_left_out():
    """A port file left by a worker that died may now lead to something else."""
    assert parse("<html>not metrics</html>") is None
    assert parse(_worker(1, 1))

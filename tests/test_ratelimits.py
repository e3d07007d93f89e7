"""ratelimits.py: token buckets by key, refilling with time."""

from __future__ import annotations

from ratelimits import Bucket, Buckets


def test_a_key_gets_its_burst_then_its_rate():
    """A burst at once, then one more per 1/rate seconds; other keys are not affected."""
    buckets = Buckets(rate=2.0, burst=3)
    assert [buckets.take("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b", now=0.0)
    assert not buckets.take("a", now=0.4) and buckets.take("a", now=0.5)


def test_keys_are_bounded_by_forgetting_refilled_buckets():
    """Past max_keys, keys whose bucket has refilled are forgotten; a key still empty is kept
    (and still refused)."""
    buckets = Buckets(rate=1.0, burst=2, max_keys=3)
    for k in range(3):
        buckets.take(f"quiet{k}", now=0.0)
    buckets.take("busy", now=9.0)
    buckets.take("busy", now=9.0)
    buckets.take("new", now=10.0)  # one key too many: the refilled ones go
    assert len(buckets) == 2 and not buckets.take("busy", now=9.5)


def test_one_bucket_refills_at_its_rate():
    """A single bucket: burst, then the rate."""
    bucket = Bucket(rate=10.0, burst=2, now=0.0)
    assert [bucket.take(now=0.0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(now=0.05) and bucket.take(now=0.1)

"""The call event bus: per-call delivery, current status first, a slow subscriber dropped."""

from __future__ import annotations

from bridge import events
from calls.status import rank


def test_subscribers_see_only_their_call():
    """A subscriber of one call never sees another call's events; an all-calls one sees both."""
    bus = events.EventBus(rank)
    a, b, every = bus.subscribe("CA1"), bus.subscribe("CA2"), bus.subscribe(None)
    bus.publish(events.transcript_delta("CA1", "item_1", "assistant", "Hi"))
    bus.publish(events.status_changed("CA2", "ringing"))
    assert [a.queue.get_nowait()["callSid"] for _ in range(a.queue.qsize())] == ["CA1"]
    assert [b.queue.get_nowait()["callSid"] for _ in range(b.queue.qsize())] == ["CA2"]
    assert every.queue.qsize() == 2


def test_a_late_subscriber_starts_with_the_current_status():
    """Subscribing to a call that has a status delivers that status first."""
    bus = events.EventBus(rank)
    bus.publish(events.status_changed("CA1", "connected"))
    with bus.subscribe("CA1") as sub:
        assert sub.queue.get_nowait() == {"type": "call.status_changed", "callSid": "CA1", "status": "connected"}


def test_a_slow_subscriber_overflows_without_slowing_publishers():
    """A subscriber that stops reading is marked overflowed; others keep receiving everything."""
    bus = events.EventBus(rank)
    slow, fast = bus.subscribe("CA1", maxsize=3), bus.subscribe("CA1", maxsize=100)
    for i in range(10):
        bus.publish(events.transcript_delta("CA1", "item_1", "assistant", str(i)))
    assert slow.overflowed.is_set() and slow.queue.qsize() == 3
    assert fast.queue.qsize() == 10 and not fast.overflowed.is_set()


def test_closed_subscriptions_receive_nothing():
    """After close() a subscription is out of the bus."""
    bus = events.EventBus(rank)
    sub = bus.subscribe("CA1")
    sub.close()
    bus.publish(events.status_changed("CA1", "ended"))
    assert sub.queue.empty()


def test_statuses_never_go_back():
    """A late status ranking below the current one is not delivered (nor remembered)."""
    bus = events.EventBus(rank)
    with bus.subscribe("CA1") as sub:
        for status in ("queued", "busy", "queued", "ringing"):
            bus.publish(events.status_changed("CA1", status))
        assert [sub.queue.get_nowait()["status"] for _ in range(sub.queue.qsize())] == ["queued", "busy"]
    assert bus.current_status("CA1")["status"] == "busy"


def test_a_subscriber_closing_on_an_event_does_not_stop_delivery():
    """A sink that unsubscribes when its call ends does not keep others from the same event."""
    bus = events.EventBus(rank)
    got = []
    sub = bus.subscribe("CA1", sink=lambda e: (got.append(("a", e["status"])), sub.close()))
    bus.subscribe("CA1", sink=lambda e: got.append(("b", e["status"])))
    every = bus.subscribe(None)
    bus.publish(events.status_changed("CA1", "ended"))
    assert sorted(got) == [("a", "ended"), ("b", "ended")] and every.queue.qsize() == 1

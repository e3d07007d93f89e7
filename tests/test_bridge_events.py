"""The call event bus: per-call delivery, current status first, statuses never going back."""

from __future__ import annotations

from bridge import events
from calls.status import rank


def subscriber(bus: events.EventBus, call_sid: str | None) -> list[dict]:
    got: list[dict] = []
    bus.subscribe(call_sid, got.append)
    return got


def test_subscribers_see_only_their_call():
    """A subscriber of one call never sees another call's events; an all-calls one sees both."""
    bus = events.EventBus(rank)
    a, b, every = subscriber(bus, "CA1"), subscriber(bus, "CA2"), subscriber(bus, None)
    bus.publish(events.transcript_delta("CA1", "item_1", "assistant", "Hi"))
    bus.publish(events.status_changed("CA2", "ringing"))
    assert [e["callSid"] for e in a] == ["CA1"] and [e["callSid"] for e in b] == ["CA2"]
    assert [e["callSid"] for e in every] == ["CA1", "CA2"]


def test_a_late_subscriber_starts_with_the_current_status():
    """Subscribing to a call that has a status delivers that status first (unless asked not to)."""
    bus = events.EventBus(rank)
    bus.publish(events.status_changed("CA1", "connected"))
    assert subscriber(bus, "CA1") == [{"type": "call.status_changed", "callSid": "CA1", "status": "connected"}]
    quiet: list[dict] = []
    bus.subscribe("CA1", quiet.append, with_status=False)
    assert quiet == []


def test_closed_subscriptions_receive_nothing():
    """After close() a subscription is out of the bus."""
    bus = events.EventBus(rank)
    got: list[dict] = []
    bus.subscribe("CA1", got.append).close()
    bus.publish(events.status_changed("CA1", "ended"))
    assert got == []


def test_statuses_never_go_back():
    """A late status ranking below the current one is not delivered (nor remembered)."""
    bus = events.EventBus(rank)
    got = subscriber(bus, "CA1")
    for status in ("queued", "busy", "queued", "ringing"):
        bus.publish(events.status_changed("CA1", status))
    assert [e["status"] for e in got] == ["queued", "busy"]
    assert bus.current_status("CA1")["status"] == "busy"


def test_a_subscriber_closing_on_an_event_does_not_stop_delivery():
    """A sink that unsubscribes when its call ends does not keep others from the same event."""
    bus = events.EventBus(rank)
    got = []
    sub = bus.subscribe("CA1", lambda e: (got.append(("a", e["status"])), sub.close()))
    bus.subscribe("CA1", lambda e: got.append(("b", e["status"])))
    every = subscriber(bus, None)
    bus.publish(events.status_changed("CA1", "ended"))
    assert sorted(got) == [("a", "ended"), ("b", "ended")] and len(every) == 1

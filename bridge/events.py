"""Typed call events (SPEC §6) and the in-process bus that carries them to subscribers.

The bus never waits for a subscriber: it hands each event to the subscriber's sink, which
must not block (a frontend client puts it in its own bounded queue and is disconnected when
that is full). A call therefore never slows down because a browser is slow. Raw model events
and audio never enter the bus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Event = dict[str, Any]

def status_changed(call_sid: str, status: str, reason: str | None = None) -> Event:
    event: Event = {"type": "call.status_changed", "callSid": call_sid, "status": status}
    if reason:
        event["reason"] = reason
    return event


def transcript_delta(call_sid: str, item_id: str, role: str, delta: str) -> Event:
    return {"type": "transcript.delta", "callSid": call_sid, "itemId": item_id, "role": role, "delta": delta}


def transcript_done(call_sid: str, item_id: str, role: str, text: str, *, failed: bool = False) -> Event:
    """A finished turn's text. ``failed``: the caller's speech could not be transcribed (the
    text is empty, the turn still happened)."""
    event = {"type": "transcript.done", "callSid": call_sid, "itemId": item_id, "role": role, "text": text}
    if failed:
        event["failed"] = True
    return event


def function_call(call_sid: str, name: str, arguments: str, output: str) -> Event:
    return {"type": "function_call", "callSid": call_sid, "name": name, "arguments": arguments, "output": output}


class Subscription:
    """One subscriber: the bus hands each event to its ``sink``, which must not block (a
    frontend client puts it in its own bounded queue, and is disconnected when that is full)."""

    def __init__(self, bus: EventBus, call_sid: str | None, sink: Callable[[Event], None]) -> None:
        self._bus = bus
        self.call_sid = call_sid
        self.offer = sink

    def close(self) -> None:
        self._bus._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """``rank`` orders statuses (calls/status.py): a status ranked below the call's current one
    is late (another instance, a slow write) and is not delivered, since statuses never go back."""

    def __init__(self, rank: Callable[[str], int]) -> None:
        self._rank = rank
        self._by_call: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._status: dict[str, Event] = {}
        # Sends events published here to the other instances (bridge/fanout.py), if any.
        self.forward: Callable[[Event], None] | None = None

    def publish(self, event: Event, *, remote: bool = False) -> None:
        """Deliver to this instance's subscribers; events that arose here (not ``remote``)
        also go to the other instances."""
        if not remote and self.forward is not None:
            self.forward(event)
        call_sid = event["callSid"]
        if event["type"] == "call.status_changed":
            current = self._status.get(call_sid)
            if current is not None and self._rank(event["status"]) < self._rank(current["status"]):
                return  # late: statuses never go back
            self._status[call_sid] = event
            # The latest status of recent calls is kept for late subscribers, bounded by a cap.
            if len(self._status) > 10_000:
                for sid in list(self._status)[:1000]:
                    self._status.pop(sid, None)
        # A snapshot: a subscriber may close itself on the event it is given (its call's end).
        for sub in list(self._subscribers(call_sid)):
            sub.offer(event)

    def _subscribers(self, call_sid: str) -> Iterator[Subscription]:
        yield from self._by_call.get(call_sid, ())
        yield from self._all

    def subscribe(self, call_sid: str | None, sink: Callable[[Event], None], *,
                  with_status: bool = True) -> Subscription:
        """Events of one call (or, with None, of every call) from now on, handed to ``sink``,
        starting with the call's current status when it has one (unless ``with_status`` is
        False)."""
        sub = Subscription(self, call_sid, sink)
        if call_sid is None:
            self._all.add(sub)
        else:
            self._by_call.setdefault(call_sid, set()).add(sub)
            if with_status and call_sid in self._status:
                sub.offer(self._status[call_sid])
        return sub

    def current_status(self, call_sid: str) -> Event | None:
        return self._status.get(call_sid)

    def followed_statuses(self) -> list[Event]:
        """The current status of each call someone here follows (every known call, when someone
        follows them all)."""
        if self._all:
            return list(self._status.values())
        return [self._status[sid] for sid in self._by_call if sid in self._status]

    def _remove(self, sub: Subscription) -> None:
        if sub.call_sid is None:
            self._all.discard(sub)
            return
        subs = self._by_call.get(sub.call_sid)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_call[sub.call_sid]

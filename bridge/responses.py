"""When the bridge may ask the model for a response, and what a finished response means.

The Realtime API lets one response write to the conversation at a time: a ``response.create``
sent while another is active is refused (``conversation_already_has_active_response``). The
bridge asks for responses of its own (the greeting, the answer to a tool's output, to a
keypress, the wrap-up, a retry) while server VAD starts others by itself whenever the caller
finishes a turn. ``Asker`` keeps those apart: it sends an ask at once when nothing is active,
otherwise holds it until the active response is done, and asks again after a refusal.

An ask that comes with a conversation item (the tool output, the keypress, the wrap-up note)
is answered by the first response created after the server added that item, whoever started
it: such a response sees the item. An ask without an item is answered by the next response.
While the caller is speaking nothing is asked for: the response server VAD starts at the end
of the turn answers it. An ask that MAX_SENDS response.creates have not answered is dropped,
so a server that never confirms an item cannot make the bridge ask in a loop.

Pure state, no I/O: the call sends the ``response.create`` events it is handed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

ASK_PREFIX = "cg_ask_"  # the event_id of our response.create, echoed in an error about it
ITEM_PREFIX = "cg_item_"  # the ids of the conversation items we add
ITEM_EVENT_PREFIX = "cg_evt_"  # the event_id of our conversation.item.create: "cg_evt_" + item id
MAX_SENDS = 3  # response.creates for one ask (refusals and cut-in responses included)


@dataclass(frozen=True)
class Outcome:
    """A ``response.done``, read: ``status`` completed, cancelled, failed or incomplete;
    ``reason`` for cancelled/incomplete (turn_detected, client_cancelled, max_output_tokens,
    content_filter); ``error_type``/``error_code`` for failed."""

    response_id: str
    status: str
    reason: str | None = None
    error_type: str | None = None
    error_code: str | None = None

    @classmethod
    def of(cls, event: dict[str, Any]) -> Outcome:
        response = event.get("response") or {}
        details = response.get("status_details") or {}
        error = details.get("error") or {}
        return cls(str(response.get("id", "")), str(response.get("status") or "completed"),
                   details.get("reason"), error.get("type"), error.get("code"))

    @property
    def failed(self) -> bool:
        return self.status == "failed"


class Asker:
    """At most one ask outstanding; later asks merge into it (one response answers them all).

    Our conversation items are numbered (``new_item_id``): the server adds them in the order
    sent, so once it confirms (or refuses) item N, every item before N is settled too."""

    def __init__(self) -> None:
        self.active: str | None = None      # id of the response being produced, if any
        self._in_flight: str | None = None  # event_id of our response.create not yet answered
        self._pending = False               # a response is owed to us
        self._awaiting = 0                  # ...created after our item of this number was added
        self._settled = 0                   # our items up to this number are added (or refused)
        self._items = 0                     # our items numbered so far
        self._held = False                  # a retry waits out its back-off
        self._caller_speaking = False       # between speech_started and the turn's end
        self._sends = 0                     # response.creates sent for the current ask
        self.dropped = 0                    # asks given up after MAX_SENDS
        self._ids = itertools.count(1)

    @property
    def pending(self) -> bool:
        return self._pending

    def new_item_id(self) -> str:
        """The id for our next conversation item (the API accepts ids chosen by the client)."""
        self._items += 1
        return f"{ITEM_PREFIX}{self._items}"

    def ask(self, item_id: str | None = None) -> str | None:
        """We want a response (after ``item_id``, when given, has been added). Returns the
        event_id of a ``response.create`` to send now, or None when it must wait."""
        if not self._pending:
            self._pending, self._sends = True, 0
        self._awaiting = max(self._awaiting, _number(item_id))
        return self._send_if_free()

    def item_settled(self, item_id: str) -> None:
        """The server added one of our items, or refused it (then it never will be added)."""
        self._settled = max(self._settled, _number(item_id))

    def created(self, response_id: str) -> bool:
        """A response started. True when it answers our ask."""
        self.active = response_id
        self._in_flight = None
        if self._pending and self._awaiting <= self._settled:
            self._pending = False
            return True
        return False

    def caller_speaking(self, speaking: bool) -> None:
        """Hold asks while the caller speaks (``input_audio_buffer.speech_started`` until the
        turn is committed): the response to the turn comes by itself, and answers them."""
        self._caller_speaking = speaking

    def done(self, response_id: str) -> str | None:
        """A response finished; returns the event_id of an ask to send now, if one waits."""
        if response_id == self.active:
            self.active = None
        return self._send_if_free()

    def refused(self, event_id: str | None) -> None:
        """Our ``response.create`` was refused because another response is active: the ask
        stays and goes out once that one is done. (The server sent that response's
        ``response.created`` before this refusal, so its ``response.done`` is still to come;
        if it never comes, the call's watchdog notices the model has stopped answering.)"""
        if event_id is not None and event_id == self._in_flight:
            self._in_flight = None

    def retry_later(self) -> None:
        """A response failed: one is owed again, but not before ``release()`` (the back-off).
        Call it before ``done()`` for that response, so an ask waiting for it waits too."""
        if not self._pending:
            self._pending, self._sends = True, 0
        self._held = True

    def release(self) -> str | None:
        """The back-off is over: returns the event_id of an ask to send now, if one waits.
        (A response the caller's speech started meanwhile has answered it already.)"""
        self._held = False
        return self._send_if_free()

    def cancel(self) -> None:
        """Forget the ask (the call is ending, or the ask went unanswered too often)."""
        self._pending = False

    def _send_if_free(self) -> str | None:
        if (not self._pending or self._held or self._caller_speaking or self.active is not None
                or self._in_flight is not None):
            return None
        if self._sends >= MAX_SENDS:
            self.dropped += 1
            self.cancel()
            return None
        self._sends += 1
        self._in_flight = f"{ASK_PREFIX}{next(self._ids)}"
        return self._in_flight


def _number(item_id: str | None) -> int:
    """The number of one of our item ids; 0 for None or an id that is not ours."""
    if item_id is None or not item_id.startswith(ITEM_PREFIX):
        return 0
    try:
        return int(item_id[len(ITEM_PREFIX):])
    except ValueError:
        return 0

"""What the caller has heard of the model's audio, from the marks Twilio echoes. Pure state.

Twilio echoes a named ``mark`` once all audio sent before it has played, so the bytes sent
before each mark, per model item, tell exactly how much of the item the caller heard when
they barged in. A mark is sent once at least ``MARK_EVERY_BYTES`` of audio have gone out
since the last one (and whenever the item changes, and at the end of each response's audio):
one mark per 20 ms chunk would double the frames on Twilio's socket both ways — a third of
the relay's work on a 20 ms delta stream — for a truncation point finer than anyone hears.
The truncation point therefore errs short by at most ``MARK_EVERY_BYTES`` (100 ms): the model
believes the caller heard a little less than they did, never more.
"""

from __future__ import annotations

import asyncio
import collections

from bridge import mulaw

MARK_EVERY_BYTES = 100 * mulaw.BYTES_PER_MS


class Playout:
    __slots__ = ("outstanding", "played", "produced", "interrupted", "played_out",
                 "_seq", "_item", "_content", "_unmarked")

    def __init__(self) -> None:
        self.outstanding: dict[str, tuple[str, int, int]] = {}  # mark → (item, content, bytes)
        self.played: collections.Counter = collections.Counter()    # item → bytes heard
        self.produced: collections.Counter = collections.Counter()  # item → bytes sent
        self.interrupted: set[str] = set()  # items cut by barge-in: their late deltas are dropped
        self.played_out = asyncio.Event()   # set: everything sent has been heard
        self.played_out.set()
        self._seq = 0
        self._item: str | None = None  # the item of the audio sent since the last mark
        self._content = 0
        self._unmarked = 0             # ...and its bytes

    @property
    def playing(self) -> bool:
        return not self.played_out.is_set()

    def sent(self, item_id: str, content_index: int, nbytes: int) -> str | None:
        """``nbytes`` of ``item_id`` went to Twilio (after ``flush(item_id)``, so the audio
        since the last mark is all of this item); returns the name of a mark to send after
        them, or None while too little audio has gone out since the last one."""
        self.produced[item_id] += nbytes
        self._item, self._content = item_id, content_index
        self._unmarked += nbytes
        self.played_out.clear()
        return self.flush() if self._unmarked >= MARK_EVERY_BYTES else None

    def flush(self, item_id: str | None = None) -> str | None:
        """The name of a mark for the audio sent since the last one, if any (call it before
        audio of another item, and when a response's audio ends). With ``item_id``, only when
        that audio is of another item."""
        if not self._unmarked or (item_id is not None and item_id == self._item):
            return None
        self._seq += 1
        name = f"{self._item}.{self._seq}"
        self.outstanding[name] = (self._item, self._content, self._unmarked)
        self._unmarked = 0
        return name

    def heard(self, name: str) -> None:
        """Twilio echoed ``name``: the audio before it has played."""
        entry = self.outstanding.pop(name, None)
        if entry is None:
            return  # echoed for audio we cleared, or not ours
        item_id, _, nbytes = entry
        self.played[item_id] += nbytes
        if not self.outstanding and not self._unmarked:
            self.played_out.set()

    def interrupt(self) -> tuple[str, int, int] | None:
        """The caller barged in: (item, content index, ms heard) of what was playing, or None
        when nothing was. Everything outstanding is forgotten; the item's later deltas are dropped."""
        if not self.playing:
            return None
        if self.outstanding:
            item_id, content_index, _ = next(iter(self.outstanding.values()))
        else:
            item_id, content_index = self._item, self._content
        heard_ms = min(self.played[item_id], self.produced[item_id]) // mulaw.BYTES_PER_MS
        self.outstanding.clear()
        self._unmarked = 0
        self.interrupted.add(item_id)
        self.played_out.set()
        return item_id, content_index, heard_ms

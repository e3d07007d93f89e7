"""bridge/playout.py: marks every ~100 ms of audio, what the caller heard, barge-in."""

from __future__ import annotations

from bridge.playout import MARK_EVERY_BYTES, Playout

CHUNK = 160  # a 20 ms delta


def test_a_mark_per_hundred_ms_of_audio_not_per_chunk():
    p = Playout()
    marks = [p.sent("item_1", 0, CHUNK) for _ in range(50)]  # one second of 20 ms deltas
    named = [m for m in marks if m is not None]
    assert len(named) == 50 * CHUNK // MARK_EVERY_BYTES == 10
    assert marks[:4] == [None] * 4 and marks[4] is not None
    assert p.playing
    for name in named:
        p.heard(name)
    assert p.played["item_1"] == 50 * CHUNK
    assert not p.playing  # everything sent was heard


def test_the_tail_of_a_response_gets_its_mark_and_is_waited_for():
    p = Playout()
    assert p.sent("item_1", 0, CHUNK) is None
    assert p.playing  # unmarked audio is still audio the caller has not heard
    tail = p.flush()
    assert tail is not None and p.flush() is None
    p.heard(tail)
    assert not p.playing and p.played["item_1"] == CHUNK


def test_a_new_item_closes_the_previous_items_mark():
    p = Playout()
    p.sent("item_1", 0, CHUNK)
    assert p.flush("item_1") is None  # same item: nothing to close
    tail = p.flush("item_2")
    assert tail is not None and p.outstanding[tail] == ("item_1", 0, CHUNK)
    p.sent("item_2", 0, CHUNK)
    p.heard(tail)
    assert p.played == {"item_1": CHUNK} and p.playing


def test_barge_in_truncates_at_what_was_heard():
    p = Playout()
    names = [n for n in (p.sent("item_1", 0, CHUNK) for _ in range(12)) if n]
    p.heard(names[0])  # 100 ms heard; 140 ms more sent, 40 ms of it not yet marked
    assert p.interrupt() == ("item_1", 0, 100)
    assert not p.playing and "item_1" in p.interrupted
    p.heard(names[1])  # Twilio echoes the cleared audio's mark: ignored
    assert p.played["item_1"] == MARK_EVERY_BYTES
    assert p.interrupt() is None  # nothing playing: the caller is just speaking


def test_barge_in_before_any_mark_is_at_zero():
    p = Playout()
    p.sent("item_1", 0, CHUNK)
    assert p.interrupt() == ("item_1", 0, 0)

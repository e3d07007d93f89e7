"""bridge/twilio.py, pure: Twilio Media Streams frames in and out, tested with plain dicts."""

from __future__ import annotations

import base64

import orjson
import pytest

from bridge import twilio


def frame(**message) -> str:
    return orjson.dumps(message).decode()


def test_start_is_parsed_and_what_the_relay_ignores_cannot_refuse_it():
    """Twilio's start becomes a typed Start; fields the relay never reads (mediaFormat, tracks)
    are not parsed, so odd values there refuse nothing."""
    event = twilio.parse(frame(event="start", sequenceNumber="1", streamSid="MZ1", start={
        "streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound"],
        "customParameters": {"token": "t", "scenarioId": "job-interview"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": "1"}}))
    assert event == twilio.Start("MZ1", "CA1", "AC1", {"token": "t", "scenarioId": "job-interview"})
    odd = twilio.parse(frame(event="start", start={"streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1",
                                                   "mediaFormat": {"sampleRate": "eight thousand"}, "tracks": 5}))
    assert odd == twilio.Start("MZ1", "CA1", "AC1", {})


def test_media_mark_dtmf_stop_are_parsed():
    """media, mark, dtmf and stop become typed events; the payload passes through untouched."""
    payload = base64.b64encode(b"\xff" * 160).decode()
    assert twilio.parse(frame(event="media", media={"track": "inbound", "chunk": "3", "timestamp": "60",
                                                    "payload": payload})) == twilio.Media(payload)
    assert twilio.parse(frame(event="mark", mark={"name": "item_1.4"})) == twilio.Mark("item_1.4")
    assert twilio.parse(frame(event="dtmf", dtmf={"track": "inbound_track", "digit": "5"})) == twilio.Dtmf("5")
    assert twilio.parse(frame(event="stop", stop={"callSid": "CA1"})) == twilio.Stop()
    assert twilio.parse(frame(event="something-new")) is None


@pytest.mark.parametrize("bad", [
    "not json", "[1]", frame(no_event=1), frame(event="media"),
    frame(event="media", media={"payload": 5}),
    frame(event="mark", mark={}), frame(event="start", start={"callSid": "CA1"}),
])
def test_malformed_frames_raise_protocol_error(bad):
    """Malformed frames raise ProtocolError with a reason, never anything else."""
    with pytest.raises(twilio.ProtocolError):
        twilio.parse(bad)


def test_outbound_frames_are_valid_json_text():
    """media, mark and clear frames we build are the JSON Twilio documents."""
    assert orjson.loads(twilio.media("MZ1", "AAA=")) == {"event": "media", "streamSid": "MZ1", "media": {"payload": "AAA="}}
    assert orjson.loads(twilio.mark("MZ1", "item_1.2")) == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "item_1.2"}}
    assert orjson.loads(twilio.clear("MZ1")) == {"event": "clear", "streamSid": "MZ1"}


def test_safe_ids_refuse_anything_needing_escapes():
    """Only plain ids go into hand-built frames."""
    assert twilio.safe_id("MZ0123abc") and twilio.safe_id("item_AbC-1")
    assert not any(twilio.safe_id(s) for s in ('a"b', "a\\b", "", "é", "a b"))

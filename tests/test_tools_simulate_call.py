"""The simulated Twilio call, against a minimal in-test Callgate on a real socket.

The minimal Callgate answers the webhook with a Connect/Stream TwiML, checks
signatures with twilio's RequestValidator, and follows a small script on the stream:
the caller's first media frame gets a 200 ms reply and a mark; DTMF keys trigger the
rest (1: a 1 s reply and a mark, 2: clear, 3: protocol violations, 4: a lone mark).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from twilio.request_validator import RequestValidator

from tools.simulate_call import (
    DEFAULT_AUDIO,
    FRAME_BYTES,
    SimulatedCall,
    load_audio,
    mulaw_to_linear,
    parse_twiml,
    silence,
    tone,
)

TOKEN = "peer-auth-token"
PUBLIC_URL = "https://callgate.example"  # does not resolve: only signatures use it
STREAM_URL = "wss://callgate.example/call"
PARAMETERS = {"token": "call-token-1", "scenario": "demo"}
SPEED = 10.0  # every clock runs ten times faster: 20 ms frames every 2 ms
REPLY_BYTES = 1600  # 200 ms
LONG_REPLY_BYTES = 8000  # 1 s


class MiniCallgate:
    """Just enough of Callgate to exercise the simulator; records what it receives."""

    def __init__(self) -> None:
        self.validator = RequestValidator(TOKEN)
        self.webhooks: list[tuple[bool, dict[str, str]]] = []  # (signature ok, form)
        self.handshake_ok: bool | None = None
        self.received: list[tuple[float, dict[str, Any]]] = []  # (loop time, message)
        self.sent_at: dict[str, float] = {}  # mark or clear name -> loop time sent
        self.close_code: int | None = None
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> MiniCallgate:
        app = web.Application()
        app.router.add_post("/twiml", self.twiml)
        app.router.add_get("/call", self.call)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        await self.runner.cleanup()

    def messages(self, event: str) -> list[dict[str, Any]]:
        return [message for _, message in self.received if message.get("event") == event]

    async def wait_for(self, predicate, timeout: float = 2) -> None:
        async with self.changed:
            async with asyncio.timeout(timeout):
                await self.changed.wait_for(predicate)

    async def twiml(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        signature = request.headers.get("X-Twilio-Signature")
        ok = signature is not None and self.validator.validate(PUBLIC_URL + "/twiml", form,
                                                               signature)
        self.webhooks.append((ok, form))
        if not ok:
            return web.Response(status=403)
        parameters = "".join(f'<Parameter name="{k}" value="{v}"/>' for k, v in PARAMETERS.items())
        return web.Response(content_type="text/xml", text=(
            '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
            f'<Stream url="{STREAM_URL}">{parameters}</Stream></Connect></Response>'))

    async def call(self, request: web.Request) -> web.WebSocketResponse:
        signature = request.headers.get("X-Twilio-Signature", "")
        self.handshake_ok = self.validator.validate(STREAM_URL, {}, signature)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        stream_sid = None
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            async with self.changed:
                self.received.append((asyncio.get_running_loop().time(), message))
                self.changed.notify_all()
            event = message["event"]
            if event == "start":
                stream_sid = message["streamSid"]
                if message["start"]["customParameters"].get("token") != PARAMETERS["token"]:
                    await ws.close(code=1008, message=b"bad token")
            elif event == "media" and len(self.messages("media")) == 1:
                await self.reply(ws, stream_sid, REPLY_BYTES, "reply-1")
            elif event == "dtmf":
                await self.on_key(ws, stream_sid, message["dtmf"]["digit"])
        self.close_code = ws.close_code
        async with self.changed:
            self.changed.notify_all()
        return ws

    async def reply(self, ws, stream_sid: str, nbytes: int, mark: str) -> None:
        """Send ``nbytes`` of tone in two media messages, then a mark."""
        audio = tone(nbytes // 8, freq=300)
        for half in (audio[: nbytes // 2], audio[nbytes // 2:]):
            await ws.send_str(json.dumps({"event": "media", "streamSid": stream_sid, "media": {
                "payload": base64.b64encode(half).decode()}}))
        await self.send_mark(ws, stream_sid, mark)

    async def send_mark(self, ws, stream_sid: str, name: str) -> None:
        self.sent_at[name] = asyncio.get_running_loop().time()
        await ws.send_str(json.dumps({"event": "mark", "streamSid": stream_sid,
                                      "mark": {"name": name}}))

    async def on_key(self, ws, stream_sid: str, digit: str) -> None:
        if digit == "1":
            await self.reply(ws, stream_sid, LONG_REPLY_BYTES, "reply-2")
        elif digit == "2":
            self.sent_at["clear"] = asyncio.get_running_loop().time()
            await ws.send_str(json.dumps({"event": "clear", "streamSid": stream_sid}))
        elif digit == "3":
            await ws.send_bytes(b"\x00\x01")
            await ws.send_str("not json")
            await ws.send_str(json.dumps({"event": "clear"}))
            await ws.send_str(json.dumps({"event": "clear", "streamSid": "MZwrong"}))
            await ws.send_str(json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {}}))
            await ws.send_str(json.dumps({"event": "dance", "streamSid": stream_sid}))
            await self.send_mark(ws, stream_sid, "after-violations")
        elif digit == "4":
            await self.send_mark(ws, stream_sid, "lone")


@pytest.fixture
async def peer():
    peer = await MiniCallgate().start()
    try:
        yield peer
    finally:
        await peer.close()


@pytest.fixture
async def call(peer: MiniCallgate):
    async with SimulatedCall(peer.url, public_url=PUBLIC_URL, auth_token=TOKEN,
                             audio=tone(100), speed=SPEED, tail_silence_ms=100) as call:
        yield call


async def connected(call: SimulatedCall, peer: MiniCallgate) -> SimulatedCall:
    """The call after webhook, connect, and the peer's receipt of start."""
    await call.webhook()
    await call.connect()
    await peer.wait_for(lambda: peer.messages("start"))
    return call


# -- webhook ---------------------------------------------------------------------------


async def test_webhook_is_signed_over_the_public_url(call, peer):
    """The webhook form validates against PUBLIC_URL and carries Twilio's fields."""
    result = await call.webhook()
    assert result.status == 200
    ok, form = peer.webhooks[0]
    assert ok
    assert form == {"CallSid": call.call_sid, "AccountSid": call.account_sid,
                    "From": call.from_, "To": call.to, "Caller": call.from_, "Called": call.to,
                    "Direction": "inbound", "CallStatus": "ringing", "ApiVersion": "2010-04-01"}


async def test_webhook_twiml_is_parsed(call):
    """The stream URL and its Parameters come out of the TwiML."""
    result = await call.webhook()
    assert result.stream_url == STREAM_URL
    assert result.parameters == PARAMETERS
    assert (result.verbs, result.verbs_after_connect, result.say) == (["Connect"], [], None)


@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_webhook_without_a_valid_signature_is_refused(peer, token):
    """No signature, or one made with another token, fails validation."""
    async with SimulatedCall(peer.url, public_url=PUBLIC_URL, auth_token=token) as call:
        result = await call.webhook()
    assert result.status == 403
    assert result.stream_url is None
    assert peer.webhooks[0][0] is False


async def test_outbound_webhook_is_in_progress(peer):
    """An API-placed call reports Direction outbound-api and CallStatus in-progress."""
    async with SimulatedCall(peer.url, public_url=PUBLIC_URL, auth_token=TOKEN,
                             direction="outbound-api",
                             extra_params={"CallerCountry": "US"}) as call:
        await call.webhook()
    ok, form = peer.webhooks[0]
    assert ok
    assert (form["Direction"], form["CallStatus"], form["CallerCountry"]) == (
        "outbound-api", "in-progress", "US")


def test_parse_twiml_reads_say_and_hangup():
    """A denial's Say text and Hangup are read; there is no stream."""
    result = parse_twiml(200, "<Response><Say>Try again at 3 pm.</Say><Hangup/></Response>")
    assert (result.say, result.hangup, result.stream_url) == ("Try again at 3 pm.", True, None)


def test_parse_twiml_lists_verbs_after_connect():
    """A verb after </Connect> is reported."""
    result = parse_twiml(200, '<Response><Connect><Stream url="wss://x/call"/></Connect>'
                              "<Say>bye</Say></Response>")
    assert result.verbs_after_connect == ["Say"]


def test_parse_twiml_tolerates_a_non_xml_body():
    """A body that is not XML leaves the verbs empty and says why."""
    result = parse_twiml(500, "Internal Server Error")
    assert result.verbs == [] and result.parse_error


# -- stream start ----------------------------------------------------------------------


async def test_handshake_is_signed_over_the_stream_url(call, peer):
    """The upgrade request validates against the TwiML's wss:// URL with no params."""
    await connected(call, peer)
    assert peer.handshake_ok is True
    assert call.errors == []


async def test_connected_then_start_with_custom_parameters(call, peer):
    """connected comes first; start carries the TwiML Parameters and the call's SIDs."""
    await connected(call, peer)
    connected_msg, start = (message for _, message in peer.received[:2])
    assert connected_msg == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["sequenceNumber"] == "1"
    assert start["streamSid"] == call.stream_sid == start["start"]["streamSid"]
    assert start["start"] == {
        "streamSid": call.stream_sid, "accountSid": call.account_sid,
        "callSid": call.call_sid, "tracks": ["inbound"], "customParameters": PARAMETERS,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }


async def test_a_forged_start_is_closed_with_the_servers_code(call, peer):
    """Overridden callSid and customParameters reach the server; its 1008 is recorded."""
    await call.webhook()
    await call.connect(parameters={"token": "forged"}, start_call_sid="CA" + "0" * 32)
    assert await call.wait_closed(timeout=2) == 1008
    assert call.closed_reason == "bad token"
    start = peer.messages("start")[0]["start"]
    assert (start["callSid"], start["customParameters"]) == ("CA" + "0" * 32, {"token": "forged"})


async def test_connect_without_start(call, peer):
    """send_start=False sends only connected."""
    await call.webhook()
    await call.connect(send_start=False)
    await peer.wait_for(lambda: peer.received)
    await call.stop()
    assert [message["event"] for _, message in peer.received] == ["connected", "stop"]


# -- caller audio ----------------------------------------------------------------------


async def test_media_frames_are_160_bytes_on_a_20_ms_clock(call, peer):
    """play() sends 160-byte frames, timestamps 20 ms apart, paced by the media clock."""
    loop = asyncio.get_running_loop()
    began = loop.time()  # before start: the media clock's zero is later still
    await connected(call, peer)
    sent = await call.play()  # 100 ms of tone, 100 ms of tail silence
    took = loop.time() - began
    await peer.wait_for(lambda: len(peer.messages("media")) == 10)

    media = peer.messages("media")
    payloads = [base64.b64decode(m["media"]["payload"]) for m in media]
    assert sent == call.sent_bytes == 10 * FRAME_BYTES
    assert all(len(p) == FRAME_BYTES for p in payloads)
    assert b"".join(payloads[:5]) == tone(100) and b"".join(payloads[5:]) == silence(100)
    # The media clock started with start: frames follow it in 20 ms steps from there.
    first = int(media[0]["media"]["timestamp"])
    assert first % 20 == 0
    assert [m["media"]["timestamp"] for m in media] == [str(first + 20 * i) for i in range(10)]
    assert [m["media"]["chunk"] for m in media] == [str(i) for i in range(1, 11)]
    assert [m["sequenceNumber"] for m in media] == [str(i) for i in range(2, 12)]
    assert {m["media"]["track"] for m in media} == {"inbound"}
    assert 0.2 / SPEED <= took < 0.2 / SPEED + 0.1


async def test_play_stops_at_max_ms(call, peer):
    """max_ms cuts the audio short, like a caller hanging up mid-sentence."""
    await connected(call, peer)
    assert await call.play(max_ms=60) == 3 * FRAME_BYTES


async def test_dtmf_is_sent_on_the_inbound_track(call, peer):
    """send_dtmf sends Twilio's dtmf event."""
    await connected(call, peer)
    await call.send_dtmf("4")
    await peer.wait_for(lambda: peer.messages("dtmf"))
    dtmf = peer.messages("dtmf")[0]
    assert (dtmf["dtmf"], dtmf["streamSid"]) == ({"track": "inbound_track", "digit": "4"},
                                                 call.stream_sid)


# -- server audio, marks, clear --------------------------------------------------------


async def test_mark_is_echoed_only_after_its_audio_played(call, peer):
    """The mark comes back once the 200 ms before it have played, not sooner."""
    await connected(call, peer)
    await call.play(tone(20), tail_silence_ms=0)
    assert await call.wait_for_mark(1) == [("reply-1", REPLY_BYTES)]
    await peer.wait_for(lambda: peer.messages("mark"))

    echoed_at, echo = next((t, m) for t, m in peer.received if m["event"] == "mark")
    assert echo["mark"] == {"name": "reply-1"} and echo["streamSid"] == call.stream_sid
    assert echoed_at - peer.sent_at["reply-1"] >= 0.9 * REPLY_BYTES / 8000 / SPEED
    assert bytes(call.received_audio) == tone(REPLY_BYTES // 8, freq=300)
    assert call.played_bytes == REPLY_BYTES


async def test_mark_with_nothing_buffered_is_echoed_at_once(call, peer):
    """A mark with no audio before it comes straight back."""
    await connected(call, peer)
    await call.send_dtmf("4")
    assert await call.wait_for_mark(1, timeout=1) == [("lone", 0)]


async def test_clear_echoes_pending_marks_at_once(call, peer):
    """clear drops unplayed audio and echoes the pending mark immediately."""
    await connected(call, peer)
    await call.send_dtmf("1")  # 1 s of audio, 100 ms at this speed, then mark reply-2
    await call.wait_for_audio(LONG_REPLY_BYTES)
    await call.wait_for_played(FRAME_BYTES)
    await call.send_dtmf("2")

    [(name, played_at_echo)] = await call.wait_for_mark(1)
    await peer.wait_for(lambda: peer.messages("mark"))
    echoed_at = next(t for t, m in peer.received if m["event"] == "mark")
    assert name == "reply-2"
    assert call.clears == 1
    assert FRAME_BYTES <= played_at_echo < LONG_REPLY_BYTES
    assert call.played_bytes == played_at_echo < len(call.received_audio)
    remaining_s = (LONG_REPLY_BYTES - played_at_echo) / 8000 / SPEED
    assert echoed_at - peer.sent_at["clear"] < remaining_s


async def test_protocol_violations_are_recorded(call, peer):
    """Binary frames, non-JSON, missing or wrong streamSid, nameless marks and unknown
    events are each recorded and otherwise ignored."""
    await connected(call, peer)
    await call.send_dtmf("3")
    assert await call.wait_for_mark(1) == [("after-violations", 0)]
    assert len(call.errors) == 6
    for error, expected in zip(call.errors, ["31950", "not JSON", "without streamSid",
                                             "MZwrong", "31951", "'dance'"]):
        assert expected in error
    assert call.clears == 0


# -- ending ----------------------------------------------------------------------------


async def test_stop_sends_stop_then_closes_normally(call, peer):
    """stop() sends Twilio's stop and closes with 1000."""
    await connected(call, peer)
    await call.stop()
    await peer.wait_for(lambda: peer.close_code is not None)
    [stop] = peer.messages("stop")
    assert stop["stop"] == {"accountSid": call.account_sid, "callSid": call.call_sid}
    assert stop["streamSid"] == call.stream_sid
    assert peer.close_code == 1000 and call.closed_code == 1000 and call.closed


async def test_drop_sends_neither_stop_nor_close_frame(call, peer):
    """drop() aborts TCP: the server sees no stop and an abnormal closure."""
    await connected(call, peer)
    await call.drop()
    await peer.wait_for(lambda: peer.close_code is not None)
    assert peer.messages("stop") == []
    assert peer.close_code == 1006 and call.closed_code == 1006


async def test_run_reports_the_whole_call(peer):
    """run() streams, gets the reply played and its mark echoed, and ends normally."""
    async with SimulatedCall(peer.url, public_url=PUBLIC_URL, auth_token=TOKEN,
                             audio=tone(100), speed=SPEED, tail_silence_ms=1000) as call:
        report = await call.run()
    assert report.twiml.stream_url == STREAM_URL
    assert report.bytes_sent == 800 + 8000
    assert report.bytes_received == report.bytes_played == REPLY_BYTES
    assert report.marks_echoed == [("reply-1", REPLY_BYTES)]
    assert (report.clears, report.close_code, report.errors) == (0, 1000, [])
    assert "marks echoed 1" in report.format()


# -- audio helpers ---------------------------------------------------------------------


def test_tone_is_loud_and_silence_is_quiet():
    """tone() gives 8 bytes per ms with real energy; silence() gives 0xFF."""
    audio = tone(20)
    assert len(audio) == 160
    assert max(abs(mulaw_to_linear(b)) for b in audio) > 10000
    assert silence(20) == b"\xff" * 160


def test_committed_recording_is_short_mulaw():
    """hello.ulaw holds 2 to 3 seconds and stays under 40 KB."""
    audio = load_audio(DEFAULT_AUDIO)
    assert 2 * 8000 <= len(audio) <= 3 * 8000 and len(audio) < 40_000

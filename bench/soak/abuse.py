"""Floods and forged input, as an attacker would send them: idle stream sockets on a captured
signature, a storm of upgrades, a made-up Fly-Client-IP, admin-token guessing, toll-fraud and
injection numbers, media far faster than a phone line. What must hold: calls still get
through, nothing is placed or charged, every refusal is precise and cheap.
"""

from __future__ import annotations

import asyncio

import aiohttp
import websockets
from twilio.request_validator import RequestValidator

from bench.soak.calls import follower
from bench.soak.stage import ADMIN_TOKEN, AUTH_TOKEN, PUBLIC_URL, Frontend, Outcome, Server, now, number, stage
from handlers.twilio import MAX_STARTING_PER_ADDRESS, START_TIMEOUT_S
from lifecycle import ADMIN_GUESSES_PER_MIN, HANDSHAKE_BURST, HANDSHAKES_PER_S
from tools.fake_realtime import FakeRealtime
from tools.simulate_call import quiet

ATTACKER = "203.0.113.66"
# call.start numbers that must never be dialled: premium rate, satellite and international
# networks, emergency and short codes, numbers outside ALLOWED_REGIONS, and garbage.
FRAUD_NUMBERS = [
    "+19005550100", "+19765550100", "+881612345678", "+882345678901", "+883510012345",
    "+870772123456", "911", "112", "999", "+1911", "*67+14155550100", "+14155550100;ext=9001",
    "+14155550100\n+19005550100", "+1 (900) 555-0100", "+447700900123", "+4930123456",
    "+8613800138000", "+2348030000000", "+252612345678", "+53512345678", "00441234567890",
    "+1415555010O", "+1" + "4" * 40, "", "+", "tel:+19005550100", "<script>", "' OR 1=1 --",
    "+14155550100\u0000", "+1 415 555 0100 x12",
]


async def floods() -> Outcome:
    out = Outcome("floods")
    async with stage(model=FakeRealtime(reply_text="Hi.")) as s:
        server = await s.server()
        await _idle_streams(s, server, out)
        await _upgrade_storm(server, out)
        await _admin_guesses(s, server, out)
        await _fraud_numbers(s, server, out)
        await _media_flood(s, server, out)
        off_fly = await s.server(TRUST_FLY_CLIENT_IP="no")
        await _made_up_client_ip(off_fly, out)
        out.check(not s.log_errors(), f"no ERROR line or traceback in the logs {s.log_errors()[:3]}")
    return out


async def _idle_streams(s, server: Server, out: Outcome) -> None:
    """250 sockets on one captured /call signature, never sending start: a real call still gets
    its stream, and the idle ones are closed within START_TIMEOUT_S."""
    stream_url = f"{PUBLIC_URL.replace('https', 'wss')}/call"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(stream_url, {})
    headers = {"X-Twilio-Signature": signature, "Fly-Client-IP": ATTACKER}
    accepted, refused = [], 0
    for _ in range(250):
        try:
            ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/call", additional_headers=headers,
                                          open_timeout=5, proxy=None)
            accepted.append(ws)
        except websockets.InvalidStatus:
            refused += 1
    call = s.call(server, number(1))
    await call.webhook()
    began = now()
    await call.connect()
    await call.wait_for_audio(1, timeout=10)
    through = now() - began
    await call.stop()

    async def all_closed() -> bool:
        return all(ws.close_code is not None for ws in accepted)

    await s.until(all_closed, START_TIMEOUT_S + 3)
    still_open = sum(1 for ws in accepted if ws.close_code is None)
    for ws in accepted:
        await ws.close()
    out.figures["idle /call sockets on one signature"] = (f"{len(accepted)} accepted, {refused} refused (503); "
                                                          f"a real call got through in {through * 1000:.0f} ms")
    out.check(len(accepted) <= MAX_STARTING_PER_ADDRESS and still_open == 0,
              f"one address holds at most {MAX_STARTING_PER_ADDRESS} waiting sockets ({len(accepted)}), all closed "
              f"after {START_TIMEOUT_S:.0f} s ({still_open} open)")
    out.check(len(call.received_audio) > 0, "a real call got its stream and its greeting meanwhile")


async def _upgrade_storm(server: Server, out: Outcome, seconds: float = 5.0) -> None:
    """/logs upgrades from one address as fast as they go, for 5 s."""
    accepted = refused = capped = other = 0
    async with aiohttp.ClientSession() as http:
        deadline = now() + seconds
        began = now()

        async def one() -> None:
            nonlocal accepted, refused, capped, other
            while now() < deadline:
                try:
                    ws = await http.ws_connect(server.url + "/logs", headers={"Fly-Client-IP": "198.51.100.7"})
                    accepted += 1
                    await ws.close()
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status == 429:
                        refused += 1
                    elif exc.status == 403:
                        capped += 1  # the open-sockets cap per address (eight at once here, five allowed)
                    else:
                        other += 1

        await asyncio.gather(*(one() for _ in range(8)))
        took = now() - began
    allowed = HANDSHAKE_BURST + HANDSHAKES_PER_S * took
    out.figures["/logs upgrades from one address in 5 s"] = (f"{accepted} accepted, {refused} refused (429), "
                                                             f"{capped} over the open-sockets cap (403)")
    out.check(accepted <= allowed + 1 and refused > 0 and other == 0,
              f"upgrades limited per address ({accepted} ≤ {allowed:.0f}; {refused} × 429, {capped} × 403, "
              f"{other} other)")


async def _admin_guesses(s, server: Server, out: Outcome) -> None:
    """Thirty wrong admin tokens from one address, then the right one from it and from another."""
    client = await Frontend.open(server, address="198.51.100.8")
    codes = []
    for i in range(30):
        mark = len(client.received)
        await client.send({"type": "call.subscribe", "all": True, "adminToken": f"guess-{i}"})
        reply = await client.wait_for(lambda m: m["type"] == "error", after=mark)
        codes.append(reply["code"])
    mark = len(client.received)
    await client.send({"type": "call.subscribe", "all": True, "adminToken": ADMIN_TOKEN})
    right_after = await client.wait_for(lambda m: m["type"] == "error", after=mark, timeout=1)
    await client.close()
    elsewhere = await follower(s, server)  # another address: not locked out
    out.figures["admin-token guesses"] = (f"{codes.count('forbidden')} compared, {codes.count('slow_down')} "
                                          "refused uncompared")
    out.check(codes[:ADMIN_GUESSES_PER_MIN] == ["forbidden"] * ADMIN_GUESSES_PER_MIN
              and set(codes[ADMIN_GUESSES_PER_MIN:]) == {"slow_down"} and right_after["code"] == "slow_down",
              f"after {ADMIN_GUESSES_PER_MIN} wrong tokens an address is not even compared (then the right one "
              "is refused too)")
    out.check(not elsewhere.ws.closed, "another address still follows with the right token")


async def _fraud_numbers(s, server: Server, out: Outcome) -> None:
    before = len(s.placed())
    codes = []
    for raw in FRAUD_NUMBERS:
        client = await s.frontend(server)
        reply, _ = await client.place(raw)
        codes.append(reply.get("code") or reply["type"])
        await client.close()
        s.frontends.remove(client)
    placed = len(s.placed()) - before
    charged = await s.value("SELECT count(*) FROM limiter_charges WHERE charge_id LIKE 'RS%'")
    out.figures["toll-fraud and injection numbers"] = (f"{len(FRAUD_NUMBERS)} sent, {placed} placed; answers "
                                                       + ", ".join(sorted(set(codes))))
    out.check(placed == 0 and charged == 0 and all(c in ("invalid_number", "invalid_message") for c in codes),
              f"none placed or charged, each refused as invalid ({placed} placed, {charged} charged)")


async def _media_flood(s, server: Server, out: Outcome) -> None:
    """One stream sends 4000 media frames back to back (80 s of audio in a moment)."""
    flooder = s.call(server, number(2), speed=1000.0)  # its media clock: 50,000 frames a second
    neighbour = s.call(server, number(3))
    for call in (flooder, neighbour):
        await call.webhook()
        await call.connect()
        await call.wait_for_audio(1, timeout=10)
    before = await server.metric("callgate_stream_frames_rejected_total", reason="too_fast")
    await flooder.play(quiet(80_000, seed=5), tail_silence_ms=0)  # 4,000 frames

    async def counted() -> bool:
        return await server.metric("callgate_stream_frames_rejected_total", reason="too_fast") > before

    await s.until(counted, 5)
    rejected = await server.metric("callgate_stream_frames_rejected_total", reason="too_fast") - before
    alive = not flooder.closed and not neighbour.closed
    await flooder.stop()
    await neighbour.stop()
    out.figures["media flood (4000 frames at once)"] = f"{rejected:.0f} dropped as too fast; call kept"
    out.check(rejected > 0 and alive, "media faster than a phone line is dropped and counted; the calls go on")


async def _made_up_client_ip(server: Server, out: Outcome) -> None:
    """Not behind Fly: 20 /logs sockets each with a different made-up Fly-Client-IP."""
    accepted = 0
    sockets = []
    async with aiohttp.ClientSession() as http:
        for i in range(20):
            try:
                sockets.append(await http.ws_connect(server.url + "/logs", headers={"Fly-Client-IP": f"192.0.2.{i + 1}"}))
                accepted += 1
            except aiohttp.WSServerHandshakeError:
                pass
        for ws in sockets:
            await ws.close()
    cap = int(server.env.get("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "5"))
    out.figures["made-up Fly-Client-IP off Fly"] = f"{accepted} of 20 accepted (cap {cap} per address)"
    out.check(accepted <= cap, f"off Fly the header is ignored: the peer's cap applies ({accepted} ≤ {cap})")

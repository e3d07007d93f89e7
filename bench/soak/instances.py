"""Instances that stop: SIGTERM (a deploy: drain, then go) and SIGKILL (a crash or an
out-of-memory kill: nothing runs on the way out) and a restart. What must hold: browsers see
every call's end; a dead instance's calls are ended by another within ~20 s, their places under
the cap freed, their followers told; a restarted instance just works.
"""

from __future__ import annotations

import asyncio
import signal

from bench.soak.calls import _live_zero, follower
from bench.soak.stage import Outcome, Server, Stage, now, number, stage
from db.calls import DEAD_AFTER_S, HEARTBEAT_S
from tools.fake_realtime import FakeRealtime
from tools.simulate_call import SimulatedCall, quiet

DRAIN_S = 8.0
LONG_REPLY = quiet(120_000, seed=7)  # the model talks for two minutes: calls stay busy


async def _live_call(s: Stage, server: Server, i: int) -> SimulatedCall:
    call = s.call(server, number(i))
    twiml = await call.webhook()
    if not twiml.stream_url:
        raise RuntimeError(f"call {i} was refused")
    await call.connect()
    await call.wait_for_audio(1, timeout=10)
    return call


async def _keep_talking(call: SimulatedCall, seconds: float) -> None:
    """Twilio streams 50 frames a second, silence included: so does this caller."""
    await call.play(quiet(int(seconds * 1000), seed=hash(call.call_sid)), tail_silence_ms=0)


async def sigterm() -> Outcome:
    """Three calls live, a browser following them; SIGTERM. Two callers hang up 2 s later,
    the third talks on until the drain deadline ends it. A browser reconnecting mid-drain is
    accepted and follows too. Each browser gets every call's end, then 1001; the process exits
    0 once the drain is over."""
    out = Outcome("sigterm")
    async with stage(model=FakeRealtime(pace=1.0, chunk_ms=20, reply_audio=LONG_REPLY)) as s:
        server = await s.server(SHUTDOWN_DRAIN_MS=str(int(DRAIN_S * 1000)))
        before = await follower(s, server)
        calls = [await _live_call(s, server, i) for i in range(3)]
        talking = [asyncio.create_task(_keep_talking(c, 2.0 if i < 2 else DRAIN_S + 5)) for i, c in enumerate(calls)]
        t0 = now()
        server.signal(signal.SIGTERM)
        status, body = 0, {}
        while now() - t0 < 2 and status != 503:
            status, body, _ = await server.healthz()
        out.figures["/healthz draining after"] = f"{(now() - t0) * 1000:.0f} ms"
        out.check(status == 503 and body.get("status") == "draining", "/healthz says draining (503) at once")
        late = s.call(server, number(10))
        twiml = await late.webhook()
        out.check(twiml.status == 200 and not twiml.stream_url and twiml.say,
                  "a new caller hears 'try again' (TwiML, no stream)")
        reconnected = await follower(s, server)
        out.check(not reconnected.ws.closed, "a browser reconnecting mid-drain is accepted and follows every call")
        reply, _ = await reconnected.place(number(11))
        out.check(reply.get("type") == "error", f"call.start is refused while draining ({reply.get('code')})")
        await asyncio.gather(*talking[:2])
        for c in calls[:2]:
            await c.stop()
        code = await server.wait(DRAIN_S + 15)
        took = now() - t0
        talking[2].cancel()
        out.figures["exited after"] = f"{took:.1f} s with {code} (drain {DRAIN_S:.0f} s)"
        out.check(code == 0 and took <= DRAIN_S + 12, f"the process exits 0 after the drain ({took:.1f} s, code {code})")
        for name, client in (("the first browser", before), ("the reconnected browser", reconnected)):
            ends = client.ended()
            reasons = [ends.get(c.call_sid, [{}])[0].get("reason") for c in calls]
            once = all(len(ends.get(c.call_sid, [])) == 1 for c in calls)
            await s.until(lambda cl=client: _closed(cl), 5)
            out.figures[f"{name}: ends"] = f"{reasons}, then close {client.close_code}"
            out.check(once and client.close_code == 1001,
                      f"{name} got each call's end once ({reasons}), then 1001 ({client.close_code})")
        rows = await s.query("SELECT status, end_reason FROM calls WHERE call_sid = ANY($1::text[])",
                             [c.call_sid for c in calls])
        out.check(all(r["status"] == "ended" for r in rows) and len(rows) == 3, "every call is ended in the database")
        left = await s.value("SELECT count(*) FROM instances")
        out.check(left == 0, "the instance left the instances table (nobody has to reap it)")
        out.check(not s.log_errors(), f"no ERROR line or traceback in the logs {s.log_errors()[:3]}")
    return out


async def _closed(client) -> bool:
    return client.ws.closed


async def sigkill() -> Outcome:
    """Two instances share a cap of 6: four calls on A, two on B, the cap full. SIGKILL A. B
    must end A's calls as instance_lost within DEAD_AFTER_S + a heartbeat, tell the browser
    following them, and free their places; B's own calls go on; A restarted joins and works."""
    out = Outcome("sigkill")
    async with stage(model=FakeRealtime(pace=1.0, chunk_ms=20, reply_audio=LONG_REPLY)) as s:
        env = {"RATE_LIMIT_MAX_CONCURRENT_CALLS": "6"}
        a, b = await s.server(**env), await s.server(**env)
        watcher = await follower(s, b)
        on_a = [await _live_call(s, a, i) for i in range(4)]
        on_b = [await _live_call(s, b, 10 + i) for i in range(2)]
        talking = [asyncio.create_task(_keep_talking(c, 120)) for c in on_a + on_b]
        full = s.call(b, number(20))
        out.check(not (await full.webhook()).stream_url, "with 6 calls live the cap (6) refuses a seventh")
        t0 = now()
        a.process.kill()
        await a.wait(10)
        sids = [c.call_sid for c in on_a]

        async def reaped() -> bool:
            n = await s.value("SELECT count(*) FROM calls WHERE call_sid = ANY($1::text[]) AND status = 'ended' "
                              "AND end_reason = 'instance_lost'", sids)
            return n == len(sids)

        bound = DEAD_AFTER_S + HEARTBEAT_S + 2
        ok = await s.until(reaped, bound + 10)
        took = now() - t0
        out.figures["A's calls ended after"] = f"{took:.1f} s (instance dead after {DEAD_AFTER_S:.0f} s silent)"
        out.check(ok and took <= bound, f"A's calls ended as instance_lost within {bound:.0f} s ({took:.1f} s)")
        await s.until(lambda: _told(watcher, sids), 5)
        ends = watcher.ended()
        out.check(all([e.get("reason") for e in ends.get(sid, [])] == ["instance_lost"] for sid in sids),
                  "the browser on B got one ended (instance_lost) for each of A's calls")
        admitted = []
        for i in range(4):
            call = s.call(b, number(30 + i))
            admitted.append(bool((await call.webhook()).stream_url))
        out.check(all(admitted), f"their places are free: {sum(admitted)} of 4 new callers admitted on B")
        out.check(all(not c.closed for c in on_b) and all(len(c.received_audio) > 0 for c in on_b),
                  "B's own calls went on")
        restarted = Server("callgate-1-restarted", a.env, s.folder / "callgate-1-restarted.log")
        s.servers.append(restarted)
        back = await restarted.start()
        out.figures["A restarted: ok after"] = f"{back:.1f} s"
        for c in on_b:
            await c.stop()
        await s.until(lambda: _live_zero(b), 10)
        call = await _live_call(s, restarted, 40)
        out.check(len(call.received_audio) > 0, "the restarted instance takes calls")
        await call.stop()
        for t in talking:
            t.cancel()
        out.check(not s.log_errors(), f"no ERROR line or traceback in the logs {s.log_errors()[:3]}")
    return out


async def _told(watcher, sids: list[str]) -> bool:
    ends = watcher.ended()
    return all(sid in ends for sid in sids)

"""Calls that go wrong: the model failing one call among healthy ones, Twilio's socket
misbehaving, a thousand calls in a row, webhooks replayed. What must hold: only the affected
call ends, once, with a reason, and soon; its neighbours lose no frame; nothing leaks; a replay
opens nothing and costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable

import websockets

from bench.soak.stage import CALLER_ID, Frontend, Outcome, Server, Stage, now, number, percentile, stage
from bridge.call import APOLOGY, RESPONSE_RETRY_DELAYS_S
from bridge.mulaw import BYTES_PER_SECOND
from tools.fake_realtime import FakeRealtime, FakeSession
from tools.simulate_call import SimulatedCall, quiet

APOLOGY_S = len(APOLOGY) / BYTES_PER_SECOND
NEIGHBOURS = 9
WINDOW_S = 8.0  # neighbours talk (quiet audio, real time) this long while the faulty call fails


def model_bytes(session: FakeSession) -> int:
    """Audio the model sent in this session so far."""
    return sum(len(base64.b64decode(e["delta"])) for e in session.events_out
               if e.get("type") == "response.output_audio.delta")


async def follower(s: Stage, server: Server) -> Frontend:
    client = await s.frontend(server)
    await client.follow_all()
    return client


# --- model faults -----------------------------------------------------------------------------

# name → (how it is made, the reasons it may end with, how long it may take from the fault)
MODEL_FAULTS: dict[str, tuple[str, set[str], float]] = {
    "connection cut (no close frame)": ("abort", {"model_failed"}, APOLOGY_S + 3),
    "connection closed 1011": ("drop", {"model_failed"}, APOLOGY_S + 3),
    "every response fails (server_error)": ("server_error", {"model_failed"},
                                            sum(RESPONSE_RETRY_DELAYS_S) + APOLOGY_S + 3),
    "every response rate limited": ("rate_limit", {"model_failed"}, sum(RESPONSE_RETRY_DELAYS_S) + APOLOGY_S + 3),
    "session.update never answered": ("no_session_updated", {"model_unavailable"}, 10 + APOLOGY_S + 3),
    "session.update refused": ("error_on_update", {"model_unavailable", "model_failed"}, APOLOGY_S + 3),
}


async def model_faults() -> Outcome:
    """Per fault: ten calls talking at once (model audio streamed in real time both ways), one
    of them hit by the fault. The faulty one ends once, with its reason, within the bound; the
    nine others lose no frame either way."""
    out = Outcome("model-faults")
    session_faults, plan, base = {}, [], 0
    for name, (how, _, _) in MODEL_FAULTS.items():
        faulty = base + 3
        if how not in ("abort", "drop"):
            session_faults[faulty] = how
        plan.append((name, base, faulty))
        base += NEIGHBOURS + 1
    long_reply = quiet(int((WINDOW_S + 6) * 1000), seed=99)  # outlasts the window
    model = FakeRealtime(pace=1.0, chunk_ms=20, reply_audio=long_reply, session_faults=session_faults)
    async with stage(model=model) as s:
        server = await s.server(MODEL_READY_TIMEOUT_MS="10000")
        watcher = await follower(s, server)
        for name, base, faulty in plan:
            how, reasons, bound = MODEL_FAULTS[name]
            await _model_round(s, server, watcher, out, name, how, reasons, bound, base, faulty)
        out.check(not s.log_errors(), f"no ERROR line or traceback in the logs {s.log_errors()[:3]}")
    return out


async def _model_round(s: Stage, server: Server, watcher: Frontend, out: Outcome, name: str, how: str,
                       reasons: set[str], bound: float, base: int, faulty_index: int) -> None:
    model = s.model
    calls: list[SimulatedCall] = []
    connected_at: dict[str, float] = {}
    for i in range(NEIGHBOURS + 1):
        call = s.call(server, number(base + i))
        await call.webhook()
        await call.connect()
        connected_at[call.call_sid] = now()
        calls.append(call)
        await model.wait_for_session(base + i + 1, timeout=10)  # sessions in call order
    sessions = model.sessions[base:base + NEIGHBOURS + 1]
    faulty = calls[faulty_index - base]
    neighbours = [(c, ss) for c, ss in zip(calls, sessions, strict=True) if c is not faulty]
    await asyncio.gather(*(c.wait_for_audio(1, timeout=10) for c, _ in neighbours))
    talking = [asyncio.create_task(c.play(quiet(int(WINDOW_S * 1000), seed=hash(c.call_sid)), tail_silence_ms=0))
               for c, _ in neighbours]
    if how == "abort":
        fault_at = now()
        sessions[faulty_index - base].abort()
    elif how == "drop":
        fault_at = now()
        await sessions[faulty_index - base].drop()
    else:
        fault_at = connected_at[faulty.call_sid]  # the session's fault is there from its start
    try:
        await faulty.wait_closed(timeout=bound + WINDOW_S)
        ended_after = now() - fault_at
    except TimeoutError:
        ended_after = float("inf")
    await asyncio.gather(*talking)
    # Neighbours: every caller frame reached the model, every model frame reached the caller.
    lost_up = lost_down = 0
    for call, session in neighbours:
        sent_by_model = model_bytes(session)
        try:
            await call.wait_for_audio(sent_by_model, timeout=2)
        except TimeoutError:
            lost_down += sent_by_model - len(call.received_audio)
        try:
            await session.wait_for_audio(call.sent_bytes, timeout=2)
        except TimeoutError:
            lost_up += call.sent_bytes - len(session.audio_in)
        await call.stop()
    await s.until(lambda: _all_ended(watcher, [c.call_sid for c in calls]), 10)
    faulty_ends = watcher.ended().get(faulty.call_sid, [])
    neighbour_ends = [len(watcher.ended().get(c.call_sid, [])) for c, _ in neighbours]
    reason = faulty_ends[0].get("reason") if faulty_ends else None
    out.figures[name] = (f"ended after {ended_after:.1f} s, {APOLOGY_S:.1f} s of it the apology ({reason}); "
                         f"neighbours lost {lost_up} up / "
                         f"{lost_down} down bytes")
    out.check(len(faulty_ends) == 1 and reason in reasons and ended_after <= bound,
              f"{name}: the faulty call ended once ({len(faulty_ends)}), as {reason}, after {ended_after:.1f} s "
              f"(bound {bound:.0f} s)")
    out.check(lost_up == 0 and lost_down == 0 and all(n == 1 for n in neighbour_ends),
              f"{name}: its {NEIGHBOURS} neighbours lost no frame and ended once each when they hung up")


# --- Twilio's socket --------------------------------------------------------------------------


async def _raw(call: SimulatedCall, *messages: dict | str) -> None:
    for m in messages:
        await call.send_raw(m if isinstance(m, str) else json.dumps(m))


def _stop(call: SimulatedCall) -> dict:
    return {"event": "stop", "sequenceNumber": "999", "streamSid": call.stream_sid,
            "stop": {"accountSid": call.account_sid, "callSid": call.call_sid}}


TWILIO_FAULTS: dict[str, Callable[[SimulatedCall], Awaitable[None]]] = {
    "TCP cut, no stop": lambda c: c.drop(),
    "close without stop": lambda c: c.close_stream(),
    "stop twice": lambda c: _raw(c, _stop(c), _stop(c)),
    "media after stop": lambda c: _raw(c, _stop(c), {"event": "media", "streamSid": c.stream_sid,
                                                    "media": {"payload": "//8="}}),
    "garbage, then stop": lambda c: _raw(c, "not json", "[1,2]", b"\x00\x01".decode(), _stop(c)),
    "close with an error code": lambda c: c.close_stream(1011, "twilio went away"),
    "stop during the greeting": lambda c: c.stop(),
}


async def twilio_faults() -> Outcome:
    """Each way Twilio's side of a stream can end badly, all at once, twice over: each call is
    finalised exactly once (one ``ended`` with a reason, its row ended, its model session
    closed), and the server is back to zero live calls."""
    out = Outcome("twilio-faults")
    async with stage(model=FakeRealtime(pace=1.0, chunk_ms=20)) as s:
        server = await s.server()
        watcher = await follower(s, server)
        runs = []
        for round_ in range(2):
            for k, (name, fault) in enumerate(TWILIO_FAULTS.items()):
                call = s.call(server, number(round_ * 100 + k))
                runs.append((name, call, fault))

        async def one(name: str, call: SimulatedCall, fault) -> None:
            await call.webhook()
            await call.connect()
            if name != "stop during the greeting":
                await call.wait_for_audio(1, timeout=10)
                await call.play(quiet(500, seed=len(name)), tail_silence_ms=0)
            await fault(call)

        await asyncio.gather(*(one(*r) for r in runs))
        sids = [c.call_sid for _, c, _ in runs]
        settled = await s.until(lambda: _live_zero(server), 15)
        await s.until(lambda: _all_ended(watcher, sids), 10)
        rows = {r["call_sid"]: (r["status"], r["end_reason"]) for r in await s.query(
            "SELECT call_sid, status, end_reason FROM calls WHERE call_sid = ANY($1::text[])", sids)}
        ends = watcher.ended()
        for name, call, _ in runs:
            got = ends.get(call.call_sid, [])
            row = rows.get(call.call_sid)
            ok = len(got) == 1 and got[0].get("reason") and row is not None and row[0] == "ended" and row[1]
            out.figures.setdefault(name, set()).add(f"{got[0].get('reason') if got else None}")
            out.check(ok, f"{name}: ended once ({len(got)}), as {got[0].get('reason') if got else None}, row {row}")
        out.figures = {k: ", ".join(sorted(v)) for k, v in out.figures.items()}
        closed = sum(1 for ss in s.model.sessions if ss.closed.is_set())
        out.check(settled and closed == len(s.model.sessions),
                  f"no live call and no model session left ({closed} of {len(s.model.sessions)} closed)")
        out.check(not s.log_errors(), f"no ERROR line or traceback in the logs {s.log_errors()[:3]}")
    return out


async def _live_zero(server: Server) -> bool:
    return await server.metric("callgate_active_calls") == 0


async def _all_ended(watcher: Frontend, sids: list[str]) -> bool:
    ends = watcher.ended()
    return all(sid in ends for sid in sids)


# --- a thousand calls -------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(*, calls: int = 1000, at_once: int = 20) -> Outcome:
    """A thousand short calls, twenty at a time: each greets, hears a second of the caller and
    hangs up. Memory and file descriptors after the first hundred and after the last: what
    grows with every call is a leak."""
    out = Outcome("soak")
    async with stage(model=FakeRealtime(reply_text="Hi.", record_audio=False)) as s:
        server = await s.server()
        pid = server.process.pid
        done = failed = 0
        setup: list[float] = []

        async def worker(queue: asyncio.Queue[int]) -> None:
            nonlocal done, failed
            while not queue.empty():
                i = queue.get_nowait()
                call = s.call(server, number(i), audio=quiet(1000, seed=i))
                began = now()
                try:
                    await call.webhook()
                    await call.connect()
                    await call.wait_for_audio(1, timeout=10)
                    setup.append(now() - began)
                    await call.play()
                    await call.stop()
                    done += 1
                except Exception:  # noqa: BLE001 - counted and reported
                    failed += 1
                finally:
                    await call.close()
                    s.calls.remove(call)

        async def run(first: int, last: int) -> tuple[int, int]:
            """Calls first..last-1, then (every call over) the process's RSS in KiB and fds."""
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(first, last):
                queue.put_nowait(i)
            await asyncio.gather(*(worker(queue) for _ in range(at_once)))
            await s.until(lambda: _live_zero(server), 10)
            return _rss_kb(pid), _fds(pid)

        began = now()
        rss_100, fds_100 = await run(0, 100)  # warm: caches, pools and arenas at their size
        rss_end, fds_end = await run(100, calls)
        took = now() - began
        metrics = await server.metrics()
        sockets = sum(v for (name, _), v in metrics.items() if name == "callgate_open_sockets")
        in_use = metrics.get(("callgate_db_pool_in_use", ()), 0)
        growth_kb_per_call = (rss_end - rss_100) / (calls - 100)
        out.figures |= {"calls": f"{done} completed, {failed} failed, in {took:.0f} s",
                        "setup p50 / p99": f"{percentile(setup, 0.5) * 1000:.0f} / {percentile(setup, 0.99) * 1000:.0f} ms",
                        "RSS after 100 / after all": f"{rss_100 / 1024:.1f} / {rss_end / 1024:.1f} MiB "
                                                     f"({growth_kb_per_call:.2f} KiB a call)",
                        "fds after 100 / after all": f"{fds_100} / {fds_end}",
                        "open sockets / pool in use at the end": f"{sockets:.0f} / {in_use:.0f}"}
        out.check(failed == 0, f"every call completed ({failed} failed)")
        # A leak of one call's state (its sockets, buffers, tasks: tens of KiB) would show as
        # more than 10 KiB a call; allocator noise over 900 calls stays well under it.
        out.check(growth_kb_per_call < 10, f"memory does not grow with calls ({growth_kb_per_call:.2f} KiB a call)")
        out.check(fds_end <= fds_100 + 5, f"no file descriptor leaks ({fds_100} → {fds_end})")
        out.check(sockets == 0 and in_use == 0, "no socket open and no pool connection lent out at the end")
        closed = sum(1 for ss in s.model.sessions if ss.closed.is_set())
        out.check(closed == len(s.model.sessions) == calls, f"every model session closed ({closed} of {calls})")
        out.check(not s.log_errors(), f"no ERROR line or traceback in the logs {s.log_errors()[:3]}")
    return out


# --- replays ----------------------------------------------------------------------------------


async def replays() -> Outcome:
    """Captured signed webhooks and stream handshakes, replayed: nothing opens, nothing is
    charged, a pending call's retry gets the first answer."""
    out = Outcome("replays")
    async with stage(model=FakeRealtime(reply_text="Hi.")) as s:
        server = await s.server(RATE_LIMIT_MAX_CONCURRENT_CALLS="5")
        charges = "SELECT count(*) FROM limiter_charges WHERE refunded_at IS NULL AND charge_id LIKE 'CA%'"

        # 1. An ended call's webhook, replayed 8 times.
        call = s.call(server, number(1))
        await call.webhook()
        await call.connect()
        await call.wait_for_audio(1, timeout=10)
        await call.stop()
        await s.until(lambda: _live_zero(server), 10)
        sessions, charged = len(s.model.sessions), await s.value(charges)
        answers = []
        for _ in range(8):
            replay = s.call(server, number(1), call_sid=call.call_sid)
            twiml = await replay.webhook()
            answers.append(bool(twiml.stream_url))
        out.figures["ended call's webhook replayed 8 times"] = f"{sum(answers)} streams offered"
        out.check(not any(answers) and len(s.model.sessions) == sessions and await s.value(charges) == charged,
                  "an ended call's replayed webhook gets a hang-up: no stream, no model session, no charge")

        # 2. A pending call's webhook, ten times: one answer, one stream.
        pending = s.call(server, number(2))
        first = await pending.webhook()
        tokens = {first.parameters.get("token")}
        for _ in range(9):
            again = s.call(server, number(2), call_sid=pending.call_sid)
            tokens.add((await again.webhook()).parameters.get("token"))
        out.figures["pending call's webhook sent 10 times"] = f"{len(tokens)} distinct token(s)"
        out.check(len(tokens) == 1, f"a retried pending webhook gets the same answer ({len(tokens)} tokens)")
        await pending.connect()
        await pending.wait_for_audio(1, timeout=10)
        second = s.call(server, number(2), call_sid=pending.call_sid)
        second.twiml = first
        opened = await _stream_opens(second)
        out.check(not opened, "a second stream for the same call (same token) is refused")
        await pending.stop()

        # 3. After a final status callback (canceled), the webhook is hung up.
        canceled = s.call(server, number(3))
        await _status_callback(s, server, canceled.call_sid, "canceled")
        twiml = await canceled.webhook()
        out.check(not twiml.stream_url, "a webhook after a final 'canceled' callback gets a hang-up")

        # 4. The cap: replays never take places.
        live = [s.call(server, number(10 + i)) for i in range(5)]
        for c in live:
            await c.webhook()
            await c.connect()
        for c in live:
            await c.wait_for_audio(1, timeout=10)
        extra = s.call(server, number(20))
        full = await extra.webhook()
        out.check(not full.stream_url, "with the cap (5) reached, a new caller is refused")
        for c in live:
            await c.stop()
        await s.until(lambda: _live_zero(server), 10)
        streams = len(s.model.sessions)
        out.figures["model sessions opened"] = f"{streams} for {2 + 5} calls that streamed"
        out.check(streams == 7, f"one model session per call that streamed ({streams} for 7)")
        out.check(not s.log_errors(), f"no ERROR line or traceback in the logs {s.log_errors()[:3]}")
    return out


async def _stream_opens(call: SimulatedCall) -> bool:
    """Whether the server keeps a stream opened with this call's TwiML (greets it)."""
    try:
        await call.connect()
    except websockets.InvalidStatus:
        return False
    try:
        await call.wait_for_audio(1, timeout=3)
        return True
    except TimeoutError:
        return False


async def _status_callback(s: Stage, server: Server, call_sid: str, status: str) -> None:
    form = {"CallSid": call_sid, "AccountSid": s.twilio_api.account_sid, "CallStatus": status,
            "Direction": "inbound", "From": number(3), "To": CALLER_ID, "ApiVersion": "2010-04-01"}
    url = "/twilio/status"
    signature = s.sign(url, form)
    async with server._http.post(server.url + url, data=form, headers={"X-Twilio-Signature": signature}) as r:
        if r.status >= 300:
            raise RuntimeError(f"status callback refused: HTTP {r.status}")

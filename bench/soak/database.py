"""PostgreSQL going away: restarted, crashed, black-holed, down when Callgate starts, stalled
during a burst. What must hold: no charge lost or doubled, every admitted call recorded (written
back if it had to be), every request answered within one timeout, /healthz in milliseconds,
the process never exits, no traceback in the log.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from bench.soak.stage import (
    HealthWatch,
    Outcome,
    Server,
    Stage,
    free_port,
    now,
    number,
    stage,
)
from tools.fake_realtime import FakeRealtime
from tools.tcp_proxy import TcpProxy

TIMEOUT_S = 2.0  # LIMITER_TIMEOUT_MS of the servers (the default): one request pays at most this
SLACK_S = 1.0    # scheduling on a shared 2-core machine, on top of it
HEALTH_FAST_S = 0.25


@dataclass
class Load:
    """Browsers placing calls and callers dialling in, until stopped; what each got."""

    stage: Stage
    server: Server
    placers: int = 4
    callers: int = 3
    pause_s: float = 0.25
    starts: list[tuple[float, str, float]] = field(default_factory=list)   # (when, outcome, seconds)
    webhooks: list[tuple[float, str, float]] = field(default_factory=list)
    streamed: list[str] = field(default_factory=list)  # inbound CallSids whose stream opened
    numbers: list[str] = field(default_factory=list)
    _count: itertools.count = field(default_factory=itertools.count)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def next_number(self) -> str:
        n = number(next(self._count))
        self.numbers.append(n)
        return n

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._place()) for _ in range(self.placers)]
        self._tasks += [asyncio.create_task(self._dial()) for _ in range(self.callers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _place(self) -> None:
        while not self._stop.is_set():
            client = await self.stage.frontend(self.server)  # a new address: 10 call.starts an hour each
            for _ in range(10):
                if self._stop.is_set():
                    break
                began = now()
                try:
                    reply, took = await client.place(self.next_number())
                    outcome = "queued" if "token" in reply else reply.get("code", reply["type"])
                except (TimeoutError, ConnectionError) as exc:
                    outcome, took = f"no answer ({type(exc).__name__})", now() - began
                self.starts.append((began, outcome, took))
                await asyncio.sleep(self.pause_s)
            await client.close()
            self.stage.frontends.remove(client)

    async def _dial(self) -> None:
        while not self._stop.is_set():
            call = self.stage.call(self.server, self.next_number())
            began = now()
            try:
                twiml = await call.webhook()
                took = now() - began
                if twiml.stream_url:
                    await call.connect()
                    self.streamed.append(call.call_sid)
                    await call.wait_for_audio(1, timeout=5)
                    await call.stop()
                    outcome = "streamed"
                else:
                    outcome = "refused" if twiml.status == 200 else f"HTTP {twiml.status}"
            except Exception as exc:  # noqa: BLE001 - every failure is an outcome to report
                outcome, took = f"failed ({type(exc).__name__})", now() - began
            self.webhooks.append((began, outcome, took))
            await call.close()
            self.stage.calls.remove(call)
            await asyncio.sleep(self.pause_s)

    def tally(self, records: list[tuple[float, str, float]]) -> str:
        counts: dict[str, int] = {}
        for _, outcome, _ in records:
            counts[outcome] = counts.get(outcome, 0) + 1
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


async def reservations_placed(s: Stage) -> set[str]:
    """The charge id (reservation) in the Url of every call Twilio placed."""
    return {r.value("Url").split("charge=")[1] for r in s.twilio_api.requests
            if r.method == "POST" and r.path.endswith("/Calls.json") and r.value("Url")}


async def settle(s: Stage, server: Server, timeout: float = 30) -> bool:
    """Wait until the server has written back what it decided while away."""
    deadline = now() + timeout
    while now() < deadline:
        status, body, _ = await server.healthz()
        if (body.get("status") == "ok" and await server.metric("callgate_limiter_pending") == 0
                and await server.metric("callgate_calls_owed") == 0):
            return True
        await asyncio.sleep(0.5)
    return False


async def check_books(s: Stage, out: Outcome, load: Load) -> None:
    """Placements = charges, every placed and every streamed call recorded, every request answered
    within one timeout."""
    placed = await reservations_placed(s)
    charged = {r[0] for r in await s.query(
        "SELECT charge_id FROM limiter_charges WHERE charge_id LIKE 'RS%' AND refunded_at IS NULL")}
    out.figures["placements / charges"] = f"{len(placed)} / {len(charged)}"
    out.check(placed == charged, f"placements = charges ({len(placed)}; lost {len(placed - charged)}, "
                                 f"without a call {len(charged - placed)})")
    recorded = {r[0] for r in await s.query("SELECT call_sid FROM calls")}
    missing_out = set(s.placed()) - recorded
    missing_in = set(load.streamed) - recorded
    out.check(not missing_out and not missing_in,
              f"every call has a record (placed {len(s.placed())}, missing {len(missing_out)}; "
              f"streamed inbound {len(load.streamed)}, missing {len(missing_in)})")
    open_rows = await s.value("SELECT count(*) FROM calls WHERE call_sid = ANY($1::text[]) AND status <> 'ended'",
                              load.streamed)
    out.check(open_rows == 0, f"every inbound call that ended is ended in the database ({open_rows} still open: "
                              "they would hold places under the cap)")
    inbound_charged = await s.value(
        "SELECT count(*) FROM calls c JOIN limiter_charges l ON l.charge_id = c.charge_id "
        "WHERE c.call_sid = ANY($1::text[]) AND l.refunded_at IS NULL", load.streamed)
    out.check(inbound_charged == len(load.streamed),
              f"every streamed inbound call is charged once ({inbound_charged} of {len(load.streamed)})")
    unanswered = [o for _, o, _ in load.starts + load.webhooks if o.startswith(("no answer", "failed"))]
    out.check(not unanswered, f"every call.start and webhook answered ({len(unanswered)} not)")
    slowest = max((t for _, _, t in load.starts + load.webhooks), default=0.0)
    out.figures["slowest answer"] = f"{slowest:.2f} s"
    out.check(slowest <= TIMEOUT_S + SLACK_S, f"no request paid more than one timeout (slowest {slowest:.2f} s)")
    out.figures["call.start"] = load.tally(load.starts)
    out.figures["webhooks"] = load.tally(load.webhooks)


def check_health(out: Outcome, health: HealthWatch, back_at: float | None) -> None:
    out.figures["/healthz slowest"] = f"{health.slowest * 1000:.0f} ms"
    out.check(health.unanswered == 0 and health.slowest < HEALTH_FAST_S,
              f"/healthz always answered fast ({health.unanswered} unanswered, slowest "
              f"{health.slowest * 1000:.0f} ms)")
    seen = health.statuses()
    out.figures["/healthz said"] = " → ".join(seen)
    out.check("degraded" in seen and seen[-1] == "ok", f"/healthz said degraded, then ok again ({seen})")
    if back_at is not None:
        ok_at = health.first("ok", back_at)
        if ok_at is not None:
            out.figures["ok again after"] = f"{ok_at - back_at:.1f} s"


def check_logs(s: Stage, out: Outcome, numbers: list[str], prefix: str = "") -> None:
    errors = s.log_errors()
    out.figures[f"{prefix}ERROR lines / tracebacks"] = len(errors)
    out.check(not errors, f"{prefix}no ERROR line or traceback in the logs" + (f": {errors[:5]}" if errors else ""))
    shown = s.numbers_in_logs(numbers)
    out.check(not shown, f"{prefix}no phone number in the logs ({len(shown)} shown)")


async def outage(kind: str, *, warm_s: float = 5, after_s: float = 10) -> Outcome:
    """Load, then the database goes away (``kind``), comes back, load continues."""
    out = Outcome(kind)
    async with stage(model=FakeRealtime(reply_text="Hi.")) as s:
        server = await s.server()
        load = Load(s, server)
        async with HealthWatch(server) as health:
            load.start()
            await asyncio.sleep(warm_s)
            began = now()
            if kind == "pg-restart":
                await s.postgres.stop("fast")
                await asyncio.sleep(2)  # a managed database's restart takes seconds
                await s.postgres.start()
            elif kind == "crash-restart":
                await s.postgres.stop("immediate")
                await asyncio.sleep(3)
                await s.postgres.start()
            else:  # black-hole: connections accepted, nothing answered, for 30 s
                s.proxy.stall()
                await asyncio.sleep(30)
                s.proxy.restore()
            back = now()
            out.figures["database away"] = f"{back - began:.1f} s"
            await asyncio.sleep(after_s)
            await load.stop()
            out.check(await settle(s, server), "the server wrote back what it decided while away")
        out.check(server.process.returncode is None, "the server never exited")
        await check_books(s, out, load)
        check_health(out, health, back)
        check_logs(s, out, load.numbers)
    return out


async def pg_restart() -> Outcome:
    return await outage("pg-restart")


async def crash_restart() -> Outcome:
    return await outage("crash-restart")


async def black_hole() -> Outcome:
    return await outage("black-hole")


async def down_at_start() -> Outcome:
    """Callgate starts while PostgreSQL refuses, resets or black-holes connections; it must
    listen, say degraded, answer webhooks and call.start, and go ok once the database answers,
    without a restart."""
    out = Outcome("down-at-start")
    for how in ("refused", "reset", "black-hole"):
        async with stage() as s:
            # "refused": nothing listens on the database's port until it comes back.
            port = free_port() if how == "refused" else s.proxy.port
            if how == "reset":
                s.proxy.cut()
            elif how == "black-hole":
                s.proxy.stall()
            dsn = s.proxy.dsn.replace(f":{s.proxy.port}/", f":{port}/")
            server = await s.server(until="listening", DATABASE_URL=dsn)
            out.figures[f"{how}: listening after"] = f"{server.listening_after:.1f} s"
            out.check(server.listening_after <= TIMEOUT_S + SLACK_S,
                      f"{how}: listening within one timeout ({server.listening_after:.1f} s)")
            status, body, took = await server.healthz()
            out.check(status == 200 and body.get("status") == "degraded" and took < HEALTH_FAST_S,
                      f"{how}: listening, /healthz 200 degraded in {took * 1000:.0f} ms")
            call = s.call(server, number(1))
            began = now()
            twiml = await call.webhook()
            webhook_s = now() - began
            streamed = bool(twiml.stream_url)
            if streamed:
                await call.connect()
                await call.wait_for_audio(1, timeout=5)
                await call.stop()
            out.check(streamed and webhook_s <= TIMEOUT_S + SLACK_S,
                      f"{how}: a call is admitted (memory mode) in {webhook_s:.2f} s")
            client = await s.frontend(server)
            reply, start_s = await client.place(number(2))
            out.check(reply.get("code") == "unavailable" and start_s <= TIMEOUT_S + SLACK_S,
                      f"{how}: call.start refused at once ({reply.get('code')}, {start_s:.2f} s)")
            await asyncio.sleep(5)  # some probes fail, so the back-off grows
            back = now()
            if how == "refused":
                late = await TcpProxy("127.0.0.1", s.postgres.embedded.port, port).start()
            else:
                s.proxy.restore()
            try:
                ok = await _until_ok(server, 30)
                out.figures[f"{how}: ok after the database came back"] = (
                    f"{now() - back:.1f} s" if ok else "never")
                out.check(ok, f"{how}: /healthz ok again without a restart")
                reply, _ = await client.place(number(3))
                out.check("token" in reply, f"{how}: call.start places calls once the database answers")
                await settle(s, server)
                recorded = await s.value("SELECT count(*) FROM calls WHERE call_sid = $1", call.call_sid)
                out.check(recorded == 1, f"{how}: the call admitted while away was written back")
                out.check(server.process.returncode is None, f"{how}: the server never exited")
                check_logs(s, out, [number(1), number(2), number(3)], prefix=f"{how}: ")
            finally:
                if how == "refused":
                    await late.close()
    return out


async def _until_ok(server: Server, timeout: float) -> bool:
    deadline = now() + timeout
    while now() < deadline:
        if (await server.healthz())[1].get("status") == "ok":
            return True
        await asyncio.sleep(0.1)
    return False


async def all_see(servers: list[Server], n: int) -> bool:
    return all([await sv.metric("callgate_instances_alive") == n for sv in servers])


async def burst_stall(*, calls: int = 300, over_s: float = 2.0, cap: int = 250, stall_s: float = 3.0) -> Outcome:
    """300 callers in 2 s across two instances sharing a cap of 250, with PostgreSQL stalled for
    3 s from half a second in: never more than the cap live, every admitted call recorded."""
    out = Outcome("burst-stall")
    async with stage() as s:
        env = {"RATE_LIMIT_MAX_CONCURRENT_CALLS": str(cap)}
        servers = [await s.server(**env), await s.server(**env)]
        if not await s.until(lambda: all_see(servers, 2), 10):
            out.check(False, "each instance counts both alive")
        live, peak = 0, 0
        streamed: list[str] = []
        refused = failed = 0
        release = asyncio.Event()
        gauge_peak = 0.0

        async def caller(i: int) -> None:
            nonlocal live, peak, refused, failed
            await asyncio.sleep(i * over_s / calls)
            call = s.call(servers[i % 2], number(i))
            try:
                twiml = await call.webhook()
                if not twiml.stream_url:
                    refused += 1
                    return
                await call.connect()
                live += 1
                peak = max(peak, live)
                streamed.append(call.call_sid)
                await release.wait()
                await call.stop()
                live -= 1
            except Exception:  # noqa: BLE001 - counted and reported
                failed += 1

        async def watch_gauges() -> None:
            nonlocal gauge_peak
            while not release.is_set():
                values = await asyncio.gather(*(sv.metric("callgate_active_calls") for sv in servers))
                gauge_peak = max(gauge_peak, sum(values))
                await asyncio.sleep(0.2)

        async def stall() -> None:
            await asyncio.sleep(0.5)
            s.proxy.stall()
            await asyncio.sleep(stall_s)
            s.proxy.restore()

        tasks = [asyncio.create_task(caller(i)) for i in range(calls)]
        watcher = asyncio.create_task(watch_gauges())
        await stall()
        await asyncio.sleep(over_s + TIMEOUT_S + 3)  # every webhook answered, every stream open
        release.set()
        await asyncio.gather(*tasks, watcher)
        settled = all([await settle(s, sv) for sv in servers])
        recorded = {r[0] for r in await s.query("SELECT call_sid FROM calls WHERE call_sid = ANY($1::text[])",
                                                streamed)}
        out.figures |= {"calls": calls, "cap": cap, "admitted": len(streamed), "refused": refused,
                        "failed": failed, "most live at once": f"{peak} (servers' gauges: {gauge_peak:.0f})",
                        "admitted without a record": len(set(streamed) - recorded)}
        out.check(peak <= cap and gauge_peak <= cap, f"never more than the cap live ({peak}, gauges {gauge_peak:.0f})")
        out.check(failed == 0, f"every caller got an answer ({failed} failed)")
        out.check(settled and recorded == set(streamed),
                  f"every admitted call has a record ({len(recorded)} of {len(streamed)})")
        out.check(len(streamed) >= cap * 0.8, f"the cap was used, not just refused ({len(streamed)} admitted)")
        check_logs(s, out, [number(i) for i in range(calls)])
    return out

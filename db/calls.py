"""Call records, call requests and stream starts, in PostgreSQL (``sql/calls_*.sql``,
``sql/call_requests_*.sql``, ``sql/instances_*.sql``); the global cap's bookkeeping; and which
instances are alive.

Every statement is bounded in time (``LIMITER_TIMEOUT_MS``), through the database gate. What
each method does when PostgreSQL is away is decided here, once, so no caller has to, and a
live call never goes down with the database:

=================  ============================================================================
method             when PostgreSQL is away
=================  ============================================================================
``admit``          as LIMITER_FAIL_MODE says for the cap: ``memory``, taken if this instance
                   has room in its share (the cap divided by the instances last seen alive);
                   ``closed``, refused; ``open``, taken. A call taken is recorded when
                   PostgreSQL returns (``maintain``), so it counts and can be ended
``hold``           the same rule as ``admit``; nothing is recorded (a hold is minutes long)
``release_hold``   nothing: the hold expires with its ring timeout
``record``         recorded when PostgreSQL returns (``maintain``); meanwhile its status
                   callbacks still refund, by the charge id their signed URL names
``put_request``    False: nothing was stored, so the caller must not place the call
``get_request``    None: the call runs its scenario's defaults
``set_status``     True: followers hear of the change (the bus keeps statuses moving forward);
                   the call's latest status is recorded when PostgreSQL returns, so a call
                   that ended meanwhile does not hold a place under the cap
``set_end_reason`` True, likewise; recorded when PostgreSQL returns
``claim_refund``   the ``fallback`` charge id: the limiter refunds idempotently (and writes
                   back later), so refunding without the record cannot refund twice
``get``            None: the call is unknown here
``start_stream``   the token is single use on this instance only, until it expires (minutes);
                   the stream start (and ``connected``) is recorded when PostgreSQL returns
                   (the call then counts as streaming here, and is ended by another instance
                   if this one dies)
``cleanup``        0: the next run deletes what this one could not
=================  ============================================================================

Each fallback logs a warning naming the call and what was not done; while the outage lasts,
one line per kind of statement every 10 s, counting the others (an outage is one event, not a
line per request). Whatever is owed is written back oldest first, with one line saying how
much. Any other database error is a bug and is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import orjson

from db.bounded import DatabaseAway, DatabaseGate
from db.sql import Queries
from logsetup import Throttled

log = logging.getLogger("callgate.calls")
# While PostgreSQL is away: one warning per kind of statement every 10 s, its subject left out.
SUBJECT = re.compile(r"^(call(?: request)?) \S+")  # "call CA…: status ended" → "call: status ended"

CALL_RETENTION_DAYS = 30
HEARTBEAT_S = 4.0    # how often an instance says it is alive
WRITE_BACK_POLL_S = 0.25  # while something is owed to PostgreSQL: how often to try to write it back
# After an outage, admissions keep to this instance's share (as well as the cap) this long: time
# for every instance to find PostgreSQL back (they probe every WRITE_BACK_POLL_S while they owe)
# and write back what it let in.
SETTLE_S = 3.0
DEAD_AFTER_S = 15.0  # an instance silent this long is dead: any other ends its calls

# The advisory lock every instance takes to admit a call under the global cap ("CGADMIT").
ADMISSION_LOCK = 0x4347_4144_4D49_54

T = TypeVar("T")
AWAY: Any = object()  # what a statement "returned" when PostgreSQL was away (see _fetchrow)


@dataclass(frozen=True)
class Cap:
    """The global cap on live calls (RATE_LIMIT_MAX_CONCURRENT_CALLS) and how long a call counts
    (see sql/migrations/005_admission.sql); ``fail_mode`` decides while PostgreSQL is away."""

    max_live: int
    session_s: float  # a streaming call: the session limit plus a grace
    setup_s: float    # admitted, its stream not started yet
    hold_s: float     # an outbound call's hold: its ring timeout plus a grace
    fail_mode: str    # LIMITER_FAIL_MODE


@dataclass(frozen=True)
class Admission:
    """What the store says of a webhook's call: ``state`` new, pending, streaming or ended (see
    sql/calls_admit.sql); ``admitted``; the stream parameters to answer with."""

    state: str
    admitted: bool
    stream_params: dict[str, str]


@dataclass(frozen=True)
class StreamStart:
    """What the store says of a stream's start: ``first``, it may run (its token unspent, the
    call's first stream); ``connected``, the call's status moved to connected with it (news for
    followers, and nothing more to record for it). Not ``connected`` when the record was not
    there to move (PostgreSQL away, or the call admitted while it was): the bridge records it."""

    first: bool
    connected: bool


class CallStore:
    def __init__(self, gate: DatabaseGate, queries: Queries, timeout: float, cap: Cap, instance_id: str,
                 live_here: Callable[[], Collection[str]]) -> None:
        """``live_here``: the CallSids streaming on this instance now (for its share of the cap
        while PostgreSQL is away)."""
        self._gate = gate
        self._q = queries
        self._timeout = timeout
        self.cap = cap
        self.instance_id = instance_id
        self._live_here = live_here
        self.instances_alive = 1  # as the last heartbeat counted them
        # Calls admitted while PostgreSQL was away: CallSid → (record arguments, when), written
        # back by maintain(); and stream tokens spent meanwhile, with their expiry.
        self._admitted_away: dict[str, tuple[tuple, float]] = {}
        self._spent_here: dict[str, float] = {}
        # Calls this instance let in (either way) whose stream has not started yet: CallSid →
        # when. They count in its share too: a burst has many between webhook and stream.
        self._starting: dict[str, float] = {}
        # Everything else PostgreSQL missed meanwhile, oldest first: (kind, CallSid) → (query,
        # arguments). A call's later status replaces its earlier one; all are idempotent upserts.
        self._owed: dict[tuple[str, str], tuple[str, tuple]] = {}
        self._away_log = Throttled(log)
        self._beat_now = asyncio.Event()
        self._writing = asyncio.Lock()

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]], when_away: T, what: str) -> T:
        """``work`` on a pooled connection, bounded; ``when_away`` (logged) if PostgreSQL is away."""
        try:
            return await self._gate.run(work, self._timeout)
        except DatabaseAway as exc:
            self._away_log.warning(SUBJECT.sub(r"\1", what), "%s: not done, the database is unavailable (%s)", what, exc)
            return when_away

    def _owe(self, kind: str, call_sid: str, query: str, args: tuple, *, replace: bool = True) -> None:
        key = (kind, call_sid)
        if replace or key not in self._owed:
            self._owed[key] = (query, args)

    @property
    def owed(self) -> int:
        """Statements waiting for PostgreSQL to return (admissions included)."""
        return len(self._admitted_away) + len(self._owed)

    async def _fetchrow(self, query: str, *args: Any, what: str) -> Any:
        """The row (or None), or AWAY (logged, with ``what``) when PostgreSQL is away."""
        return await self._run(lambda conn: conn.fetchrow(query, *args), AWAY, what)

    def _locked(self, query: str, *args: Any) -> Callable[[asyncpg.Connection], Awaitable[asyncpg.Record]]:
        """``query`` in a transaction that holds the admission lock: one admission at a time."""
        async def work(conn: asyncpg.Connection) -> asyncpg.Record:
            async with conn.transaction():
                await conn.execute(self._q.calls_admit_lock, ADMISSION_LOCK)
                return await conn.fetchrow(query, *args)
        return work

    # --- the cap ----------------------------------------------------------------------------

    async def admit(self, call_sid: str, charge_id: str, direction: str, region: str, scenario_id: str,
                    stream_params: dict[str, str], number_masked: str) -> Admission:
        """The webhook's call: admitted under the cap (or not), or known from before."""
        c = self.cap
        await self.write_back()  # what it let in while PostgreSQL was away counts first
        if self._settling() and not self._room_while_away():
            return Admission("new", False, stream_params)
        row = await self._fetchrow(self._q.calls_admit, call_sid, charge_id, direction, region, scenario_id,
                                   c.max_live, c.session_s, c.setup_s, c.hold_s, orjson.dumps(stream_params).decode(),
                                   ADMISSION_LOCK, number_masked, what=f"call {call_sid}: admission under the cap ({c.fail_mode} decides)")
        if row is not AWAY:
            if row["admitted"]:
                self._starting[call_sid] = time.time()
            return Admission(row["state"], row["admitted"], orjson.loads(row["stream_params"]))
        if not self._room_while_away():
            return Admission("new", False, stream_params)
        self._admitted_away[call_sid] = ((call_sid, charge_id, direction, region, scenario_id, True, number_masked),
                                         time.time())
        self._starting[call_sid] = time.time()
        return Admission("new", True, stream_params)

    async def hold(self, reservation_id: str) -> bool:
        """Hold a place under the cap for an outbound call about to be placed."""
        c = self.cap
        await self.write_back()
        if self._settling() and not self._room_while_away():
            return False
        row = await self._run(self._locked(self._q.calls_hold, reservation_id, c.max_live, c.session_s,
                                           c.setup_s, c.hold_s),
                              AWAY, f"call request {reservation_id}: a place under the cap ({c.fail_mode} decides)")
        return self._room_while_away() if row is AWAY else bool(row["held"])

    async def release_hold(self, reservation_id: str) -> None:
        await self._fetchrow(self._q.calls_release_hold, reservation_id,
                             what=f"call request {reservation_id}: release its place (it expires)")

    def _settling(self) -> bool:
        """Just after an outage, the other instances may not have written back yet what they let
        in meanwhile, so PostgreSQL's count is short: for SETTLE_S the share is kept as well
        (memory mode: in closed mode nobody let anyone in; in open mode the cap was let go)."""
        return (self.cap.fail_mode == "memory" and self._gate.outages > 0
                and time.monotonic() - self._gate.up_since < SETTLE_S)

    def _room_while_away(self) -> bool:
        """LIMITER_FAIL_MODE, for the cap: memory takes a call while this instance is under its
        share (the cap divided among the instances last seen alive); closed never; open always."""
        if self.cap.fail_mode == "open":
            return True
        if self.cap.fail_mode == "closed":
            return False
        live = set(self._live_here())
        recent = time.time() - self.cap.setup_s
        for sid in [sid for sid, at in self._starting.items() if at <= recent or sid in live]:
            del self._starting[sid]  # streaming now (counted in live), or its stream never came
        return len(live) + len(self._starting) < math.ceil(self.cap.max_live / max(self.instances_alive, 1))

    # --- records ----------------------------------------------------------------------------

    async def record(self, call_sid: str, charge_id: str, direction: str, region: str, scenario_id: str,
                     number_masked: str) -> None:
        """Record a call we placed, before Twilio reports on it."""
        args = (call_sid, charge_id, direction, region, scenario_id, False, number_masked)
        if await self._fetchrow(self._q.calls_record, *args, what=f"call {call_sid}: record (written back later)") is AWAY:
            self._owe("record", call_sid, self._q.calls_record, args)

    async def put_request(self, request_id: str, scenario_id: str, config_json: str, voice: str) -> bool:
        """Remember what a call is for, until its webhook or its stream asks; False if not stored."""
        stored = await self._fetchrow(self._q.call_requests_put, request_id, scenario_id, config_json, voice,
                                      what=f"call request {request_id}: store")
        return stored is not AWAY

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        row = await self._fetchrow(self._q.call_requests_get, request_id,
                                   what=f"call request {request_id}: read (the scenario's defaults are used)")
        return None if row is AWAY or row is None else dict(row)

    async def set_status(self, call_sid: str, status: str, rank: int, *, final_rank: int,
                         reason: str | None = None, charge_id: str | None = None) -> bool:
        """Move a call forward to ``status`` (of ``rank``; ``final_rank`` and above end it);
        False when it was already there or further on."""
        args = (call_sid, status, rank, reason, charge_id, final_rank)
        row = await self._fetchrow(self._q.calls_status, *args, what=f"call {call_sid}: status {status} (written back later)")
        if row is AWAY:
            owed = self._owed.get(("status", call_sid))
            self._owe("status", call_sid, self._q.calls_status, args, replace=owed is None or owed[1][2] < rank)
        return row is not None

    async def set_end_reason(self, call_sid: str, reason: str) -> bool:
        """Fill in why a call ended if nothing said so yet; True when it was filled in."""
        row = await self._fetchrow(self._q.calls_end_reason, call_sid, reason,
                                   what=f"call {call_sid}: end reason (written back later)")
        if row is AWAY:
            self._owe("reason", call_sid, self._q.calls_end_reason, (call_sid, reason), replace=False)
        return row is not None

    async def claim_refund(self, call_sid: str, fallback: str) -> str | None:
        """The call's charge id, the first time only (so exactly one refund is made); while
        PostgreSQL is away, ``fallback`` (the charge the request names)."""
        row = await self._fetchrow(self._q.calls_mark_refunded, call_sid,
                                   what=f"call {call_sid}: refund bookkeeping (refunding {fallback})")
        if row is AWAY:
            return fallback
        return row["charge_id"] if row else None

    async def statuses(self, call_sids: list[str]) -> dict[str, tuple[str, str | None]]:
        """Recorded (status, end reason) of each of ``call_sids`` found; empty while PostgreSQL is away."""
        rows = await self._run(lambda conn: conn.fetch(self._q.calls_statuses, call_sids), [],
                               f"statuses of {len(call_sids)} followed call(s)")
        return {r["call_sid"]: (r["status"], r["end_reason"]) for r in rows}

    async def unfinished(self) -> list[dict[str, Any]]:
        """The records (as ``get`` gives them) of the calls not over yet, on every instance;
        empty while PostgreSQL is away."""
        rows = await self._run(lambda conn: conn.fetch(self._q.calls_unfinished, self.cap.session_s), [],
                               "the calls not over yet")
        return [dict(r) for r in rows]

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        row = await self._fetchrow(self._q.calls_get, call_sid, what=f"call {call_sid}: read")
        return None if row is AWAY or row is None else dict(row)

    async def start_stream(self, jti: str, call_sid: str, expires: float, connected: tuple[str, int]) -> StreamStart:
        """``first`` for the first stream of a call, with a token used for the first time; the call
        is then marked streaming on this instance, and moved to the ``connected`` status (name,
        rank) in the same statement. Not ``first`` for a token spent before, or a call that has
        had its stream (or has ended): one CallSid gets one media stream, ever."""
        args = (jti, call_sid, self.instance_id, connected[1], connected[0])
        row = await self._fetchrow(self._q.calls_stream_start, *args,
                                   what=f"call {call_sid}: stream start (token single use on this instance only)")
        if row is not AWAY:
            return StreamStart(bool(row["first_use"]) and (bool(row["started"]) or not row["known"]), bool(row["moved"]))
        self._owe("stream", call_sid, self._q.calls_stream_start, args)
        now = time.time()
        for old in [j for j, until in self._spent_here.items() if until < now]:
            del self._spent_here[old]
        if jti in self._spent_here:
            return StreamStart(False, False)
        self._spent_here[jti] = expires
        return StreamStart(True, False)

    # --- upkeep -----------------------------------------------------------------------------

    def beat_soon(self) -> None:
        """Heartbeat now rather than at the next round (another instance joined: recount)."""
        self._beat_now.set()

    async def maintain(self, on_reaped: Callable[[str], None], final_rank: int,
                       on_joined: Callable[[], None] = lambda: None) -> None:
        """Background duty until cancelled: say this instance is alive (``on_joined`` after the
        first time), end dead instances' calls (``on_reaped`` tells followers), and write back
        what was admitted while PostgreSQL was away."""
        joined, last_beat = False, float("-inf")
        beating_since: float | None = None  # since when every heartbeat of ours got through
        while True:
            recent = time.time() - self.cap.setup_s
            for sid in [sid for sid, at in self._starting.items() if at <= recent]:
                del self._starting[sid]
            if self.owed and not self._gate.up:
                await self._gate.probe()  # (besides the gate's own, slower, probes)
            if self.owed and self._gate.up:
                await self.write_back()
            # While something is owed, look every WRITE_BACK_POLL_S: the sooner it is written
            # back, the sooner every instance's admissions count it again.
            next_beat = last_beat + HEARTBEAT_S - time.monotonic()
            if next_beat > 0 and not self._beat_now.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._beat_now.wait(), min(WRITE_BACK_POLL_S if self.owed else HEARTBEAT_S,
                                                                      next_beat))
                continue
            self._beat_now.clear()
            last_beat = time.monotonic()
            alive = await self._fetchrow(self._q.instances_heartbeat, self.instance_id, DEAD_AFTER_S,
                                         what="instance heartbeat")
            if alive is AWAY:
                beating_since = None
                continue
            self.instances_alive = int(alive["alive"])
            if not joined:
                joined = True
                on_joined()
            if beating_since is None:
                beating_since = last_beat
            # Another instance's silence means it died only if ours was unbroken meanwhile: after
            # an outage every instance's last heartbeat is old, and the others are back within a
            # probe and a beat. So no one's calls are ended before our own beats span DEAD_AFTER_S
            # (tests/test_instances.py: an outage longer than that ended live calls elsewhere).
            if last_beat - beating_since < DEAD_AFTER_S:
                continue
            reaped = await self._run(lambda conn: conn.fetch(self._q.instances_reap, DEAD_AFTER_S, final_rank),
                                     [], "ending dead instances' calls")
            for row in reaped:
                log.warning("call %s: its instance stopped answering; ended (instance_lost)", row["call_sid"])
                on_reaped(row["call_sid"])

    async def write_back(self) -> None:
        """If anything is owed and PostgreSQL answers: write it back (one writer at a time)."""
        if self.owed and self._gate.up:
            async with self._writing:
                await self._write_back()

    async def _write_back(self) -> None:
        """Admissions first (a call's other statements need its row), then the rest in order;
        stops at the first that PostgreSQL does not take (the next round goes on from there)."""
        admitted = written = 0
        try:
            for call_sid, (args, _) in list(self._admitted_away.items()):
                if await self._fetchrow(self._q.calls_record, *args, what=f"call {call_sid}: write back") is AWAY:
                    return
                del self._admitted_away[call_sid]
                admitted += 1
            for key, (query, args) in list(self._owed.items()):
                if await self._fetchrow(query, *args, what=f"call {key[1]}: write back ({key[0]})") is AWAY:
                    return
                if self._owed.get(key) == (query, args):  # not replaced by a newer one meanwhile
                    del self._owed[key]
                written += 1
        finally:
            if admitted or written:
                log.info("PostgreSQL is back: recorded %d calls admitted and %d other statements made while it "
                         "was away (%d still owed)", admitted, written, self.owed)

    async def leave(self) -> None:
        """This instance stops: it is no longer counted alive."""
        await self._fetchrow(self._q.instances_leave, self.instance_id, what="instance leave")

    async def cleanup(self, retention_days: int = CALL_RETENTION_DAYS, batch: int = 1000) -> int:
        """Delete spent tokens, stale call requests and old call records; returns how many."""
        total = 0
        while True:
            row = await self._fetchrow(self._q.calls_cleanup, retention_days, batch, what="calls cleanup")
            if row is AWAY:
                return total
            total += row["tokens"] + row["requests"] + row["calls"]
            if max(row["tokens"], row["requests"], row["calls"]) < batch:
                return total

"""Call statuses: the one home of their rules.

- The vocabulary (SPEC §6): ``queued`` → ``ringing`` → ``in-progress`` → ``connected``, then
  one final status: ``ended``, ``busy``, ``no-answer``, ``failed`` or ``canceled``.
- Statuses only move forward (``rank``): a duplicate or late one, from Twilio or from another
  instance, changes nothing, in the database (``sql/calls_status.sql``) and on the bus.
- Twilio's ``CallStatus`` words map onto ours (``TWILIO_STATUS``).
- A call that never connected costs nothing: ``busy``, ``no-answer``, ``failed`` and
  ``canceled`` refund its charge, exactly once (``sql/calls_mark_refunded.sql``), and give
  back its place under the cap. A final status is final for charging too: a ``busy`` after
  ``completed`` refunds nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bridge import events

if TYPE_CHECKING:
    from bridge.events import EventBus
    from calls.services import Services
    from db.calls import CallStore

log = logging.getLogger("callgate.status")

STATUS_RANK = {"queued": 0, "ringing": 10, "in-progress": 20, "connected": 30}
FINAL_RANK = 100  # every final status ranks this; the SQL is told so
FINAL_STATUSES = ("ended", "busy", "no-answer", "failed", "canceled")
STATUS_RANK.update(dict.fromkeys(FINAL_STATUSES, FINAL_RANK))
REFUND_STATUSES = frozenset({"busy", "no-answer", "failed", "canceled"})

# Twilio's CallStatus values → ours.
TWILIO_STATUS = {
    "queued": "queued", "initiated": "queued", "ringing": "ringing", "in-progress": "in-progress",
    "answered": "in-progress", "completed": "ended", "busy": "busy", "no-answer": "no-answer",
    "failed": "failed", "canceled": "canceled",
}


def rank(status: str) -> int:
    return STATUS_RANK.get(status, 0)


def is_final(status: str) -> bool:
    return status in FINAL_STATUSES


async def record(store: CallStore, call_sid: str, status: str, reason: str | None) -> bool:
    """Record a status the bridge reached (``connected``, ``ended`` with its reason). True when
    there is news to announce: the status moved forward, or a final status already recorded
    (by Twilio's callback, which often comes first) just got its reason."""
    moved = await store.set_status(call_sid, status, rank(status), final_rank=FINAL_RANK, reason=reason)
    if reason and not moved:
        return await store.set_end_reason(call_sid, reason)
    return moved


async def catch_up(store: CallStore, bus: EventBus) -> int:
    """Tell this instance's followers what they missed while they could not hear the other
    instances (the fan-out's listener was away with PostgreSQL): each followed call that is not
    over yet, whose recorded status moved on, gets that status now. Returns how many did."""
    behind = {e["callSid"]: e["status"] for e in bus.followed_statuses() if not is_final(e["status"])}
    if not behind:
        return 0
    told = 0
    for call_sid, (recorded, reason) in (await store.statuses(list(behind))).items():
        if rank(recorded) > rank(behind[call_sid]):
            bus.publish(events.status_changed(call_sid, recorded, reason if is_final(recorded) else None), remote=True)
            told += 1
    if told:
        log.info("caught up on %d followed call(s) whose status moved on elsewhere meanwhile", told)
    return told


async def on_callback(services: Services, call_sid: str, status: str, named_charge: str | None) -> None:
    """Twilio says ``call_sid`` is now ``status`` (ours, from TWILIO_STATUS): record it,
    announce it if it is news, and refund a call that never connected. ``named_charge``: the
    charge our own callback URL names (a call placed by call.start); other calls are
    charged under their CallSid."""
    changed = await services.store.set_status(call_sid, status, rank(status), final_rank=FINAL_RANK,
                                              charge_id=named_charge)
    if not changed:
        return  # a duplicate, or late: the status it would set (and what it would refund) is past
    services.bus.publish(events.status_changed(call_sid, status))
    if status in REFUND_STATUSES:
        # It never connected: its place under the cap (if it held one) and its charge come back.
        if named_charge is not None:
            await services.store.release_hold(named_charge)
        charge_id = await services.store.claim_refund(call_sid, fallback=named_charge or call_sid)
        if charge_id is not None:
            await services.limiter.refund(charge_id)
            log.info("call %s %s: charge refunded", call_sid, status)

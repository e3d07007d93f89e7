"""The operator's page (/admin) in headless Chromium against a real Callgate, real PostgreSQL,
fake Twilio and the fake model: what an operator sees of live calls, their ends, the limiter;
and, without a browser, what the server gives the page (call.details, /admin/stats).

Screenshots go to test-artifacts/screenshots/admin-*.png (git-ignored); with
CALLGATE_DOCS_SCREENSHOTS=1 they also replace docs/img/admin-*.png, the ones docs/admin.md shows.
The page's tests need Debian's chromium, as tests/test_browser.py does; skipped, saying so,
without it.
"""

from __future__ import annotations

import re

import aiohttp
import orjson

from appkeys import FRONTEND, LIMITER, TOKEN_SECRET
from bridge import tokens
from browsers import needs_chromium, shot
from helpers import PUBLIC_URL, callgate, free_port, proxied, silent_call, wait_until
from tools.fake_realtime import FakeRealtime

TOKEN = "operator-token-0123456789abcdef"
OUTBOUND = "+14155550123"   # placed with call.start
INBOUND = "+14155550177"    # calls in
CALLER_ID = "+14155550000"

async def open_admin(browser, h):
    """A laptop-sized tab on /admin; page errors and CSP violations are collected."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    errors: list = []
    page.on("pageerror", lambda exc: errors.append(exc))
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    await page.goto(h.url + "/admin")
    return page, errors


async def sign_in(page, token: str = TOKEN) -> None:
    await page.fill("#token", token)
    await page.click("#token-btn")


def no_full_number(text: str, *numbers: str) -> bool:
    """None of ``numbers`` appears in ``text``, in any usual spelling (the national digits)."""
    digits = re.sub(r"\D", "", text)
    return not any(n.removeprefix("+1") in digits or n in text for n in numbers)


@needs_chromium
async def test_an_operator_watches_calls_come_and_go(dsn, browser):
    """A wrong token is refused and asked for again; with the right one, an outbound call
    appears live (queued → ringing → connected) with its scenario and its number masked, never
    whole, an inbound one
    joins it, durations run, each ends with its reason and moves to recent outcomes, and the
    limiter's counts and decisions show."""
    port = free_port()
    async with FakeRealtime(reply_text="Hello, how can I help?", pace=0.5) as model, \
            callgate(dsn, model=model, port=port, ADMIN_TOKEN=TOKEN, TWILIO_PHONE_NUMBER_US=CALLER_ID) as h, \
            aiohttp.ClientSession() as session:
        page, errors = await open_admin(browser, h)

        await sign_in(page, "not-the-token")
        error = page.locator("#token-error")
        await error.filter(has_text="not accepted").wait_for()
        assert await page.locator("#dashboard").is_hidden()
        assert await page.locator("#token").get_attribute("aria-invalid") == "true"
        await shot(page, "admin-wrong-token", for_docs=True)

        await sign_in(page)
        await page.wait_for_selector("#conn[data-state=open]")
        assert await error.inner_text() == ""
        assert await page.locator("#live-empty").inner_text() == "No live calls."
        await page.locator("#limiter-fail-mode").filter(has_text="memory").wait_for()
        assert await page.locator("#limiter-rule").inner_text() == "2 calls per number per hour"
        assert await page.locator("#health-status").inner_text() == "Healthy"

        # Someone places a call from the main page's protocol: it shows as queued, at once.
        placer = await session.ws_connect(h.url + "/logs")
        await placer.send_str(orjson.dumps({"type": "call.start", "phoneNumber": OUTBOUND,
                                            "scenarioId": "customer-service",
                                            "config": {"companyName": "Acme Telecom"}}).decode())
        queued = orjson.loads((await placer.receive(timeout=15)).data)
        sid = queued["callSid"]
        row = page.locator(f"#live-calls tr[data-call-sid='{sid}']")
        await page.locator(f"#live-calls tr[data-call-sid='{sid}'][data-status=queued]").wait_for()
        assert "Queued" in await row.inner_text()

        # Twilio says it rings, then the callee answers and the stream opens.
        fake = h.twilio_api.calls[sid]
        await h.twilio_api.post_status_callback(sid, "ringing", send_to=h.url + fake.status_callback.removeprefix(PUBLIC_URL))
        await page.locator(f"#live-calls tr[data-call-sid='{sid}'][data-status=ringing]").wait_for()
        outbound = h.call(audio=b"", call_sid=sid, direction="outbound-api", to=OUTBOUND)
        await outbound.webhook(path=fake.url.removeprefix(PUBLIC_URL))
        await outbound.connect()
        await page.locator(f"#live-calls tr[data-call-sid='{sid}'][data-status=connected]").wait_for(timeout=10_000)
        await row.filter(has_text="Customer service").filter(has_text="+1415•••0123 · Outbound · US").wait_for()

        inbound, _ = await silent_call(h, from_=INBOUND)
        in_row = page.locator(f"#live-calls tr[data-call-sid='{inbound.call_sid}']")
        await in_row.filter(has_text="Job interview").filter(has_text="+1415•••0177 · Inbound · US").wait_for(timeout=10_000)
        assert await page.locator("#live-count").inner_text() == "2"
        # A duration is a clock: it moves on by itself.
        duration = row.locator("td.duration")
        first = await duration.inner_text()
        assert re.fullmatch(r"\d+:\d\d", first)
        await duration.filter(has_not_text=first).wait_for(timeout=5_000)
        await page.locator("#limiter-calls").filter(has_text="2").wait_for(timeout=10_000)
        await page.locator("#decisions tr[data-result=allowed]").first.wait_for()
        await shot(page, "admin-live", for_docs=True)

        # The caller hangs up one; the other is ended from the placing page.
        await inbound.stop()
        await placer.send_str(orjson.dumps({"type": "call.end", "callSid": sid}).decode())
        await outbound.wait_closed()
        recent = page.locator("#recent-calls")
        await recent.locator(f"tr[data-call-sid='{inbound.call_sid}']").filter(has_text="caller_hangup").wait_for(timeout=10_000)
        ended = recent.locator(f"tr[data-call-sid='{sid}']")
        await ended.filter(has_text="ended_by_client").wait_for(timeout=10_000)
        assert "Customer service" in await ended.inner_text() and "Ended" in await ended.inner_text()
        assert re.search(r"\b\d+:\d\d\b", await ended.locator("td.duration").inner_text())
        await page.locator("#live-empty").wait_for()
        assert await page.locator("#live-calls tbody tr").count() == 0
        await page.locator("#health-calls").filter(has_text=re.compile(r"^0$")).wait_for(timeout=10_000)
        await shot(page, "admin-ended", for_docs=True)

        text, html = await page.locator("body").inner_text(), await page.content()
        assert no_full_number(text, OUTBOUND, INBOUND, CALLER_ID), text
        assert no_full_number(html, OUTBOUND, INBOUND, CALLER_ID)
        await placer.close()
        assert not errors


@needs_chromium
async def test_the_feed_comes_back_after_a_drop_and_the_token_stays_in_the_tab(dsn, browser):
    """The server drops the page's socket: the page says so, reconnects on its own and keeps
    showing the live call it knew (confirmed again); a call after that still appears. A reload
    keeps the tab signed in, a new tab asks again, and nothing is in cookies or localStorage."""
    port = free_port()
    async with FakeRealtime(reply_text="Hello.", pace=0.5) as model, \
            callgate(dsn, model=model, port=port, ADMIN_TOKEN=TOKEN) as h:
        page, errors = await open_admin(browser, h)
        await sign_in(page)
        await page.wait_for_selector("#conn[data-state=open]")
        first, _ = await silent_call(h, from_=INBOUND)
        row = page.locator(f"#live-calls tr[data-call-sid='{first.call_sid}']")
        await page.locator(f"#live-calls tr[data-call-sid='{first.call_sid}'][data-status=connected]").wait_for(
            timeout=10_000)

        dropped = page.wait_for_selector("#conn[data-state=closed]")
        for client in list(h.app[FRONTEND].sockets.values()):
            await client.close(timeout=1.0)
        await dropped
        assert "reconnecting" in await page.locator("#conn").inner_text()
        await page.wait_for_selector("#conn[data-state=open]", timeout=15_000)
        await page.locator("#live-calls tr[data-stale]").wait_for(state="detached", timeout=10_000)
        assert await row.count() == 1

        second, _ = await silent_call(h, from_=OUTBOUND)
        await page.locator(f"#live-calls tr[data-call-sid='{second.call_sid}']").wait_for(timeout=10_000)

        await page.reload()
        await page.wait_for_selector("#conn[data-state=open]")
        assert await page.locator("#token-form").is_hidden()
        other = await page.context.new_page()
        await other.goto(h.url + "/admin")
        await other.locator("#token").wait_for()
        assert await other.locator("#dashboard").is_hidden()
        stored = await page.context.storage_state()
        assert stored["cookies"] == []
        assert all(not origin.get("localStorage") for origin in stored["origins"])
        assert TOKEN not in page.url
        assert not errors


async def receive_until(ws, predicate, timeout: float = 10) -> list[dict]:
    """The messages ``ws`` gets, up to and including the first ``predicate`` takes."""
    seen = []
    while not seen or not predicate(seen[-1]):
        seen.append(orjson.loads((await ws.receive(timeout=timeout)).data))
    return seen


async def test_the_monitor_gets_each_calls_record_and_a_follower_does_not(dsn):
    """The all-calls monitor gets call.details (scenario, direction, region, the number masked, times)
    after a call's first status and again at its end; a browser following that one call with its
    token gets the same statuses and no call.details."""
    async with FakeRealtime(reply_text="Hello.") as model, callgate(dsn, model=model, ADMIN_TOKEN=TOKEN) as h, \
            aiohttp.ClientSession() as session:
        monitor = await session.ws_connect(h.url + "/logs")
        await monitor.send_str(orjson.dumps({"type": "call.subscribe", "all": True, "adminToken": TOKEN}).decode())
        call = h.call(audio=b"", from_=INBOUND)
        await call.webhook()
        await call.connect()
        seen = await receive_until(monitor, lambda m: m["type"] == "call.details")
        follower = await session.ws_connect(h.url + "/logs")
        await follower.send_str(orjson.dumps({"type": "call.subscribe", "callSid": call.call_sid,
                                              "token": tokens.subscription_token(h.app[TOKEN_SECRET], call.call_sid)}).decode())
        followed = await receive_until(follower, lambda m: m.get("status") == "connected")
        await call.stop()
        seen += await receive_until(monitor, lambda m: m["type"] == "call.details" and m["endedAt"] is not None)
        followed += await receive_until(follower, lambda m: m.get("status") == "ended")
        await monitor.close()
        await follower.close()
    statuses = [(m["status"], m.get("reason")) for m in seen if m["type"] == "call.status_changed"]
    assert statuses == [("connected", None), ("ended", "caller_hangup")]
    first, last = [m for m in seen if m["type"] == "call.details"]
    assert (first["callSid"], first["scenarioId"], first["direction"], first["region"], first["number"]) == (
        call.call_sid, "job-interview", "inbound", "US", "+1415•••0177")
    assert first["connectedAt"] is not None and first["endedAt"] is None
    assert last["connectedAt"] == first["connectedAt"] and last["endedAt"] >= last["connectedAt"]
    assert abs(last["serverTime"] - last["endedAt"]) < 10_000
    assert no_full_number(orjson.dumps(seen).decode(), INBOUND)
    assert [m["status"] for m in followed if m["type"] == "call.status_changed"] == ["connected", "ended"]
    assert "call.details" not in {m["type"] for m in followed}


async def test_admin_stats_tell_the_fail_mode_and_decisions_during_an_outage(dsn):
    """/admin/stats carries the fail mode and this instance's limiter decisions; with PostgreSQL
    gone it answers 503 and still says them, with the refusal the fail mode made."""
    async with proxied(dsn) as proxy:
        async with callgate(proxy.dsn, ADMIN_TOKEN=TOKEN, LIMITER_FAIL_MODE="closed", LIMITER_TIMEOUT_MS="300") as h, \
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            async def stats() -> tuple[int, dict]:
                async with session.get(h.url + "/admin/stats") as resp:
                    return resp.status, await resp.json()

            await h.app[LIMITER].hit(INBOUND, "CA-admin-1")
            status, up = await stats()
            proxy.stall()  # a black hole: connections open, nothing ever answers
            await h.app[LIMITER].hit(INBOUND, "CA-admin-2")
            status_away, away = await wait_until(lambda: _when(stats(), lambda answer: answer[0] == 503),
                                                 timeout=10, what="/admin/stats to answer 503")
            proxy.restore()
    assert status == 200 and up["failMode"] == "closed" and up["database"] == "ok" and up["callsInWindow"] == 1
    assert {"op": "hit", "result": "allowed", "source": "database", "count": 1} in up["decisions"]
    assert status_away == 503 and away["database"] == "unavailable" and away["failMode"] == "closed"
    assert {"op": "hit", "result": "limiter_unavailable", "source": "closed", "count": 1} in away["decisions"]
    assert "callsInWindow" not in away


async def _when(answer, accept):
    """``answer`` (awaited) if ``accept`` takes it, else None: for wait_until."""
    value = await answer
    return value if accept(value) else None

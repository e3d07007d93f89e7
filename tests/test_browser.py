"""The web page in headless Chromium against a real server, fake Twilio and the fake model.

Screenshots of each state go to test-artifacts/screenshots/ (git-ignored) for a person to see.
Needs Debian's chromium (/usr/bin/chromium; CI installs it); skipped, saying so, without it.
"""

from __future__ import annotations

import orjson

from appkeys import LIMITER
from browsers import needs_chromium, shot
from helpers import callgate, free_port
from tools.fake_realtime import FakeRealtime

NUMBER = "+14155550123"

pytestmark = needs_chromium



async def test_a_person_checks_a_number_places_a_call_and_hits_the_limit(dsn, browser):
    """Type a number → green with the right count; place a call → status reaches connected and
    transcript lines appear; exhaust the limit → red with a countdown and a disabled button."""
    port = free_port()
    async with FakeRealtime(reply_text="Hello Ada, thanks for making time today.", pace=0.5) as model, \
            callgate(dsn, model=model, port=port, TWILIO_PHONE_NUMBER_US="+14155550000") as h:
        page = await browser.new_page(viewport={"width": 390, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(exc))
        page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
        await page.goto(h.url + "/")
        await page.wait_for_selector("#conn[data-state=open]")
        await page.fill("#phone", NUMBER)
        indicator = page.locator("#limit-indicator")
        await page.wait_for_selector("#limit-indicator[data-state=ok]")
        assert "2" in await indicator.inner_text()
        await shot(page, "1-number-ok")

        await page.select_option("#scenario", "job-interview")
        await page.fill("#scenario-fields [name=jobTitle]", "Backend engineer")
        await page.fill("#scenario-fields [name=company]", "A")
        assert "at least 2 characters" in await page.locator("#call-hint").inner_text()
        await page.fill("#scenario-fields [name=company]", "Acme")
        await page.fill("#scenario-fields textarea[name=jobDescription]", "Python services.\nPostgreSQL.")
        await page.select_option("#voice", "cedar")
        await page.click("#call-btn")
        created = await h.twilio_api.wait_for_request(lambda r: r.path.endswith("/Calls.json"), timeout=10)
        await page.wait_for_selector("#call-status[data-status=queued]")
        await shot(page, "2-call-queued")

        # Twilio calls the number and fetches our TwiML: the simulator plays that part.
        call_sid = next(iter(h.twilio_api.calls))
        path = created.value("Url").removeprefix("https://callgate.test")
        sim = h.call(audio=b"", call_sid=call_sid, direction="outbound-api", to=NUMBER)
        twiml = await sim.webhook(path=path)
        assert twiml.parameters["scenarioId"] == "job-interview" and twiml.parameters["voice"] == "cedar"
        assert orjson.loads(twiml.parameters["config"]) == {
            "jobTitle": "Backend engineer", "company": "Acme", "jobDescription": "Python services.\nPostgreSQL."}
        await sim.connect()
        await page.wait_for_selector("#call-status[data-status=connected]", timeout=10_000)
        await page.wait_for_selector("#transcript li[data-role=assistant]", timeout=10_000)
        # (Locators, not wait_for_function: the page's CSP forbids evaluating strings.)
        await page.locator("#transcript li[data-role=assistant]").filter(
            has_text="thanks for making time").wait_for(timeout=10_000)
        await shot(page, "3-call-connected")

        await page.click("#hangup-btn")
        await page.wait_for_selector("#call-status[data-status=ended]", timeout=10_000)
        await sim.wait_closed()

        # One call used: the last one is amber; a second charge elsewhere exhausts the number.
        await page.fill("#phone", "")
        await page.fill("#phone", NUMBER)
        await page.wait_for_selector("#limit-indicator[data-state=last]")
        await shot(page, "4-last-call")
        await h.app[LIMITER].hit(NUMBER, "CA-elsewhere")
        await page.fill("#phone", "")
        await page.fill("#phone", "(415) 555-0123")
        await page.wait_for_selector("#limit-indicator[data-state=limited]")
        countdown = page.locator("#limit-countdown")
        first = await countdown.inner_text()
        assert first.count(":") >= 1
        # A countdown is a clock: it must move on by itself.
        await page.locator("#limit-countdown").filter(has_not_text=first).wait_for(timeout=5_000)
        assert await page.locator("#call-btn").is_disabled()
        await shot(page, "5-limited")

        await page.set_viewport_size({"width": 1280, "height": 900})
        await shot(page, "6-limited-laptop")
        assert not errors

"""bridge/responses.py: when the bridge may ask for a response, as plain state."""

from __future__ import annotations

from bridge.responses import ASK_PREFIX, MAX_SENDS, Asker, Outcome


def test_an_ask_goes_out_at_once_when_nothing_is_active():
    """With no response active, an ask is sent now, under an event_id of ours."""
    asker = Asker()
    event_id = asker.ask()
    assert event_id is not None and event_id.startswith(ASK_PREFIX)
    assert asker.created("resp_1") is True and not asker.pending


def test_an_ask_while_a_response_is_active_waits_for_its_end():
    """An ask during a response is held, and sent when that response is done."""
    asker = Asker()
    asker.created("resp_vad")  # server VAD started one by itself
    assert asker.ask("cg_item_1") is None
    asker.item_settled("cg_item_1")
    assert asker.done("resp_vad") is not None
    assert asker.created("resp_2") is True


def test_a_refused_ask_is_sent_again_after_the_active_response():
    """A refusal (another response was active) keeps the ask; it goes out once that ends."""
    asker = Asker()
    first = asker.ask("cg_item_1")
    asker.created("resp_vad")  # its response.created came before our ask was processed
    asker.item_settled("cg_item_1")
    asker.refused(first)
    assert asker.pending
    again = asker.done("resp_vad")
    assert again is not None and again != first
    assert asker.created("resp_ours") is True and not asker.pending


def test_a_response_that_started_before_the_item_was_added_does_not_answer_it():
    """A response created before the server added our item cannot have seen it."""
    asker = Asker()
    asker.ask("cg_item_1")
    assert asker.created("resp_early") is False and asker.pending
    asker.item_settled("cg_item_1")
    assert asker.done("resp_early") is not None


def test_later_asks_merge_into_one():
    """Two asks while a response is active lead to one response.create, not two."""
    asker = Asker()
    asker.created("resp_1")
    asker.ask("cg_item_1")
    asker.ask("cg_item_2")
    asker.item_settled("cg_item_1")
    asker.item_settled("cg_item_2")
    assert asker.done("resp_1") is not None
    assert asker.created("resp_2") is True
    assert asker.done("resp_2") is None


def test_a_retry_waits_for_its_release():
    """After a failure the ask is owed again, but only goes out when the back-off ends."""
    asker = Asker()
    asker.ask()
    asker.created("resp_1")
    asker.done("resp_1")
    asker.retry_later()
    assert asker.ask() is None  # held: merged into the retry
    assert asker.release() is not None


def test_speech_during_a_back_off_answers_the_retry():
    """A response the caller's speech started during the back-off answers the retry."""
    asker = Asker()
    asker.retry_later()
    assert asker.created("resp_vad") is True
    asker.done("resp_vad")
    assert asker.release() is None


def test_outcomes_read_every_status_the_sdk_defines():
    """response.done → status, reason, error type and code."""
    failed = Outcome.of({"response": {"id": "r1", "status": "failed", "status_details": {
        "type": "failed", "error": {"type": "server_error", "code": "server_error"}}}})
    cut = Outcome.of({"response": {"id": "r2", "status": "incomplete", "status_details": {
        "type": "incomplete", "reason": "content_filter"}}})
    plain = Outcome.of({"response": {"id": "r3", "status": "completed", "status_details": None}})
    assert (failed.failed, failed.error_type, failed.error_code) == (True, "server_error", "server_error")
    assert (cut.status, cut.reason, cut.failed) == ("incomplete", "content_filter", False)
    assert (plain.status, plain.reason, plain.error_code) == ("completed", None, None)


def test_an_ask_waiting_when_a_response_fails_goes_out_with_the_retry():
    """A keypress asked for during a response that then fails is answered by the retry, once
    the back-off is over: not lost, not sent twice."""
    asker = Asker()
    asker.created("resp_1")
    item = asker.new_item_id()
    assert asker.ask(item) is None
    asker.item_settled(item)
    asker.retry_later()
    assert asker.done("resp_1") is None  # held for the back-off
    assert asker.release() is not None
    assert asker.created("resp_2") is True and not asker.pending


def test_an_item_the_server_refused_or_confirmed_early_does_not_block_the_ask():
    """An item confirmed before its ask, or refused (never to be added), settles it; items are
    numbered, so confirming a later one settles the earlier ones too."""
    asker = Asker()
    first, second = asker.new_item_id(), asker.new_item_id()
    asker.item_settled(second)  # (confirmed before we asked, and it settles the first too)
    asker.ask(first)
    assert asker.created("resp_1") is True


def test_an_ask_nobody_answers_is_dropped_after_a_few_sends():
    """An ask whose item never settles stops after MAX_SENDS response.creates instead of
    asking after every response for ever."""
    asker = Asker()
    sends = [asker.ask(asker.new_item_id())]
    for k in range(10):
        asker.created(f"resp_{k}")
        sends.append(asker.done(f"resp_{k}"))
    assert sum(s is not None for s in sends) == MAX_SENDS
    assert not asker.pending and asker.dropped == 1


def test_nothing_is_asked_while_the_caller_speaks():
    """Asks wait while the caller speaks; the response to the caller's turn answers them."""
    asker = Asker()
    asker.caller_speaking(True)
    item = asker.new_item_id()
    assert asker.ask(item) is None
    asker.item_settled(item)
    asker.caller_speaking(False)
    assert asker.created("resp_turn") is True

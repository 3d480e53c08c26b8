"""Side effects after commit run on the background thread, in order, only for committed work, and
those of a busy key at most once per interval."""

from __future__ import annotations

import operator
import threading
import time

import pytest
from django.db import transaction

from sessions_app import background

pytestmark = pytest.mark.django_db(transaction=True)


def test_jobs_run_after_commit_in_order_off_the_committing_thread():
    ran: list[tuple[str, bool]] = []
    with transaction.atomic():
        background.after_commit(lambda: ran.append(("first", threading.current_thread() is threading.main_thread())))
        background.after_commit(lambda: ran.append(("second", threading.current_thread() is threading.main_thread())))
        assert ran == []  # nothing before commit
    assert background.drain(5)
    assert ran == [("first", False), ("second", False)]


def test_a_rolled_back_transaction_runs_nothing():
    ran: list[str] = []
    with pytest.raises(RuntimeError), transaction.atomic():
        background.after_commit(lambda: ran.append("never"))
        raise RuntimeError("roll back")
    assert background.drain(5)
    assert ran == []


def test_a_failing_job_does_not_stop_the_ones_after_it(caplog):
    ran: list[str] = []

    def broken() -> None:
        raise ValueError("boom")

    background.submit(broken)
    background.submit(lambda: ran.append("after"))
    assert background.drain(5)
    assert ran == ["after"]
    assert "background job" in caplog.text


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_coalesced_items_go_out_at_once_then_together_when_the_interval_is_over():
    sent: list[tuple[str, list[int], float]] = []

    def send_for(key: str):
        return lambda item: sent.append((key, item, time.monotonic()))

    for number in range(1, 5):
        background.after_commit_coalesced("busy", [number], send_for("busy"), merge=operator.add, interval=0.3)
    background.after_commit_coalesced("other", [9], send_for("other"), merge=operator.add, interval=0.3)
    _wait_for(lambda: len(sent) == 3)

    first, other, rest = sent
    assert first[:2] == ("busy", [1]) and other[:2] == ("other", [9])  # first items of a key: at once
    assert rest[:2] == ("busy", [2, 3, 4])  # the rest: merged, in order, once
    assert rest[2] - first[2] >= 0.29
    time.sleep(0.4)
    assert len(sent) == 3


def test_drain_sends_what_waits_for_its_interval_and_a_rollback_sends_nothing():
    sent: list[list[int]] = []
    with pytest.raises(RuntimeError), transaction.atomic():
        background.after_commit_coalesced("key", [0], sent.append, merge=operator.add, interval=60)
        raise RuntimeError("roll back")
    for number in (1, 2, 3):
        background.after_commit_coalesced("key", [number], sent.append, merge=operator.add, interval=60)
    assert background.drain(5)
    assert sent == [[1], [2, 3]]

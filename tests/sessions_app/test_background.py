"""Side effects after commit run on the background thread, in order, and only for committed work."""

from __future__ import annotations

import threading

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

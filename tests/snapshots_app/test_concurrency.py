"""Many writers on one session against the real database: gap-free, no duplicates, nothing lost."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from sessions_app.errors import IdempotencyKeyReused, VersionConflict
from sessions_app.models import AuditEvent, WorkflowSession
from sessions_app.selectors import removed_numbers
from snapshots_app.models import Version
from snapshots_app.selectors import version_state
from snapshots_app.services import snapshot_fork, snapshot_record
from tests.conftest import clear_cache
from tests.factories import agent_state

pytestmark = pytest.mark.django_db(transaction=True)

WRITERS = 8


def run_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            results[index] = target(index)
        except Exception as exc:  # noqa: BLE001 - collected and asserted on by the test
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_writers_get_gap_free_versions_and_lose_nothing(session):
    per_writer = 6

    def write(index: int) -> list[int]:
        numbers = []
        for step in range(per_writer):
            # Shared history (overlapping new nodes across writers) plus a writer-specific part.
            state = {**agent_state(step, history=60), "writer": index, "step": step}
            numbers.append(snapshot_record(session=session, state=state).number)
        return numbers

    results = run_threads(WRITERS, write)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    numbers = sorted(n for r in results for n in r)
    assert numbers == list(range(1, WRITERS * per_writer + 1))
    session.refresh_from_db()
    assert session.head_number == session.version_count == WRITERS * per_writer
    clear_cache()
    seen = set()
    for version in Version.objects.filter(session=session).select_related("session"):
        state = version_state(version)
        seen.add((state["writer"], state["step"]))
    assert seen == {(w, s) for w in range(WRITERS) for s in range(per_writer)}


def test_racing_writers_with_the_same_expected_version_one_wins(session):
    snapshot_record(session=session, state={"n": 0})

    def write(index: int) -> int:
        return snapshot_record(session=session, state={"n": index + 1}, expected_version=1).number

    results = run_threads(WRITERS, write)
    winners = [r for r in results if isinstance(r, int)]
    conflicts = [r for r in results if isinstance(r, VersionConflict)]
    assert winners == [2]
    assert len(conflicts) == WRITERS - 1
    assert Version.objects.filter(session=session).count() == 2


def test_retries_with_one_idempotency_key_record_once(session):
    def write(index: int) -> int:
        return snapshot_record(session=session, state={"step": "same"}, idempotency_key="retry-me").pk

    results = run_threads(WRITERS, write)
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1
    assert WorkflowSession.objects.get(pk=session.pk).head_number == 1


def test_concurrent_retries_of_a_fork_create_one_session(session):
    """A client that timed out retries with the same key while the first call still runs."""
    snapshot_record(session=session, state={"a": 1})

    def fork(index: int) -> Any:
        return snapshot_fork(session=session, from_version=1, reason="try", idempotency_key="fork-1").pk

    results = run_threads(WRITERS, fork)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len(set(results)) == 1
    assert WorkflowSession.objects.count() == 2
    with pytest.raises(IdempotencyKeyReused, match="reason"):
        snapshot_fork(session=session, from_version=1, reason="else", idempotency_key="fork-1")
    snapshot_record(session=session, state={"a": 2})
    with pytest.raises(IdempotencyKeyReused, match="version"):
        snapshot_fork(session=session, from_version=2, reason="try", idempotency_key="fork-1")
    with pytest.raises(IdempotencyKeyReused, match="external id"):
        snapshot_fork(session=session, from_version=1, reason="try", idempotency_key="fork-1", external_id="mine")
    assert WorkflowSession.objects.count() == 2


def _waiting_on_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                       "AND datname = current_database()")
        return int(cursor.fetchone()[0])


def test_a_bulk_pin_and_a_pin_of_another_session_of_its_project_do_not_deadlock(project):
    """An admin's select-all pin waits on a session an engine is writing; meanwhile an operator pins
    (or labels, rewinds, archives) a version of a later session of the same project. The bulk pin
    must not hold the project's row while it waits: the single pin locks its session, then the
    project, and the bulk pin would wait on that session in turn (PostgreSQL aborted one of them)."""
    import time

    from django.db import transaction

    from snapshots_app.services import version_pin, versions_pin
    from tests.factories import make_session

    sessions = sorted((make_session(project, f"run-{i}") for i in range(3)), key=lambda s: str(s.pk))
    for session in sessions:
        snapshot_record(session=session, state={"n": 1})
    _first, busy, last = sessions
    held, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def in_thread(name: str, call: Callable[[], Any]) -> threading.Thread:
        def run() -> None:
            try:
                results[name] = call()
            except Exception as exc:  # noqa: BLE001 - asserted on below
                results[name] = exc
            finally:
                connection.close()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def engine_writing() -> None:  # holds the busy session's row, as a write in progress does
        with transaction.atomic():
            WorkflowSession.objects.select_for_update(of=("self",)).get(pk=busy.pk)
            held.set()
            release.wait(10)

    def wait_until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    threads = [in_thread("engine", engine_writing)]
    assert held.wait(5)
    threads.append(in_thread("bulk", lambda: versions_pin(
        versions=Version.objects.filter(session__in=sessions), pinned=True, actor_label="admin")))
    wait_until(lambda: _waiting_on_locks() >= 1)  # the bulk pin waits on the busy session
    one = Version.objects.select_related("session__project").get(session=last, number=1)
    threads.append(in_thread("single", lambda: version_pin(version=one, pinned=True, actor_label="operator")))
    wait_until(lambda: "single" in results or _waiting_on_locks() >= 2)
    release.set()
    for thread in threads:
        thread.join(30)

    assert not isinstance(results["single"], Exception), results["single"]
    assert not isinstance(results["bulk"], Exception), results["bulk"]
    # Pinned once each, whichever came first (the single pin of `last` usually does: the bulk then
    # finds it pinned, and leaves it unaudited).
    assert results["bulk"].done + results["bulk"].unchanged == 3
    assert AuditEvent.objects.filter(action="version.pin").count() == 3
    assert Version.objects.filter(session__in=sessions, pinned=True).count() == 3


def test_trims_racing_writers_remove_only_versions_their_caller_saw_and_audit_each(session):
    """A trim keeps the head it names: run between writers, it either removes versions older than the
    head its caller read, audited, or is refused (head_not_kept) and removes nothing. Every write
    survives unless an audited trim names it, and the newest write is the head."""
    from sessions_app.errors import HeadNotKept
    from snapshots_app.services import session_trim

    per_writer = 8
    snapshot_record(session=session, state={"writer": -1, "step": 0})

    def work(index: int) -> Any:
        if index == WRITERS - 1:  # the trimmer, until it has removed something (the writers done, at last)
            outcomes = {"removed": 0, "refused": 0}
            for attempt in range(500):
                if attempt >= per_writer * 2 and outcomes["removed"]:
                    break
                seen = WorkflowSession.objects.get(pk=session.pk).head_number
                try:
                    outcomes["removed"] += len(session_trim(session=session, keep=[seen], reason="newest only").removed)
                except HeadNotKept:
                    outcomes["refused"] += 1
            return outcomes
        return [snapshot_record(session=session, state={"writer": index, "step": step}).number
                for step in range(per_writer)]

    results = run_threads(WRITERS, work)
    assert [r for r in results if isinstance(r, Exception)] == []
    written = {n for r in results[:-1] for n in r} | {1}
    assert written == set(range(1, (WRITERS - 1) * per_writer + 2))  # gap-free numbers, none lost in a race
    removed = [n for event in AuditEvent.objects.filter(action="session.trim") for n in removed_numbers(event.details)]
    remaining = set(Version.objects.filter(session=session).values_list("number", flat=True))
    assert len(removed) == len(set(removed)) and remaining.isdisjoint(removed)
    assert remaining | set(removed) == written
    assert results[-1]["removed"] == len(removed) > 0
    session.refresh_from_db()
    assert session.head_number == max(written) and session.version_count == len(remaining)
    clear_cache()
    assert version_state(Version.objects.select_related("session").get(session=session, number=max(written)))["step"] \
        == per_writer - 1

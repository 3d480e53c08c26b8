"""Lifecycle work racing user actions on real PostgreSQL: a retention run that removes a version
while a rewind, fork, pin or label of that very version waits for it, and a session deletion
racing a write. Each side runs on its own thread and connection; the test holds the first one's
transaction open until the second is seen waiting on a lock, so the interleaving is the racy one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction

from sessions_app.errors import SessionNotFound, VersionNotFound
from sessions_app.models import AuditEvent, Project, WorkflowSession
from sessions_app.services import session_delete
from snapshots_app.compaction import _Remover, _retention_apply_session, retention_policy_set
from snapshots_app.models import StateNode, Version
from snapshots_app.services import (
    session_trim,
    snapshot_fork,
    snapshot_record,
    snapshot_rewind,
    version_label,
    version_pin,
)
from tests.locks import someone_waits_on_a_lock
from tests.workers.builders import bulky_state, read_all, record_history

pytestmark = pytest.mark.django_db(transaction=True)


def _someone_waits_on_a_lock(finished: threading.Thread, timeout: float = 20) -> None:
    """Return once the racing call is blocked on a lock, or `finished` without waiting for one."""
    if not someone_waits_on_a_lock(finished, timeout):
        assert not finished.is_alive(), "the racing call is stuck, and not on a lock"


def _race(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run `first` in a transaction on one thread; once it is done (uncommitted), start `second` on
    another, wait until `second` is blocked on a lock, then commit `first`. Returns both outcomes
    (an exception is returned, not raised)."""
    done, release = threading.Event(), threading.Event()
    results: list[Any] = [None, None]

    def run_first() -> None:
        try:
            with transaction.atomic():
                results[0] = first()
                done.set()
                release.wait(30)
        except Exception as exc:  # noqa: BLE001 - asserted on by the test
            results[0] = exc
        finally:
            done.set()
            connection.close()

    def run_second() -> None:
        done.wait(30)
        try:
            results[1] = second()
        except Exception as exc:  # noqa: BLE001 - asserted on by the test
            results[1] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run_first), threading.Thread(target=run_second)]
    for thread in threads:
        thread.start()
    done.wait(30)
    try:
        _someone_waits_on_a_lock(threads[1])
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    return results[0], results[1]


def _retention_removing(project: Project, number: int) -> tuple[WorkflowSession, Version, Callable[[], list[int]]]:
    """A session of 5 versions and a retention step (as compaction runs it) that removes `number`."""
    session = record_history(project, "race", 5)
    policy = retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    doomed = Version.objects.select_related("session__project").get(session=session, number=number)

    def retention() -> list[int]:
        return _retention_apply_session(session.project_id, session.pk, [doomed.pk], policy, _Remover(actor_label="test"))

    return session, doomed, retention


@pytest.mark.parametrize("action", ["rewind", "fork"])
def test_a_rewind_or_fork_of_a_version_retention_is_removing_is_a_404_not_a_failed_commit(project, action):
    session, doomed, retention = _retention_removing(project, 2)

    def act() -> Any:
        if action == "rewind":
            return snapshot_rewind(session=session, to_version=2, reason="back to v2")
        return snapshot_fork(session=session, from_version=2, reason="try v2 again")

    removed, outcome = _race(retention, act)

    assert removed == [2]
    # Before the fix: an IntegrityError at commit (the new version's parent was gone; a 500) for the
    # rewind, a deadlock (a 503) for the fork.
    assert isinstance(outcome, VersionNotFound), outcome
    assert not Version.objects.filter(pk=doomed.pk).exists()
    assert WorkflowSession.objects.filter(project=project).count() == 1  # no half-made fork
    assert not AuditEvent.objects.filter(action__in=["session.rewind", "session.fork"]).exists()


@pytest.mark.parametrize("action", ["pin", "label"])
def test_a_pin_or_label_of_a_version_retention_is_removing_is_a_404_not_a_lost_pin(project, action):
    _, doomed, retention = _retention_removing(project, 2)

    def act() -> Version:
        if action == "pin":
            return version_pin(version=doomed, pinned=True)
        return version_label(version=doomed, label="keep this one")

    removed, outcome = _race(retention, act)

    assert removed == [2]
    # Before the fix the call answered the version pinned (and audited it) although it was gone.
    assert isinstance(outcome, VersionNotFound), outcome
    assert not AuditEvent.objects.filter(action__in=["version.pin", "version.label"]).exists()


def test_a_fork_that_commits_first_keeps_its_source_from_retention(project):
    session = record_history(project, "race", 5)
    policy = retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    source = Version.objects.get(session=session, number=2)

    def retention() -> list[int]:
        return _retention_apply_session(project.pk, session.pk, [source.pk], policy, _Remover(actor_label="test"))

    fork, removed = _race(lambda: snapshot_fork(session=session, from_version=2, reason="branch"), retention)

    assert removed == [] and Version.objects.filter(pk=source.pk).exists()
    assert Version.objects.get(session=fork, number=1).parent_id == source.pk


def test_deleting_a_session_while_a_write_is_in_flight_deletes_that_write_too(project, user):
    session = record_history(project, "gone", 3)
    keep = record_history(project, "keep", 2)

    def write() -> int:
        return snapshot_record(session=session, state=bulky_state("gone", 4), step="s4").number

    written, deleted = _race(write, lambda: session_delete(session=session, reason="customer asked", actor=user))

    # Before the fix the deletion removed v1-v3, then waited for the session row behind the writer,
    # which waited for v3 (its parent): a deadlock, and the deletion failed (503).
    assert written == 4 and deleted is None
    assert not WorkflowSession.objects.filter(external_id="gone").exists()
    assert not Version.objects.filter(session__external_id="gone").exists()
    event = AuditEvent.objects.get(action="session.delete")
    assert (event.actor, event.reason, event.details["versions"]) == (user, "customer asked", 4)
    assert set(read_all(project)) == {("keep", 1), ("keep", 2)} and keep.pk


def test_a_write_or_a_second_deletion_behind_a_deletion_is_a_404(project, user):
    session = record_history(project, "gone", 2)
    nodes = StateNode.objects.filter(project=project).count()

    def own(session: WorkflowSession) -> WorkflowSession:
        return WorkflowSession.objects.get(pk=session.pk)  # each request loads its own copy

    def write() -> int:
        return snapshot_record(session=own(session), state=bulky_state("gone", 3)).number

    first = own(session)
    deleted, written = _race(lambda: session_delete(session=first, reason="first", actor=user), write)
    assert deleted is None and isinstance(written, SessionNotFound), written
    assert StateNode.objects.filter(project=project).count() == nodes  # the refused write stored nothing

    again = record_history(project, "twice", 2)
    one, other = own(again), own(again)
    first_delete, second_delete = _race(lambda: session_delete(session=one, reason="first", actor=user),
                                        lambda: session_delete(session=other, reason="second", actor=user))
    # Before the fix the second deletion went through too: a second audit event for one deletion.
    assert first_delete is None and isinstance(second_delete, SessionNotFound), second_delete
    assert list(AuditEvent.objects.filter(action="session.delete", target_id=str(again.pk)).values_list(
        "reason", flat=True)) == ["first"]


def test_writes_go_on_while_garbage_collection_waits_for_an_import_to_commit(project, settings, tmp_path):
    """An import stores a whole file in one transaction, holding the project's write lock (shared)
    until it commits. A garbage collection (after any session's deletion, or the daily compaction)
    queued its exclusive request behind it, and PostgreSQL queued every writer's request behind that
    one: engines' writes to the project stalled until the import committed (minutes for a big file)."""
    import time
    from pathlib import Path

    from snapshots_app.compaction import compaction_run
    from snapshots_app.transfer import transfer_export_run, transfer_import_run
    from tests.factories import make_project, make_session

    settings.VAR_DIR = tmp_path
    source = make_project("source")
    record_history(source, "backup", 3)
    backup = Path(transfer_export_run(project=source)["path"])
    live = make_session(project, "live")
    snapshot_record(session=live, state={"step": 0})
    # Garbage to collect: a trimmed version. Not a deleted session: a deletion queues a collection of
    # its own, which the suite's Celery worker (alive once a worker test started it) could run first,
    # leaving this test's collection nothing to free.
    trimmed = record_history(project, "trimmed", 2)
    session_trim(session=trimmed, keep=[2], reason="done with v1")
    stored, release = threading.Event(), threading.Event()
    totals: list[int] = []
    outcomes: dict[str, Any] = {}

    def holds_when_stored(done: int, total: int | None = None, *, force: bool = False) -> None:
        totals.extend([total] if total else [])
        if done == totals[0]:  # everything stored, not yet committed
            stored.set()
            release.wait(60)

    def on_own_connection(name: str, work: Callable[[], Any]) -> threading.Thread:
        def run() -> None:
            try:
                outcomes[name] = work()
            finally:
                connection.close()
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    importing = on_own_connection("import", lambda: transfer_import_run(project=project, path=backup,
                                                                        progress=holds_when_stored))
    assert stored.wait(30)
    collecting = on_own_connection("gc", lambda: compaction_run(project=project, apply_retention=False, recompress=False))
    assert someone_waits_on_a_lock(collecting)
    started = time.monotonic()
    writing = on_own_connection("write", lambda: snapshot_record(session=WorkflowSession.objects.get(pk=live.pk),
                                                                 state={"step": 1}))
    # Done while the import still holds its lock uncommitted (blocked, it would wait for the release).
    writing.join(10)
    took = time.monotonic() - started
    written_before_the_import_committed = not writing.is_alive()
    release.set()
    for thread in (importing, collecting, writing):
        thread.join(60)

    assert written_before_the_import_committed, f"the write waited {took:.1f} s for the import"
    assert outcomes["write"].number == 2
    assert outcomes["import"]["versions"] == 3
    assert outcomes["gc"]["nodes_freed"] > 0  # once the import committed, the collection went on
    # Every version reads back, verified: nothing the import or the write stored was collected.
    assert {key: value for key, value in read_all(project).items() if key[0] == "backup"} == read_all(source)
    assert set(read_all(project)) == {("live", 1), ("live", 2), ("backup", 1), ("backup", 2), ("backup", 3),
                                      ("trimmed", 2)}

"""Trim, retention and deletion of a session longer than one PostgreSQL statement's parameters (65,535).

Each named every version it removed in one IN list, and failed on such a session ("number of
parameters must be between 0 and 65535"), removing nothing: its history could not be trimmed,
thinned or deleted at all.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection

from sessions_app.models import AuditEvent, WorkflowSession
from sessions_app.selectors import removed_numbers
from sessions_app.services import session_delete
from snapshots_app.compaction import compaction_run, retention_policy_set
from snapshots_app.models import IntegrityProblem, Version
from snapshots_app.selectors import version_with_state_bytes
from snapshots_app.services import session_trim, snapshot_fork, snapshot_record, version_pin
from tests.factories import make_session
from tests.workers.builders import midnight

LONG = 70_000  # more versions than one statement may name


def grow_history(session: WorkflowSession, copies: int) -> None:
    """Append `copies` copies of the head version, each the parent of the next, as if recorded one by
    one: recording 70,000 through the service would take minutes, copying the row takes a second."""
    head = Version.objects.get(session=session, number=session.head_number)
    columns = [f.column for f in Version._meta.concrete_fields if f.name not in ("id", "number", "parent")]
    table, listed = Version._meta.db_table, ", ".join(columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (number, {listed}) SELECT number + g, {listed} "
            f"FROM {table}, generate_series(1, %s) AS g WHERE id = %s ORDER BY g",
            [copies, head.pk],
        )
        cursor.execute(f"ANALYZE {table}")
        # Each copy's parent is the copy before it (the first copy's is the head). Joined on the
        # primary key: joined on (session, number - 1), the planner may loop over every pair.
        cursor.execute(
            f"UPDATE {table} AS child SET parent_id = chain.before FROM ("
            f"  SELECT id, lag(id) OVER (ORDER BY number) AS before FROM {table} WHERE session_id = %s AND number >= %s"
            ") AS chain WHERE child.id = chain.id AND chain.before IS NOT NULL",
            [session.pk, head.number],
        )
    WorkflowSession.objects.filter(pk=session.pk).update(
        head_number=head.number + copies, version_count=session.version_count + copies
    )
    session.refresh_from_db()


def _state(session: WorkflowSession, number: int) -> bytes:
    return version_with_state_bytes(session=session, number=number)[1]


@pytest.mark.django_db
def test_a_trim_of_a_session_of_70000_versions_keeps_what_was_asked_and_removes_the_rest(project):
    session = make_session(project, "long-run")
    snapshot_record(session=session, state={"step": 1})
    snapshot_record(session=session, state={"step": 2})
    version_pin(version=session.versions.get(number=2), pinned=True)
    snapshot_record(session=session, state={"step": 3, "notes": ["a long night"]})
    session.refresh_from_db()
    grow_history(session, LONG)
    head = snapshot_record(session=session, state={"step": 4})
    assert head.number == LONG + 4
    doomed = session.versions.get(number=40_000)
    IntegrityProblem.objects.create(project=project, session=session, version=doomed, version_number=40_000,
                                    detail="checksum mismatch")

    outcome = session_trim(session=session, keep=[head.number], reason="history no longer needed")

    assert outcome.kept == [2, head.number] and outcome.protected == [2]
    assert outcome.removed == [1, *range(3, head.number)]
    numbers_left = list(session.versions.order_by("number").values_list("number", "parent__number"))
    assert numbers_left == [(2, None), (head.number, 2)]  # the head points at its nearest kept ancestor
    assert _state(session, head.number) == b'{"step":4}' and _state(session, 2) == b'{"step":2}'
    assert not IntegrityProblem.objects.filter(session=session).exists()  # its version is gone
    session.refresh_from_db()
    assert (session.version_count, session.head_number) == (2, head.number)
    event = AuditEvent.objects.get(action="session.trim")
    assert removed_numbers(event.details) == outcome.removed and event.details["protected"] == [2]
    assert snapshot_record(session=session, state={"step": 5}).number == head.number + 1


@pytest.mark.django_db
def test_retention_of_a_session_of_70000_versions_removes_all_it_plans(project):
    session = make_session(project, "long-run")
    snapshot_record(session=session, state={"step": 1})
    Version.objects.filter(session=session).update(created_at=midnight(30))
    session.refresh_from_db()
    grow_history(session, LONG)  # copies of a version 30 days old
    for step in (2, 3):
        snapshot_record(session=session, state={"step": step})
    retention_policy_set(project=project, enabled=True, keep_last=2, keep_days=1, thin_to="none")

    result = compaction_run(project=project, now=midnight(0) + timedelta(hours=1))

    assert result["versions_removed"] == LONG + 1
    assert list(session.versions.order_by("number").values_list("number", "parent__number")) == [
        (LONG + 2, None), (LONG + 3, LONG + 2)
    ]
    assert _state(session, LONG + 3) == b'{"step":3}'
    event = AuditEvent.objects.get(action="retention.remove")
    # As runs: the whole list of numbers made an event of ~5.5 bytes per version removed.
    assert removed_numbers(event.details) == list(range(1, LONG + 2))
    assert event.details["removed"] == [[1, LONG + 1]] and event.details["count"] == LONG + 1


@pytest.mark.django_db
def test_deleting_a_session_of_70000_versions_deletes_them_all_and_keeps_its_forks(project):
    session = make_session(project, "long-run")
    snapshot_record(session=session, state={"step": 1})
    session.refresh_from_db()
    grow_history(session, LONG)
    fork = snapshot_fork(session=session, from_version=500, reason="try another prompt")
    problem = IntegrityProblem.objects.create(project=project, session=session, version=session.versions.get(number=9),
                                              version_number=9, detail="checksum mismatch")
    kept = make_session(project, "another-run")
    snapshot_record(session=kept, state={"step": 1})

    session_delete(session=session, reason="a runaway loop")

    assert not WorkflowSession.objects.filter(pk=session.pk).exists()
    assert not Version.objects.filter(session_id=session.pk).exists()
    assert not IntegrityProblem.objects.filter(pk=problem.pk).exists()
    forked = Version.objects.get(session=fork)  # the fork stays, its source gone
    assert forked.parent_id is None and _state(fork, 1) == b'{"step":1}'
    assert _state(kept, 1) == b'{"step":1}'
    event = AuditEvent.objects.get(action="session.delete")
    assert event.details["versions"] == LONG + 1

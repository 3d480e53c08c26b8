"""snapshot_record's one-statement path (services._append_to_known_head), on the real database.

Once this process has written a session's head, the next write of that session is one statement
that checks, under the session lock, that the head is still the one the new nodes were found
against. These tests commit for real (the path is taken only after a commit taught the process
the head) and check that every reason to decline falls back to the locked path, which decides.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from sessions_app.errors import IdempotencyKeyReused, SessionArchived, VersionConflict
from sessions_app.models import WorkflowSession
from sessions_app.services import session_archive
from snapshots_app import store
from snapshots_app.canonical import dumps
from snapshots_app.models import StateNode, Version
from snapshots_app.selectors import version_state_bytes
from snapshots_app.services import snapshot_record, snapshot_rewind
from tests.conftest import clear_cache
from tests.factories import agent_state

pytestmark = pytest.mark.django_db(transaction=True)

ONE_STATEMENT = "WITH locked AS"


def record(session: WorkflowSession, state: dict, **kwargs) -> tuple[Version, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        version = snapshot_record(session=session, state=state, **kwargs)
    return version, [q["sql"] for q in queries.captured_queries]


def stored_node_bytes(session: WorkflowSession) -> int:
    return sum(len(bytes(d)) for d in StateNode.objects.filter(project_id=session.project_id).values_list("data", flat=True))


def test_a_known_head_is_followed_in_one_statement_with_exact_counters(session):
    snapshot_record(session=session, state=agent_state(1, history=40), step="first")
    before = stored_node_bytes(session)
    state = agent_state(2, history=40)
    version, sql = record(session, state, step="second", status="running", error="tool timed out")

    assert len(sql) == 1 and sql[0].startswith(ONE_STATEMENT)
    first = Version.objects.get(session=session, number=1)
    assert (version.number, version.parent_id) == (2, first.pk)
    assert version.stored_size == stored_node_bytes(session) - before > 0  # only bytes really added
    session.refresh_from_db()
    assert (session.head_number, session.version_count, session.last_step, session.last_error) == (
        2, 2, "second", "tool timed out",
    )
    assert session.stored_bytes == first.stored_size + version.stored_size
    assert session.logical_bytes == len(dumps(state))
    assert version.session.head_number == 2  # the session the statement returned, as moved
    clear_cache()
    assert version_state_bytes(Version.objects.select_related("session").get(pk=version.pk)) == dumps(state)


def test_the_statement_is_built_once_per_shape_and_no_key_is_kept(session):
    """A helper added above _append_sql took its @cache: the statement was rebuilt for every write,
    and every idempotency key a process saw was kept for good (a client sends a new one per write)."""
    from snapshots_app import rows

    snapshot_record(session=session, state={"n": 0}, idempotency_key="k-0")
    record(session, {"n": 1}, idempotency_key="k-1")  # the first one-statement write of this shape builds it
    built = rows._append_sql.cache_info().misses
    for n in range(2, 5):
        record(session, {"n": n}, idempotency_key=f"k-{n}")
    assert rows._append_sql.cache_info().misses == built and rows._append_sql.cache_info().hits >= 3
    assert not hasattr(rows.batch_key_prefix, "cache_info")


def test_a_head_moved_behind_a_stale_copy_is_noticed_under_the_lock(session):
    snapshot_record(session=session, state=agent_state(1), step="one")
    stale = WorkflowSession.objects.get(pk=session.pk)  # another request's copy, head 1
    known = store.head_shapes.get(session.pk)
    snapshot_record(session=session, state=agent_state(2), step="two")
    store.head_shapes.put(session.pk, known)  # as if version 2 had been written by another process

    version, sql = record(stale, agent_state(3), step="three")

    assert sql[0].startswith(ONE_STATEMENT) and len(sql) > 1  # tried, declined under the lock, fell back
    assert version.number == 3
    assert version.parent_id == Version.objects.get(session=session, number=2).pk
    assert stale.head_number == 3  # the caller's copy follows its write
    assert list(Version.objects.filter(session=session).order_by("number").values_list("number", flat=True)) == [1, 2, 3]
    clear_cache()
    assert version_state_bytes(Version.objects.select_related("session").get(pk=version.pk)) == dumps(agent_state(3))


@pytest.mark.parametrize("memory", ["stale", "empty"])
def test_a_head_this_process_did_not_write_is_read_first_then_written_in_one_statement(session, memory):
    snapshot_record(session=session, state=agent_state(1))
    known = store.head_shapes.get(session.pk)
    snapshot_record(session=session, state=agent_state(2))
    if memory == "stale":
        store.head_shapes.put(session.pk, known)  # another process wrote version 2
    else:
        store.head_shapes.clear()  # a process that never wrote this session
    fresh = WorkflowSession.objects.get(pk=session.pk)  # as an API request loads it

    version, sql = record(fresh, agent_state(3, history=30))

    assert len(sql) == 2 and sql[1].startswith(ONE_STATEMENT)  # the head's tree, then the write
    assert (version.number, version.parent_id) == (3, Version.objects.get(session=session, number=2).pk)
    assert store.head_shapes.get(session.pk)[0] == 3
    clear_cache()
    assert version_state_bytes(Version.objects.select_related("session").get(pk=version.pk)) == dumps(
        agent_state(3, history=30)
    )


def test_a_stale_expected_version_conflicts_and_writes_nothing(session):
    snapshot_record(session=session, state=agent_state(1))
    snapshot_record(session=session, state=agent_state(2))
    nodes = StateNode.objects.count()
    with pytest.raises(VersionConflict):
        snapshot_record(session=session, state=agent_state(3, history=50), expected_version=1)
    assert (Version.objects.filter(session=session).count(), StateNode.objects.count()) == (2, nodes)

    version, sql = record(session, agent_state(3), expected_version=2)
    assert version.number == 3 and len(sql) == 1


def test_a_retried_idempotency_key_returns_the_first_version(session):
    snapshot_record(session=session, state=agent_state(1))
    first = snapshot_record(session=session, state=agent_state(2), idempotency_key="step-2")
    nodes = StateNode.objects.count()

    again, _ = record(session, agent_state(2), idempotency_key="step-2")
    assert again.pk == first.pk
    with pytest.raises(IdempotencyKeyReused):
        snapshot_record(session=session, state=agent_state(9), idempotency_key="step-2")
    assert (Version.objects.filter(session=session).count(), StateNode.objects.count()) == (2, nodes)


def test_an_archived_session_is_refused_even_with_a_known_head(session):
    snapshot_record(session=session, state=agent_state(1))
    stale = WorkflowSession.objects.get(pk=session.pk)  # read before the archive, as a racing request would
    session_archive(session=session, reason="done")
    with pytest.raises(SessionArchived):
        snapshot_record(session=stale, state=agent_state(2))
    assert Version.objects.filter(session=session).count() == 1


def test_inside_a_callers_transaction_a_declined_attempt_leaves_it_usable(session):
    snapshot_record(session=session, state=agent_state(1))
    with transaction.atomic():
        first = snapshot_record(session=session, state=agent_state(2), idempotency_key="k")
        again = snapshot_record(session=session, state=agent_state(2), idempotency_key="k")
        third = snapshot_record(session=session, state=agent_state(3))
    assert again.pk == first.pk
    assert [first.number, third.number] == [2, 3]
    assert WorkflowSession.objects.get(pk=session.pk).head_number == 3


def test_a_rewind_moves_the_head_and_the_next_write_follows_it(session):
    for step in range(1, 4):
        snapshot_record(session=session, state=agent_state(step))
    snapshot_rewind(session=session, to_version=1, reason="bad tool output")
    version = snapshot_record(session=session, state=agent_state(5))
    assert version.number == 5
    assert version.parent_id == Version.objects.get(session=session, number=4).pk
    clear_cache()
    assert version_state_bytes(Version.objects.select_related("session").get(pk=version.pk)) == dumps(agent_state(5))

"""The versioned state store through its services, on the real database."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sessions_app import background
from sessions_app.errors import (
    IdempotencyKeyReused,
    IntegrityProblem,
    InvalidState,
    ReasonRequired,
    SessionExists,
    StateTooDeep,
    StateTooLarge,
    VersionConflict,
    VersionNotFound,
)
from sessions_app.models import AuditEvent, WorkflowSession
from sessions_app.services import session_get_or_create, session_update
from snapshots_app import store, tree
from snapshots_app.canonical import checksum, dumps
from snapshots_app.diff import apply_patch
from snapshots_app.models import StateNode, Version, VersionKind
from snapshots_app.selectors import (
    version_diff,
    version_get,
    version_pair_diff,
    version_state,
    version_state_bytes,
    version_with_state_bytes,
)
from snapshots_app.services import (
    snapshot_fork,
    snapshot_record,
    snapshot_rewind,
    version_label,
    version_pin,
    versions_pin,
)
from tests.conftest import clear_cache
from tests.factories import agent_state, make_project, make_session

pytestmark = pytest.mark.django_db


def stored_bytes(project) -> int:
    return sum(len(bytes(d)) for d in StateNode.objects.filter(project=project).values_list("data", flat=True))


def test_versions_read_back_exactly_and_are_numbered_from_one(session):
    states = [agent_state(step, history=5) for step in range(1, 6)]
    versions = [snapshot_record(session=session, state=state, step=f"s{i}") for i, state in enumerate(states)]
    assert [v.number for v in versions] == [1, 2, 3, 4, 5]
    assert [v.parent_id for v in versions] == [None, *[v.pk for v in versions[:-1]]]
    clear_cache()
    for version, state in zip(versions, states, strict=True):
        fresh = Version.objects.select_related("session").get(pk=version.pk)
        assert version_state_bytes(fresh) == dumps(state)
        assert version_state(fresh) == state
    session.refresh_from_db()
    assert (session.head_number, session.version_count, session.last_step) == (5, 5, "s4")


def test_raw_json_input_is_canonicalised(session):
    version = snapshot_record(session=session, state=b'{"b": [1, 2.5, "x"], "a": {"z": null, "y": true}}')
    assert version_state_bytes(version) == b'{"a":{"y":true,"z":null},"b":[1,2.5,"x"]}'


@pytest.mark.parametrize(
    ("state", "error"),
    [
        (b"[1, 2]", InvalidState),
        (b'"just a string"', InvalidState),
        (b'{"a": NaN}', InvalidState),
        (b'{"a": Infinity}', InvalidState),
        (b'{"a": 1e999}', InvalidState),
        (b'{"a": ', InvalidState),
        (b'{"a": 99999999999999999999999}', InvalidState),  # orjson alone would read a float
        (b'{"a": -9223372036854775809}', InvalidState),
        ({"a": float("nan")}, InvalidState),
        ({"a": float("inf")}, InvalidState),
        ({1: "non-string key"}, InvalidState),
        ({"a": object()}, InvalidState),
        ({"a": 2**70}, InvalidState),
        ('{"a": "\ud800"}', InvalidState),  # text with a lone surrogate: not Unicode
        (json.dumps({"a": "x" * 2048}).encode(), StateTooLarge),
        ({"a": "x" * 2048}, StateTooLarge),
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(session, settings, state, error):
    settings.STATE_MAX_BYTES = 1024
    with pytest.raises(error) as excinfo:
        snapshot_record(session=session, state=state)
    assert excinfo.value.status in (400, 413)
    assert Version.objects.count() == 0
    assert StateNode.objects.count() == 0
    session.refresh_from_db()
    assert session.head_number == 0


def test_too_deep_state_is_refused(session, settings):
    settings.STATE_MAX_DEPTH = 200
    deep = inner = {}
    for _ in range(200):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(StateTooDeep):
        snapshot_record(session=session, state=deep)
    # Text deeper than the standard library's parser can recurse, with a long digit run in it (which
    # the exact integer check parses again): the depth is checked first.
    with pytest.raises(StateTooDeep):
        snapshot_record(session=session, state=b'{"a":' + b"[" * 990 + b'"1234567890123456789"' + b"]" * 990 + b"}")
    ok = inner = {}
    for _ in range(199):
        inner["x"] = {}
        inner = inner["x"]
    version = snapshot_record(session=session, state=ok)
    clear_cache()
    assert version_state(version) == ok


def test_bad_metadata_is_refused(session):
    for status in ("exploded", ["completed"]):
        with pytest.raises(InvalidState, match="status must be one of running"):
            snapshot_record(session=session, state={}, status=status)
    with pytest.raises(InvalidState, match="kind must be one of step"):
        snapshot_record(session=session, state={}, kind=["step"])
    with pytest.raises(InvalidState):
        snapshot_record(session=session, state={}, tags="not-a-list")
    with pytest.raises(InvalidState):
        snapshot_record(session=session, state={}, expected_version=-1)
    for name in ("step", "error", "label", "engine", "engine_version", "idempotency_key"):
        with pytest.raises(InvalidState, match="NUL"):  # PostgreSQL text cannot hold it
            snapshot_record(session=session, state={}, **{name: "a\x00b"})
    assert Version.objects.count() == 0
    snapshot_record(session=session, state={"a": 1})
    for number in (1.9, True, "1_0", "\u0661"):  # int() would read each of these as a version number
        with pytest.raises(VersionNotFound):
            snapshot_rewind(session=session, to_version=number, reason="x")
        with pytest.raises(VersionNotFound):
            snapshot_fork(session=session, from_version=number, reason="what if")
    with pytest.raises(InvalidState, match="NUL"):
        snapshot_rewind(session=session, to_version=1, reason="a\x00b")
    with pytest.raises(InvalidState, match="NUL"):
        snapshot_fork(session=session, from_version=1, external_id="a\x00b", reason="what if")
    assert Version.objects.count() == 1


def test_session_metadata_jsonb_would_change_is_refused(project):
    for metadata in ({"budget": 1e20}, {"a": [float("nan")]}, {"k\x00": 1}, {"a": {"b": "x\x00"}}):
        with pytest.raises(InvalidState):
            session_get_or_create(project=project, external_id="m", metadata=metadata)
    assert not WorkflowSession.objects.filter(external_id="m").exists()
    session, _ = session_get_or_create(project=project, external_id="m", metadata={"budget": 1e18, "n": 2**63})
    snapshot_record(session=session, state={"a": 1})
    fork = snapshot_fork(session=session, from_version=1, reason="what if")  # the fork copies the metadata
    assert fork.metadata["budget"] == 1e18


def test_stale_expected_version_conflicts_and_writes_nothing(session):
    snapshot_record(session=session, state={"n": 1}, expected_version=0)
    snapshot_record(session=session, state={"n": 2}, expected_version=1)
    before = StateNode.objects.count()
    with pytest.raises(VersionConflict) as excinfo:
        snapshot_record(session=session, state={"n": 3, "big": "y" * 5000}, expected_version=1)
    assert excinfo.value.status == 409
    assert excinfo.value.details == {"expected": 1, "head": 2}
    assert Version.objects.count() == 2
    assert StateNode.objects.count() == before


def test_idempotency_key_returns_the_first_result(session):
    first = snapshot_record(session=session, state={"n": 1}, idempotency_key="step-1")
    again = snapshot_record(session=session, state={"n": 1}, idempotency_key="step-1", expected_version=0)
    assert again.pk == first.pk
    assert Version.objects.count() == 1
    with pytest.raises(IdempotencyKeyReused):
        snapshot_record(session=session, state={"n": 2}, idempotency_key="step-1")


def test_a_retry_after_an_operator_relabelled_the_version_still_replays(session):
    first = snapshot_record(session=session, state={"n": 1}, label="draft", idempotency_key="step-1")
    version_label(version=first, label="known good")
    version_label(version=first, label="known good, checked")
    again = snapshot_record(session=session, state={"n": 1}, label="draft", idempotency_key="step-1")
    assert again.pk == first.pk and again.label == "known good, checked"
    with pytest.raises(IdempotencyKeyReused, match="different label"):
        snapshot_record(session=session, state={"n": 1}, label="other", idempotency_key="step-1")
    assert Version.objects.count() == 1


def test_unknown_version_is_a_clear_error(session):
    snapshot_record(session=session, state={"n": 1})
    with pytest.raises(VersionNotFound):
        version_get(session=session, number=7)
    with pytest.raises(VersionNotFound):
        snapshot_rewind(session=session, to_version=7, reason="typo")


def test_storage_grows_with_the_change_not_the_state(session, project):
    state = agent_state(1, history=2000, message_size=400)
    snapshot_record(session=session, state=state)
    first = stored_bytes(project)
    assert first > 200_000
    for step in range(2, 12):
        state["messages"].append({"role": "assistant", "content": f"reply {step} " + "z" * 400, "i": step})
        state["counters"]["steps"] = step
        snapshot_record(session=session, state=state)
    per_version = (stored_bytes(project) - first) / 10
    # The history is never stored again: each step costs a few KB (the new message, the last run of
    # the history and the path above it), about 0.5% of the 900 KB state.
    assert per_version < min(8_000, len(dumps(state)) / 100), f"each appended message stored {per_version:.0f} bytes of a {len(dumps(state))}-byte state"
    # A counter bump alone stores almost nothing.
    before = stored_bytes(project)
    state["counters"]["steps"] += 1
    snapshot_record(session=session, state=state)
    assert stored_bytes(project) - before < 1_500


def test_rewind_appends_a_new_head_equal_to_the_old_version_and_stores_nothing(session, project, user):
    for step in range(1, 5):
        snapshot_record(session=session, state=agent_state(step, history=50), step=f"step-{step}",
                        status="failed" if step == 4 else "running", error="boom" if step == 4 else "")
    before = stored_bytes(project)
    with pytest.raises(ReasonRequired):
        snapshot_rewind(session=session, to_version=2, reason="  ")
    head = snapshot_rewind(session=session, to_version=2, reason="step 3 used a bad tool result", actor=user)
    assert (head.number, head.kind, head.parent.number) == (5, VersionKind.REWIND, 2)
    assert stored_bytes(project) == before
    clear_cache()
    assert version_state(Version.objects.get(pk=head.pk)) == agent_state(2, history=50)
    session.refresh_from_db()
    assert (session.head_number, session.status, session.last_error) == (5, "running", "")
    # History is never rewritten: version 4 is still there, unchanged.
    assert version_state(version_get(session=session, number=4)) == agent_state(4, history=50)
    event = AuditEvent.objects.get(action="session.rewind")
    assert (event.actor, event.reason, event.details["to_version"], event.details["new_head"]) == (
        user, "step 3 used a bad tool result", 2, 5)
    # Back to the failed version: the session is failed again, and says why (it read failed, with no error).
    failed = snapshot_rewind(session=session, to_version=4, reason="look at the failure again", actor=user)
    session.refresh_from_db()
    assert (failed.status, failed.error) == ("failed", "boom")
    assert (session.status, session.last_error) == ("failed", "boom")
    # So does a data fix of it (the session read failed, with no error, after a fix from a failed version).
    snapshot_rewind(session=session, to_version=2, reason="back to work", actor=user)
    from snapshots_app.services import snapshot_data_fix

    fixed = snapshot_data_fix(session=session, state={**agent_state(4, history=50), "note": "fixed"}, based_on=4,
                              reason="the tool result was truncated", actor=user)
    session.refresh_from_db()
    assert (fixed.status, fixed.error, session.status, session.last_error) == ("failed", "boom", "failed", "boom")
    # And one from a version without an error leaves none (the session kept "boom", and its has_error).
    snapshot_data_fix(session=session, state={**agent_state(2, history=50), "note": "fixed"}, based_on=2,
                      reason="from the good one", actor=user)
    session.refresh_from_db()
    assert (session.status, session.last_error) == ("running", "")


def test_fork_starts_a_new_session_from_a_version_and_diffs_against_its_source(session, project, user):
    for step in range(1, 4):
        snapshot_record(session=session, state=agent_state(step, history=20))
    before = stored_bytes(project)
    fork = snapshot_fork(session=session, from_version=2, reason="try another prompt", actor=user)
    assert fork.project_id == project.pk and fork.pk != session.pk
    first = version_get(session=fork, number=1)
    assert (first.kind, first.parent.session_id, first.parent.number) == (VersionKind.FORK, session.pk, 2)
    assert stored_bytes(project) == before
    assert version_state(first) == agent_state(2, history=20)
    # Writes to the fork never leak into the source.
    snapshot_record(session=fork, state={**agent_state(2, history=20), "pointer": "forked"})
    assert version_state(version_get(session=session, number=2)) == agent_state(2, history=20)
    result = version_diff(version_get(session=session, number=3), version_get(session=fork, number=2))
    assert {c["path"] for c in result.changes} >= {"/pointer"}
    assert AuditEvent.objects.filter(action="session.fork", details__new_session=str(fork.pk)).exists()


def test_a_session_with_metadata_at_its_limit_can_be_forked(session, settings):
    """The fork's metadata is the source's, accepted when it was set, plus its lineage: it must not
    be refused as over SESSION_METADATA_MAX_BYTES (nor by a limit lowered since)."""
    settings.SESSION_METADATA_MAX_BYTES = 1024
    session_update(session=session, metadata={"notes": "n" * (1024 - len('{"notes":""}'))})
    session.refresh_from_db()
    snapshot_record(session=session, state={"n": 1})
    fork = snapshot_fork(session=session, from_version=1, reason="what if")
    assert fork.metadata["notes"] == session.metadata["notes"]
    assert fork.metadata["forked_from"] == {"session": str(session.pk), "version": 1}
    with pytest.raises(InvalidState, match="SESSION_METADATA_MAX_BYTES"):
        session_update(session=fork, metadata={**fork.metadata, "more": 1})


def test_sibling_forks_do_not_collide(session):
    snapshot_record(session=session, state={"n": 1})
    a = snapshot_fork(session=session, from_version=1, reason="what if")
    b = snapshot_fork(session=session, from_version=1, reason="what if")
    assert a.external_id != b.external_id
    with pytest.raises(SessionExists):
        snapshot_fork(session=session, from_version=1, external_id=a.external_id, reason="what if")


def test_diff_reports_paths_and_json_patch(session):
    a = snapshot_record(session=session, state={"counter": 1, "messages": ["hi"], "gone": True})
    b = snapshot_record(session=session, state={"counter": 2, "messages": ["hi", "there"]})
    result = version_diff(a, b)
    assert result.changes == [
        {"path": "/counter", "op": "replace", "kind": "changed", "old": 1, "new": 2},
        {"path": "/gone", "op": "remove", "kind": "removed", "old": True},
        {"path": "/messages/1", "op": "add", "kind": "added", "new": "there"},
    ]
    assert result.patch == [
        {"op": "replace", "path": "/counter", "value": 2},
        {"op": "remove", "path": "/gone"},
        {"op": "add", "path": "/messages/1", "value": "there"},
    ]


def test_a_subtree_both_versions_share_under_another_key_is_still_compared(session):
    """A diff's prefetch does not descend into children both sides share (store._PROBE_DIFF_SQL):
    when the walk needs one after all (here: s2 moved from /doc/q to /doc/p), it is fetched then."""
    s1, s2, s3 = ("first text " * 900, "second text " * 900, "third text " * 900)  # ~10 KB: nodes of their own
    a = snapshot_record(session=session, state={"doc": {"p": s1, "q": s2}, "n": 1})
    b = snapshot_record(session=session, state={"doc": {"p": s2, "q": s3}, "n": 2})
    clear_cache()
    result = version_diff(version_get(session=session, number=a.number), version_get(session=session, number=b.number))
    assert [(c["path"], c["old"][:6], c["new"][:6]) for c in result.changes if c["path"].startswith("/doc")] == [
        ("/doc/p", "first ", "second"), ("/doc/q", "second", "third "),
    ]
    assert apply_patch(version_state(a), result.patch) == version_state(b)


def test_a_diff_with_both_ends_looked_up_in_one_round_trip_is_the_usual_diff(session, user):
    states = [agent_state(step, history=30) for step in (1, 2, 3)]
    for state in states:
        snapshot_record(session=session, state=state)
    snapshot_rewind(session=session, to_version=1, reason="back to the start", actor=user)  # v4: v1's tree
    fork = snapshot_fork(session=session, from_version=2, reason="try again", actor=user)
    snapshot_record(session=fork, state={**states[1], "pointer": "forked"})
    pairs = [(session, 1, session, 3), (session, 3, session, 1), (session, 1, session, 4), (session, 2, session, 2),
             (session, 3, fork, 2), (fork, 2, session, 2)]
    for first, number, second, other_number in pairs:
        usual = version_diff(version_get(session=first, number=number), version_get(session=second, number=other_number))
        clear_cache()
        with CaptureQueriesContext(connection) as cold:
            a, b, result = version_pair_diff(session=first, number=number, other_session=second, other_number=str(other_number))
        with CaptureQueriesContext(connection) as warm:
            again = version_pair_diff(session=first, number=number, other_session=second, other_number=other_number)[2]
        # The ends and the top of both trees in one round trip; these trees are shallow enough for
        # it to bring all the diff needs, cold or warm.
        assert len(cold) == len(warm) == 1, [q["sql"][:80] for q in cold.captured_queries + warm.captured_queries]
        assert (a.session, a.number, b.session, b.number) == (first, number, second, other_number)
        assert (result.changes, result.patch) == (usual.changes, usual.patch) == (again.changes, again.patch)
        assert apply_patch(version_state(a), result.patch) == version_state(b)
    assert version_pair_diff(session=session, number=1, other_number=4)[2].changes == []
    with pytest.raises(VersionNotFound, match="has no version 9"):
        version_pair_diff(session=session, number=9, other_number=1)
    with pytest.raises(VersionNotFound, match=f"session {fork.external_id} has no version 5"):
        version_pair_diff(session=session, number=1, other_session=fork, other_number=5)


def test_llamaindex_style_json_strings_diff_structurally(session):
    def ctx(counter):
        data = {"counter": counter, "docs": [f"document {i} " + "d" * 200 for i in range(10)]}
        return {"state": {"state_data": {"_data": json.dumps(data)}}, "is_running": True}

    a = snapshot_record(session=session, state=ctx(1))
    b = snapshot_record(session=session, state=ctx(2))
    assert b.stored_size < 600  # the documents are not stored again
    result = version_diff(a, b)
    assert result.changes == [{"path": "/counter", "op": "replace", "kind": "changed", "old": 1, "new": 2,
                               "string_path": "/state/state_data/_data"}]


def test_corruption_is_detected_named_and_never_served(session):
    versions = [snapshot_record(session=session, state=agent_state(step, history=30)) for step in (1, 2)]
    node = StateNode.objects.filter(project=session.project).order_by("-raw_size").first()
    data = bytearray(bytes(node.data))
    data[len(data) // 2] ^= 0xFF
    StateNode.objects.filter(project=session.project, digest=node.digest).update(data=bytes(data))
    clear_cache()
    with pytest.raises(IntegrityProblem) as excinfo:
        for version in versions:
            version_state_bytes(Version.objects.select_related("session").get(pk=version.pk))
    assert f"version {excinfo.value.details['version']} of session {session.external_id} ({session.pk})" in str(excinfo.value)


def test_a_damaged_node_that_still_decodes_is_named_itself(session):
    """A whole read checks the text it spells, not each node: a damaged node that decoded was named by
    what it spelled instead ("checksum mismatch", or a child digest that never existed, "is missing"),
    and the operator restoring rows looked for the wrong one."""
    first, second = (snapshot_record(session=session, state=agent_state(step, history=30)) for step in (1, 2))
    root, other = bytes(first.root), bytes(second.root)
    stored = StateNode.objects.get(project=session.project, digest=other)
    StateNode.objects.filter(project=session.project, digest=root).update(data=stored.data, codec=stored.codec)
    clear_cache()
    with pytest.raises(IntegrityProblem, match=f"node {root.hex()} cannot be decoded: its seal does not match"):
        version_state_bytes(Version.objects.select_related("session").get(pk=first.pk))


def test_a_version_read_with_its_tree_in_one_round_trip_is_the_version_and_verified(session):
    states = [agent_state(step, history=30) for step in (1, 2, 3)]
    for step, state in enumerate(states, start=1):
        snapshot_record(session=session, state=state, tags=[f"t{step}"], label=f"l{step}")
    Version.objects.filter(session=session, number=1).update(summary={"added": 2, "paths": ["/a"]})
    clear_cache()
    for number in (1, 2, 3):  # 3 is the head
        plain = version_get(session=session, number=number)
        version, data = version_with_state_bytes(session=session, number=str(number))
        assert {f.attname: getattr(version, f.attname) for f in Version._meta.concrete_fields} == {
            f.attname: getattr(plain, f.attname) for f in Version._meta.concrete_fields
        }
        assert version.session is session and data == dumps(states[number - 1])
    with pytest.raises(VersionNotFound, match="has no version 9"):
        version_with_state_bytes(session=session, number=9)
    # A damaged node among the rows that came with the version is caught, and the version named.
    root = bytes(Version.objects.get(session=session, number=1).root)
    nodes = StateNode.objects.filter(project=session.project, digest=root)
    data = bytearray(bytes(nodes.get().data))
    data[len(data) // 2] ^= 0xFF
    nodes.update(data=bytes(data))
    clear_cache()
    with pytest.raises(IntegrityProblem, match=re.escape(f"version 1 of session {session.external_id} ({session.pk})")):
        version_with_state_bytes(session=session, number=1)


def test_a_head_read_is_one_round_trip_with_or_without_the_head_cache(session):
    states = [agent_state(step, history=30) for step in (1, 2)]
    for state in states:
        snapshot_record(session=session, state=state)
    session.refresh_from_db()
    clear_cache()
    with CaptureQueriesContext(connection) as cold:  # the cache lost it: the row with its tree
        version, data = version_with_state_bytes(session=session, number=2)
    assert (version.number, data) == (2, dumps(states[1]))
    assert len(cold) == 1 and "RECURSIVE" in cold.captured_queries[0]["sql"]
    from django.core.cache import cache

    assert background.drain(5)
    assert cache.get(store._head_cache_key(session.pk, 2)) == data  # the read put it back (after it returned)
    store.node_lru.clear()
    with CaptureQueriesContext(connection) as warm:  # the row alone; the state from the head cache
        version, data = version_with_state_bytes(session=session, number=2)
    assert (version.number, data) == (2, dumps(states[1]))
    assert len(warm) == 1 and "RECURSIVE" not in warm.captured_queries[0]["sql"]
    # A head-cache copy that is not the version's state is never served.
    cache.set(store._head_cache_key(session.pk, 2), dumps(states[0]))
    assert version_with_state_bytes(session=session, number=2)[1] == dumps(states[1])


def test_tampered_checksum_is_an_integrity_error(session):
    version = snapshot_record(session=session, state={"n": 1})
    Version.objects.filter(pk=version.pk).update(checksum="0" * 64)
    clear_cache()
    with pytest.raises(IntegrityProblem, match="version 1 of session"):
        version_state(Version.objects.select_related("session").get(pk=version.pk))


def test_cache_is_only_an_accelerator(session):
    state = agent_state(3, history=100)
    version = snapshot_record(session=session, state=state)
    assert version_state(version) == state  # served from the head cache
    # A poisoned cache entry is never served: the read falls back to the database.
    from django.core.cache import cache

    cache.set(store._head_cache_key(version.session_id, version.number), b'{"poisoned":true}')
    for key in list(store.node_lru.items):
        store.node_lru.items[key] = store.tree.Node(ord("o"), 0, 0, (), b'{"poisoned":true}')
    assert version_state(version) == state
    # Losing the cache loses nothing.
    clear_cache()
    assert version_state(version) == state


def test_nothing_is_shared_across_projects(user):
    a, b = make_project("alpha"), make_project("beta")
    state = agent_state(2, history=40)
    va = snapshot_record(session=make_session(a, "same-id"), state=state)
    vb = snapshot_record(session=make_session(b, "same-id"), state=state)
    assert va.stored_size > 0 and vb.stored_size > 0  # no cross-project dedup
    assert set(StateNode.objects.filter(project=a).values_list("digest", flat=True)) == set(
        StateNode.objects.filter(project=b).values_list("digest", flat=True)
    )
    # Each project's reads use only its own rows: deleting A's nodes breaks A, never B.
    StateNode.objects.filter(project=a).delete()
    clear_cache()
    with pytest.raises(IntegrityProblem):
        version_state(Version.objects.select_related("session").get(pk=va.pk))
    assert version_state(Version.objects.select_related("session").get(pk=vb.pk)) == state
    with pytest.raises(InvalidState):
        version_diff(va, vb)


def test_pin_and_label_are_audited(session, user):
    version = snapshot_record(session=session, state={"n": 1})
    version_pin(version=version, pinned=True, actor=user)
    version_label(version=version, label="known good", actor=user)
    version.refresh_from_db()
    assert (version.pinned, version.label) == (True, "known good")
    assert list(AuditEvent.objects.filter(target_type="version").order_by("id").values_list("action", flat=True)) == [
        "version.pin", "version.label"]


def test_pinning_a_pinned_version_or_relabelling_it_alike_changes_nothing_and_is_not_audited(session, user):
    """Two operators (two API calls, a double click) pin the same version from what each read before
    the other acted: the second finds it pinned, answers with it, and records no second event."""
    version = snapshot_record(session=session, state={"n": 1})
    read_by_one, read_by_other = (Version.objects.select_related("session").get(pk=version.pk) for _ in range(2))
    version_pin(version=read_by_one, pinned=True, actor=user)
    again = version_pin(version=read_by_other, pinned=True, actor=user)
    assert again.pinned is True
    version_pin(version=read_by_one, pinned=False, actor=user)
    version_pin(version=read_by_other, pinned=False, actor=user)
    version_label(version=read_by_one, label="known good", actor=user)
    assert version_label(version=read_by_other, label=" known good ", actor=user).label == "known good"
    assert list(AuditEvent.objects.filter(target_type="version").order_by("id").values_list("action", flat=True)) == [
        "version.pin", "version.unpin", "version.label"]
    version.refresh_from_db()
    assert (version.pinned, version.label) == (False, "known good")


def test_pinning_many_leaves_the_pinned_ones_unaudited(session, user):
    for n in range(4):
        snapshot_record(session=session, state={"n": n})
    version_pin(version=Version.objects.get(session=session, number=2), pinned=True, actor=user)
    outcome = versions_pin(versions=Version.objects.filter(session=session), pinned=True, actor=user)
    assert (outcome.done, outcome.unchanged) == (3, 1)
    assert sorted(AuditEvent.objects.filter(action="version.pin").values_list("details__version", flat=True)) == [1, 2, 3, 4]
    assert versions_pin(versions=Version.objects.filter(session=session), pinned=True, actor=user).unchanged == 4
    assert AuditEvent.objects.filter(action="version.pin").count() == 4


@pytest.mark.django_db(transaction=True)
def test_reads_survive_a_new_connection(session):
    """Process restarts: nothing a read needs lives only in memory."""
    state = agent_state(4, history=300)
    version = snapshot_record(session=session, state=state)
    connection.close()
    clear_cache()
    fresh = Version.objects.select_related("session").get(pk=version.pk)
    assert orjson.loads(version_state_bytes(fresh)) == state
    assert WorkflowSession.objects.get(pk=session.pk).head_number == 1


@pytest.mark.django_db(transaction=True)  # the head's tree is remembered after commit
def test_a_write_after_another_process_moved_the_head_reloads_the_heads_tree(session, project):
    """Writers check new nodes against the head's tree as this process last saw it. If the head has
    moved since (another process wrote), that picture may name nodes garbage collection has removed
    since: it must not be trusted."""
    from snapshots_app.compaction import compaction_run, retention_policy_set

    first = {"doc": "the first document " * 600, "n": 1}  # over SPLIT_MIN: its own node
    snapshot_record(session=session, state=first)
    stale = store.head_shapes.get(session.pk)
    assert stale is not None and stale[0] == 1
    snapshot_record(session=session, state={"doc": "another document " * 600, "n": 2})
    # Version 1 is thinned away and its document node collected.
    retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    compaction_run(project=project)
    assert list(Version.objects.filter(session=session).values_list("number", flat=True)) == [2]
    store.head_shapes.put(session.pk, stale)  # as if this process had only seen version 1
    third = snapshot_record(session=session, state={**first, "n": 3})  # the first document again
    clear_cache()
    assert version_state(version_get(session=session, number=3)) == {**first, "n": 3}
    assert store.head_shapes.get(session.pk)[0] == third.number


def test_stored_size_counts_only_the_bytes_a_version_added(session, project):
    big = {"doc": "lorem ipsum " * 3000, "n": 1}
    other = {"doc": "dolor sit amet " * 3000, "n": 2}
    snapshot_record(session=session, state=big)
    snapshot_record(session=session, state=other)
    before = stored_bytes(project)
    # Back to the first document: the head's tree does not hold it, so the writer submits it again;
    # the database already has it, and the version is charged only for what was really added.
    again = snapshot_record(session=session, state={**big, "n": 3})
    assert again.stored_size == stored_bytes(project) - before
    assert again.stored_size < 200


@pytest.mark.django_db(transaction=True)  # the head's tree is remembered after commit
def test_a_corrupt_node_fails_a_diff_and_names_the_version(session):
    first = snapshot_record(session=session, state=agent_state(1, history=40))
    tree_of_first = set(store.head_shapes.get(session.pk)[1])
    state = agent_state(1, history=40)
    state["scratchpad"] = "a brand new note " * 200  # a node that only version 2 has
    second = snapshot_record(session=session, state=state)
    only_second = set(store.head_shapes.get(session.pk)[1]) - tree_of_first
    node = StateNode.objects.filter(project=session.project, digest__in=only_second).order_by("-raw_size").first()
    data = bytearray(bytes(node.data))
    data[-1] ^= 0x01
    StateNode.objects.filter(project=session.project, digest=node.digest).update(data=bytes(data))
    clear_cache()
    with pytest.raises(IntegrityProblem, match=re.escape(f"version 2 of session {session.external_id} ({session.pk})")):
        version_diff(version_get(session=session, number=first.number), version_get(session=session, number=second.number))
    clear_cache()
    # Also when the damaged node came along with the versions' lookup.
    with pytest.raises(IntegrityProblem, match=re.escape(f"version 2 of session {session.external_id} ({session.pk})")):
        version_pair_diff(session=session, number=first.number, other_number=second.number)


def test_the_digest_memo_answers_with_the_digest_of_the_very_text_it_is_given(monkeypatch):
    memo = store._DigestMemo(max_bytes=3 * 8192)
    hashed = []
    digest_of = tree.digest_of
    monkeypatch.setattr(tree, "digest_of", lambda *args: hashed.append(args[2]) or digest_of(*args))

    def digest(project: int, kind: int, text: bytes) -> bytes:  # as the tree writer asks (ProjectStore.plan)
        return memo.digest(project, kind, 0, text, lambda: tree.digest_of(kind, 0, text))

    first, same_length = b"a" * 8192, b"b" * 8192  # one slot per length: the second replaces the first
    for text in (first, bytes(bytearray(first)), same_length, first):
        assert digest(1, tree.KIND_ITEMS, text) == digest_of(tree.KIND_ITEMS, 0, text)
    assert hashed == [first, same_length, first]  # the equal copy was not hashed again
    assert digest(2, tree.KIND_ITEMS, first) == digest_of(tree.KIND_ITEMS, 0, first)
    assert len(hashed) == 4  # another project's entry is never used
    for n in range(10):
        digest(1, tree.KIND_STRING, bytes([n]) * (8192 + n))
    assert memo.texts.size <= 3 * 8192


def test_a_write_plans_the_same_tree_with_the_digest_memo_as_without(project):
    plain = tree.TreeWriter(lambda digests: set())
    for step in (1, 2, 2, 3):  # step 2 twice: the second plan is made of remembered digests
        state = agent_state(step, history=300)
        canonical = dumps(state)
        root, new_nodes = store.ProjectStore(project.pk).plan(state, canonical, checksum(canonical), known={})
        plain = tree.TreeWriter(lambda digests: set())
        assert (root, new_nodes) == (plain.write_root(state, canonical), plain.new_nodes)


@pytest.mark.django_db(transaction=True)
def test_trees_written_before_merkle_and_root_digests_still_read_diff_and_take_new_writes(session):
    """Earlier releases stored a node whose holes are runs (a long history), and a root, under the
    digest of the text it spells. Such a tree, next to today's, reads back, diffs as equal to its
    twin and as one change from its successor, and a write on top of it shares its runs."""
    state = agent_state(1, history=80, message_size=600)
    first = snapshot_record(session=session, state=state)
    project = store.ProjectStore(session.project_id)
    root = project.nodes({bytes(first.root)})[bytes(first.root)]
    history = tree.parse_node(root)["messages"]
    encoding = StateNode.objects.get(project=session.project, digest=history.digest)
    history_node = project.nodes({history.digest})[history.digest]
    assert history_node.level > 0
    old_history = tree.digest_of(tree.KIND_ARRAY, tree.CANONICAL, dumps(state["messages"]))
    old_root = tree.digest_of(tree.KIND_OBJECT, tree.CANONICAL, dumps(state))
    holes = tuple((offset, old_history if child == history.digest else child) for offset, child in root.holes)
    project.save_nodes({
        old_history: store.decompress(encoding.codec, bytes(encoding.data)),
        old_root: tree.Node(root.kind, root.flavor, root.level, holes, root.text).encode(),
    })
    # The version an earlier release would have written (test set-up: no service writes old trees).
    Version.objects.create(session=session, number=2, kind=VersionKind.STEP, root=old_root, parent=first,
                           checksum=first.checksum, logical_size=first.logical_size)
    WorkflowSession.objects.filter(pk=session.pk).update(head_number=2, version_count=2)
    session.refresh_from_db()
    clear_cache()

    state["messages"].append({"role": "user", "content": "one more " * 80, "i": 81})
    third = snapshot_record(session=session, state=state)

    old = version_get(session=session, number=2)
    assert version_state_bytes(old) == version_state_bytes(first)
    assert version_diff(first, old).changes == []
    assert [(c["op"], c["path"]) for c in version_diff(old, third).changes] == [("add", "/messages/81")]
    assert orjson.loads(version_state_bytes(version_get(session=session, number=3))) == state
    assert third.stored_size < 3_000  # the new history node and the new last run, not the history again


def test_path_history_reads_its_window_in_a_few_round_trips_on_a_cold_process(session):
    """Each neighbouring pair's diff fetched its own nodes when the process's node cache had none of
    them (a new worker, states too many for the cache): 107 queries, 0.5-0.66 s for 100 distinct
    90 KB states. The window's trees now come in one round trip, and one store serves every diff."""
    from snapshots_app.selectors import path_history

    for n in range(1, 41):
        snapshot_record(session=session, state={"counters": {"tokens": n * 10}, "notes": {"last": {"text": f"step {n}"}},
                                                "docs": [{"id": i, "body": f"doc {i} at {n}"} for i in range(3)]})
    clear_cache()
    with CaptureQueriesContext(connection) as queries:
        points = path_history(session, "/counters/tokens")
    assert [(point.number, point.value, point.changed) for point in points] == [
        (n, n * 10, n > 1) for n in range(1, 41)]
    assert len(queries.captured_queries) <= 4, len(queries.captured_queries)  # was 41

"""Random histories of edits, rewinds and forks: every version reads back exactly, forever."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson
import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshots_app.canonical import dumps
from snapshots_app.diff import apply_patch
from snapshots_app.models import Version
from snapshots_app.selectors import version_diff, version_state_bytes
from snapshots_app.services import snapshot_fork, snapshot_record, snapshot_rewind
from tests.conftest import clear_cache
from tests.factories import make_project, make_session

pytestmark = pytest.mark.django_db

small = st.one_of(st.integers(-5, 5), st.text(max_size=6), st.none(), st.booleans())
big_text = st.integers(0, 30).map(lambda n: f"tool output {n} " + "lorem ipsum dolor " * 40)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.one_of(small, big_text)),
        st.tuples(st.just("pop"), st.just(None)),
        st.tuples(st.just("set"), st.tuples(st.sampled_from(["counter", "pointer", "tool", "scratch"]), st.one_of(small, big_text))),
        st.tuples(st.just("delete"), st.sampled_from(["counter", "tool", "scratch"])),
        st.tuples(st.just("rewind"), st.integers(0, 1000)),
        st.tuples(st.just("fork"), st.integers(0, 1000)),
        st.tuples(st.just("switch"), st.integers(0, 1000)),
    ),
    min_size=1,
    max_size=25,
)


def edit(state: dict[str, Any], op: str, arg: Any) -> dict[str, Any]:
    state = copy.deepcopy(state)
    if op == "append":
        state.setdefault("history", []).append(arg)
    elif op == "pop" and state.get("history"):
        state["history"].pop(0)
    elif op == "set":
        state[arg[0]] = arg[1]
    elif op == "delete":
        state.pop(arg, None)
    return state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(operations)
def test_every_version_of_a_random_history_reads_back_exactly(db, ops):
    with transaction.atomic():
        project = make_project("prop")
        sessions = [make_session(project, "main")]
        expected: dict[int, bytes] = {}  # version pk -> canonical bytes it must read back as
        current = sessions[0]
        state: dict[str, Any] = {"history": [f"message {i} " + "x" * 60 for i in range(40)], "counter": 0}
        expected[snapshot_record(session=current, state=state).pk] = dumps(state)
        for op, arg in ops:
            current.refresh_from_db()
            if op == "rewind":
                target = arg % current.head_number + 1
                version = snapshot_rewind(session=current, to_version=target, reason="property test")
                source = Version.objects.get(session=current, number=target)
                expected[version.pk] = expected[source.pk]
            elif op == "fork":
                target = arg % current.head_number + 1
                fork = snapshot_fork(session=current, from_version=target, reason="what if")
                source = Version.objects.get(session=current, number=target)
                expected[Version.objects.get(session=fork, number=1).pk] = expected[source.pk]
                sessions.append(fork)
            elif op == "switch":
                current = sessions[arg % len(sessions)]
            else:
                head = Version.objects.get(session=current, number=current.head_number)
                state = edit(orjson.loads(expected[head.pk]), op, arg)
                expected[snapshot_record(session=current, state=state).pk] = dumps(state)
        clear_cache()
        versions = list(Version.objects.filter(pk__in=expected).select_related("session"))
        assert len(versions) == len(expected)
        for version in versions:
            assert version_state_bytes(version) == expected[version.pk]
        # Numbers stay gap-free per session.
        for session in sessions:
            numbers = list(Version.objects.filter(session=session).order_by("number").values_list("number", flat=True))
            assert numbers == list(range(1, len(numbers) + 1))
        # Applying diff(a, b) to a gives b, for consecutive and for arbitrary pairs (also across forks).
        ordered = sorted(versions, key=lambda v: v.pk)
        pairs = [*list(itertools.pairwise(ordered)), (ordered[-1], ordered[0])]
        for a, b in pairs:
            patch = version_diff(a, b).patch
            assert dumps(apply_patch(orjson.loads(expected[a.pk]), patch)) == expected[b.pk]
        transaction.set_rollback(True)


# -- path history: the value at a path, followed through diffs, is the value each version holds ------

item = st.one_of(small, st.fixed_dictionaries({"text": st.one_of(small, big_text), "n": st.integers(0, 3)}))
path_edits = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.tuples(st.integers(0, 50), item)),
        st.tuples(st.just("remove"), st.integers(0, 50)),
        st.tuples(st.just("replace"), st.tuples(st.integers(0, 50), item)),
        st.tuples(st.just("retext"), st.tuples(st.integers(0, 50), st.one_of(small, big_text))),
        st.tuples(st.just("meta"), st.one_of(small, st.dictionaries(st.sampled_from("abc"), small, max_size=3))),
        st.tuples(st.just("blob"), st.dictionaries(st.sampled_from("xyz"), st.one_of(small, big_text), max_size=3)),
        st.tuples(st.just("history"), st.one_of(small, st.lists(item, max_size=4))),
        st.tuples(st.just("same"), st.none()),
        st.tuples(st.just("member"), st.tuples(st.sampled_from(["0", "2", "", "a", "02"]), small)),
    ),
    min_size=1,
    max_size=20,
)
POINTERS = ["", "/", "/history", "/history/0", "/history/2", "/history/02", "/history/2/text", "/history/5/n", "/meta",
            "/meta/a", "/meta/0", "/meta/2", "/blob", "/blob/x", "/counter", "/missing"]


def path_edit(state: dict[str, Any], op: str, arg: Any) -> dict[str, Any]:
    state = copy.deepcopy(state)
    history = state["history"] if isinstance(state.get("history"), list) else None
    if op == "history":
        state["history"] = arg
    elif op == "meta":
        state["meta"] = arg
    elif op == "blob":  # a string holding JSON, as LlamaIndex Workflows stores values
        state["blob"] = orjson.dumps(arg).decode()
    elif op == "same":
        state["counter"] = state.get("counter", 0) + 1
    elif op == "member":  # keys that read as indexes ("0", "2"), or not ("", "02"), beside others
        if isinstance(state.get("meta"), dict):
            state["meta"][arg[0]] = arg[1]
        else:
            state[arg[0]] = arg[1]
    elif history is not None and op == "insert":
        history.insert(arg[0] % (len(history) + 1), arg[1])
    elif history and op == "remove":
        history.pop(arg % len(history))
    elif history and op == "replace":
        history[arg[0] % len(history)] = arg[1]
    elif history and op == "retext" and isinstance(history[arg[0] % len(history)], dict):
        history[arg[0] % len(history)]["text"] = arg[1]
    return state


def whole_state_rows(states: list[dict[str, Any]], pointer: str) -> list[tuple[bool, str, bool]]:
    """(present, shown, changed) per state, from each whole state: what path history must show."""
    from snapshots_app.jsonview import PointerError, preview, resolve
    from snapshots_app.selectors import _reading

    rows, before = [], None
    for index, state in enumerate(states):
        try:
            value, present = resolve(state, pointer), True
        except PointerError:
            value, present = None, False
        reading = _reading(value, present)
        rows.append((present, preview(value)[0] if present else "", index > 0 and reading != before))
        before = reading
    return rows


def path_rows(session: Any, pointer: str) -> list[tuple[bool, str, bool]]:
    from snapshots_app.selectors import path_history

    return [(point.present, point.shown, point.changed) for point in path_history(session, pointer)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path_edits)
def test_path_history_shows_what_each_version_holds_at_the_path(db, ops):
    """Path history reads one state and then follows the diffs; at every version and for paths above,
    at and inside changes (items inserted before them, removed, replaced, a JSON string's inside), it
    must show what reading that version's whole state shows."""
    with transaction.atomic():
        session = make_session(make_project("paths"), "main")
        state: dict[str, Any] = {"history": [{"text": f"m{i}", "n": i % 4} for i in range(6)], "meta": {"a": 1},
                                 "blob": orjson.dumps({"x": [1, 2]}).decode(), "counter": 0}
        states = [state]
        for op, arg in ops:
            state = path_edit(state, op, arg)
            states.append(state)
        for each in states:
            snapshot_record(session=session, state=each)
        clear_cache()
        for pointer in POINTERS:
            assert path_rows(session, pointer) == whole_state_rows(states, pointer), pointer
        transaction.set_rollback(True)

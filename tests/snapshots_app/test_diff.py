"""What a diff shows (its change list) where the trees' shapes make it hard: arrays paged on one side
only or shifted by an insertion, JSON strings spelled in two flavors or holding what JSON values
cannot, and states nested as deep as the store allows. Through the services, on the real database,
and on in-memory values where the tree plays no part."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import orjson
import pytest
from django.test import override_settings

from snapshots_app import tasks, tree
from snapshots_app.canonical import dumps
from snapshots_app.diff import apply_patch, diff_trees, diff_values
from snapshots_app.models import Version
from snapshots_app.selectors import version_pair_diff
from snapshots_app.services import snapshot_record


def recorded_diff(session: Any, a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes between `a` and `b` recorded as two versions; their patch must turn a into b and
    the changes must be what the API can send (JSON that orjson encodes)."""
    first = snapshot_record(session=session, state=a)
    second = snapshot_record(session=session, state=b)
    result = version_pair_diff(session=session, number=first.number, other_number=second.number)[2]
    assert dumps(apply_patch(a, result.patch)) == dumps(b)
    orjson.dumps(result.changes)
    return result.changes


def brief(changes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(change["kind"], change["path"]) for change in changes]


# Arrays: paged on one side only, or shifted -------------------------------------------------------


def test_an_array_that_grows_past_the_split_size_reports_only_the_item_that_changed(session):
    a = {"a": [{"i": i, "t": "x" * 60} for i in range(100)]}  # ~8 KB: one node, unsplit
    b = copy.deepcopy(a)
    b["a"][0]["t"] = "y" * 1000  # now over SPLIT_MIN: runs of 32
    assert recorded_diff(session, a, b) == [
        {"path": "/a/0/t", "op": "replace", "kind": "changed", "old": "x" * 60, "new": "y" * 1000},
    ]
    # ... and back.
    assert brief(recorded_diff(session, b, a)) == [("changed", "/a/0/t")]


def test_an_inline_array_that_becomes_paged_reports_the_additions_only(session):
    changes = recorded_diff(session, {"a": list(range(100))}, {"a": list(range(3000))})
    assert brief(changes) == [("added", f"/a/{i}") for i in range(100, 3000)]
    assert [change["new"] for change in changes[:2]] == [100, 101]
    assert brief(recorded_diff(session, {"a": list(range(3000))}, {"a": list(range(100))})) == [
        ("removed", f"/a/{i}") for i in reversed(range(100, 3000))
    ]


def test_an_insertion_in_a_long_array_reads_as_one_addition(session):
    a = {"a": list(range(3000))}
    assert recorded_diff(session, a, {"a": [*range(1500), "x", *range(1500, 3000)]}) == [
        {"path": "/a/1500", "op": "add", "kind": "added", "new": "x"},
    ]
    assert recorded_diff(session, a, {"a": ["x", *range(3000)]}) == [
        {"path": "/a/0", "op": "add", "kind": "added", "new": "x"},
    ]
    assert recorded_diff(session, a, {"a": [*range(700), *range(701, 3000)]}) == [
        {"path": "/a/700", "op": "remove", "kind": "removed", "old": 700},
    ]


def test_an_insertion_in_a_long_history_of_messages_reads_as_one_addition(session):
    messages = [{"role": "user", "content": f"message {i} " + "m" * 300} for i in range(1100)]  # runs of runs
    inserted = {"role": "system", "content": "a note"}
    changes = recorded_diff(session, {"messages": messages}, {"messages": [*messages[:40], inserted, *messages[40:]]})
    assert changes == [{"path": "/messages/40", "op": "add", "kind": "added", "new": inserted}]


def test_appending_to_a_long_history_across_levels_reads_as_additions(session):
    messages = [{"i": i, "content": "m" * 100} for i in range(1024)]  # 32 full runs; one more item adds a level
    more = [*messages, {"i": 1024, "content": "new"}, {"i": 1025, "content": "newer"}]
    assert brief(recorded_diff(session, {"messages": messages}, {"messages": more})) == [
        ("added", "/messages/1024"), ("added", "/messages/1025"),
    ]


def test_an_item_changed_in_place_in_a_long_array_is_one_change(session):
    a = {"a": [{"i": i, "t": "x" * 60} for i in range(3000)]}
    b = copy.deepcopy(a)
    b["a"][1234]["t"] = "changed"
    assert brief(recorded_diff(session, a, b)) == [("changed", "/a/1234/t")]


class CountingNodes:
    """An in-memory node table that counts what a diff fetches."""

    def __init__(self) -> None:
        self.raw: dict[bytes, bytes] = {}
        self.fetches: list[int] = []

    def write(self, state: dict[str, Any]) -> bytes:
        writer = tree.TreeWriter(lambda digests: {digest for digest in digests if digest in self.raw})
        root = writer.write_root(state, dumps(state))
        self.raw.update(writer.new_nodes)
        return root

    def nodes(self, digests: set[bytes]) -> dict[bytes, tree.Node]:
        self.fetches.append(len(digests))
        return {digest: tree.Node.decode(self.raw[digest]) for digest in digests if digest in self.raw}


@pytest.mark.parametrize(("edit", "at", "most_nodes"), [
    ("append", 2000, 9), ("append", 1984, 9), ("insert", 1990, 9), ("insert", 1000, 80),
])
def test_a_diff_of_a_long_history_reads_the_runs_from_the_change_on(edit, at, most_nodes):
    history = [{"role": "user", "content": f"message {i} " + "lorem ipsum " * 40} for i in range(2000)]
    history = history[:at] if edit == "append" else history
    message = {"role": "assistant", "content": "one more"}
    nodes = CountingNodes()
    root_a, root_b = nodes.write({"messages": history}), nodes.write({"messages": [*history[:at], message, *history[at:]]})
    result = diff_trees(root_a, root_b, nodes)
    assert result.changes == [{"path": f"/messages/{at}", "op": "add", "kind": "added", "new": message}]
    assert sum(nodes.fetches) <= most_nodes and len(nodes.fetches) <= 9, nodes.fetches


# JSON held in strings -----------------------------------------------------------------------------


def compact(value: Any) -> str:
    """JSON text as a writer using ensure_ascii=False writes it: ASCII-only text reads as flavor 2,
    any other as flavor 4."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_a_json_string_that_changes_flavor_reports_only_what_changed(session):
    base = {"big": "x" * 600, "list": [{"i": i, "pad": "p" * 60} for i in range(200)], "u": "plain"}
    changes = recorded_diff(session, {"c": compact(base)}, {"c": compact({**base, "u": "é"})})
    assert changes == [{"path": "/u", "op": "replace", "kind": "changed", "old": "plain", "new": "é", "string_path": "/c"}]
    # Back to ASCII, with a member over INLINE_MAX changed as well.
    changes = recorded_diff(session, {"c": compact({**base, "u": "é"})}, {"c": compact({**base, "big": "z" * 600})})
    assert brief(changes) == [("changed", "/big"), ("changed", "/u")]
    assert [(change["old"], change["new"]) for change in changes] == [("x" * 600, "z" * 600), ("é", "plain")]


def test_a_json_string_that_changes_flavor_still_reports_values_that_differ_only_as_json(session):
    base = {"pad": "p" * 9000, "n": 1, "flag": 1, "nested": {"pad": "q" * 600, "x": 1}}
    changes = recorded_diff(
        session, {"c": compact(base)}, {"c": compact({**base, "n": 1.0, "flag": True, "nested": {"pad": "q" * 600, "x": 1.0}, "u": "é"})}
    )
    assert [(c["path"], c.get("old"), c["new"]) for c in changes] == [
        ("/flag", 1, True), ("/n", 1, 1.0), ("/nested/x", 1, 1.0), ("/u", None, "é"),
    ]
    assert all(type(c.get("old")) is not type(c["new"]) for c in changes[:3])


def test_a_json_string_with_a_lone_surrogate_is_diffed_as_a_string(session):
    # An escaped lone surrogate is valid JSON text, but no UTF-8 text (so no answer) can hold it.
    a, b = json.dumps({"x": "\ud800a"}), json.dumps({"x": "\ud800b"})
    assert recorded_diff(session, {"c": a}, {"c": b}) == [
        {"path": "/c", "op": "replace", "kind": "changed", "old": a, "new": b},
    ]
    long_a, long_b = (json.dumps({"x": "\udc00" + end, "pad": "p" * 9000}) for end in "ab")  # a node of its own
    assert recorded_diff(session, {"c": long_a}, {"c": long_b}) == [
        {"path": "/c", "op": "replace", "kind": "changed", "old": long_a, "new": long_b},
    ]


def test_a_json_string_holding_emoji_as_surrogate_pairs_is_still_diffed_as_structure(session):
    for pad in ("", "p" * 9000):
        changes = recorded_diff(session, {"c": json.dumps({"x": "😀", "n": 1, "pad": pad})},
                                {"c": json.dumps({"x": "😀", "n": 2, "pad": pad})})
        assert changes == [{"path": "/n", "op": "replace", "kind": "changed", "old": 1, "new": 2, "string_path": "/c"}]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "18446744073709551616"])
def test_a_json_string_holding_a_number_json_values_cannot_hold_is_diffed_as_a_string(constant):
    a, b = f'{{"x": {constant}, "n": 1}}', f'{{"x": {constant}, "n": 2}}'
    assert diff_values({"c": a}, {"c": b}).changes == [
        {"path": "/c", "op": "replace", "kind": "changed", "old": a, "new": b},
    ]
    assert diff_values({"c": '{"x": 1}'}, {"c": f'{{"x": {constant}}}'}).changes == [
        {"path": "/c", "op": "replace", "kind": "changed", "old": '{"x": 1}', "new": f'{{"x": {constant}}}'},
    ]


@pytest.mark.parametrize(("value", "structure"), [
    ("\ud800a", False), ("\udfff", False), (math.nan, False), (-math.inf, False), ("😀", True),
])
def test_json_strings_are_stored_as_structure_only_if_they_hold_json_values(value, structure):
    text = json.dumps({"x": value, "pad": "p" * 9000})  # what Python writes: lone surrogates escaped, NaN bare
    writer = tree.TreeWriter(lambda digests: set())
    writer.write_root({"c": text}, dumps({"c": text}))
    kinds = {tree.Node.decode(encoding).kind for encoding in writer.new_nodes.values()}
    assert (tree.KIND_JSON_STRING in kinds) is structure


# Deep states --------------------------------------------------------------------------------------


def nested(depth: int, leaf: Any) -> dict[str, Any]:
    """A state `depth` levels deep as the depth limit counts them: an object, arrays, the leaf."""
    value = leaf
    for _ in range(depth - 2):
        value = [value]
    return {"a": value}


def test_states_nested_to_the_depth_limit_diff_and_finalize(session, settings):
    depth = settings.STATE_MAX_DEPTH
    changes = recorded_diff(session, nested(depth, 1), nested(depth, 2))
    assert changes == [{"path": "/a" + "/0" * (depth - 2), "op": "replace", "kind": "changed", "old": 1, "new": 2}]
    second = Version.objects.get(session=session, number=2)
    tasks.finalize_versions([second.pk])
    second.refresh_from_db()
    assert (second.summary["changed"], second.summary["paths"]) == (1, ["/a" + "/0" * (depth - 2)])


def test_a_json_string_with_two_changes_is_one_path_in_the_summary(session):
    before = {"ctx": json.dumps({"a": 1, "b": 1, "c": 1}), "n": 1}
    after = {"ctx": json.dumps({"a": 2, "b": 1, "c": 2}), "n": 2}
    assert len(recorded_diff(session, before, after)) == 3
    second = Version.objects.get(session=session, number=2)
    tasks.finalize_versions([second.pk])
    second.refresh_from_db()
    assert (second.summary["paths"], second.summary["total_paths"]) == (["/ctx", "/n"], 2)
    assert second.summary["changed"] == 3


@override_settings(STATE_MAX_DEPTH=250)
def test_states_nested_to_a_raised_depth_limit_diff(session):
    pad = {"pad": "p" * 600}  # a node at every level
    a: Any = 1
    b: Any = 2
    for _ in range(120):
        a, b = [a, pad], [b, pad]
    changes = recorded_diff(session, nested(128, a), nested(128, b))
    assert brief(changes) == [("changed", "/a" + "/0" * 126 + "/0" * 120)]


def test_json_nested_deep_inside_a_string_of_a_deep_state_diffs():
    inner_a, inner_b = "[" * 250 + "1" + "]" * 250, "[" * 250 + "2" + "]" * 250
    changes = diff_values(nested(200, inner_a), nested(200, inner_b)).changes
    assert brief(changes) == [("changed", "/0" * 250)]
    assert changes[0]["string_path"] == "/a" + "/0" * 198


def test_path_history_of_a_large_container_keeps_what_its_rows_show_not_the_values(session):
    """Each row held the value at the path: the history of a 9 MB list kept up to 100 of them, parsed,
    and a web process grew to gigabytes. Rows keep what they show, and small values (the chart's)."""
    from snapshots_app.selectors import path_history

    for n in range(1, 5):
        snapshot_record(session=session, state={"docs": [{"id": i, "text": "x" * 300} for i in range(n)],
                                                "note": "y" * 500 + str(n // 3), "count": n})
    docs = path_history(session, "/docs")
    assert [(p.value, p.shown, p.changed) for p in docs] == [
        (None, "[1 item]", False), (None, "[2 items]", True), (None, "[3 items]", True), (None, "[4 items]", True)]
    notes = path_history(session, "/note")
    assert [(p.value, p.changed) for p in notes] == [(None, False), (None, False), (None, True), (None, False)]
    assert notes[2].shown.startswith('"yyy') and notes[2].shown.endswith("…")
    assert [(p.value, p.shown) for p in path_history(session, "/count")] == [(n, str(n)) for n in range(1, 5)]


@pytest.mark.parametrize(("states", "pointer"), [
    # One version edits the value, then removes an item before it: the value shifts and changed.
    ([{"h": [{"t": i} for i in range(8)]}, {"h": [{"t": i} for i in (0, 1, 3, 4, 6, 6, 7)]}], "/h/5/t"),
    ([{"h": [{"t": i} for i in range(8)]}, {"h": [{"t": i} for i in (0, 1, 3, 4, 6, 6, 7)]}], "/h/5"),
    # A member changed and a key that reads as an index added beside it: an object shifts nothing.
    ([{"$id": 1}, {"$id": 2, "2024": "x"}], "/$id"),
    ([{}, {"": None, "0": None, "a": None}], "/"),
    # A key of digits that is no index ("²"); a pointer naming an index with a leading zero.
    ([{"o": {"5": 1, "\u00b2": 2}}, {"o": {"5": 1, "\u00b2": 2, "7": 3}}, {"o": {"\u00b2": 4}}], "/o/\u00b2"),
    ([{"h": ["a", "b", "c"]}, {"h": ["a", "b", "C"]}, {"h": ["a", "b", "D"]}], "/h/02"),
])
def test_path_history_agrees_with_each_versions_whole_state(session, states, pointer):
    """Cases the diff-following path history got wrong (a review found them): each row must show what
    reading that version's whole state shows, and mark a change exactly where the value differs."""
    from tests.snapshots_app.test_history_properties import path_rows, whole_state_rows

    for state in states:
        snapshot_record(session=session, state=state)
    assert path_rows(session, pointer) == whole_state_rows(states, pointer)


def test_path_history_follows_items_that_shift_and_marks_only_real_changes(session):
    """Path history (the dashboard's "in which versions did this change"): an item inserted at the
    front of a list moves the others, so /items/1 holds another item; it kept showing the old one
    as unchanged. A parent replaced and restored with the same child, or a path absent from every
    version, is not a change: those rows were marked changed."""
    from snapshots_app.selectors import path_history

    for state in (
        {"items": [{"name": "a"}, {"name": "b"}], "c": {"t": 1}},
        {"items": [{"name": "z"}, {"name": "a"}, {"name": "b"}], "c": {"t": 1}},  # z inserted first
        {"items": [{"name": "z"}, {"name": "a"}, {"name": "b"}], "c": [1]},  # c replaced whole
        {"items": [{"name": "z"}, {"name": "a"}], "c": {"t": 1}},  # b removed, c as before
        {"items": [{"name": "z"}, {"name": "a"}], "c": {"t": True}},  # 1 -> true (equal in Python)
    ):
        snapshot_record(session=session, state=state)

    def rows(pointer: str) -> list[tuple[Any, bool, bool]]:
        return [(point.value, point.present, point.changed) for point in path_history(session, pointer)]

    assert rows("/items/1/name") == [("b", True, False), ("a", True, True), ("a", True, False), ("a", True, False),
                                     ("a", True, False)]
    assert rows("/items/2/name") == [(None, False, False), ("b", True, True), ("b", True, False),
                                     (None, False, True), (None, False, False)]
    assert rows("/c/t") == [(1, True, False), (1, True, False), (None, False, True), (1, True, True),
                            (True, True, True)]
    assert [changed for _, _, changed in rows("/c/t/")] == [False] * 5  # (the key "" under a number: never there)

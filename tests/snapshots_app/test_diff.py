"""What a diff shows (its change list) where the trees' shapes make it hard: arrays paged on one side
only or shifted by an insertion, JSON strings spelled in two flavors or holding what JSON values
cannot, and states nested as deep as the store allows. Through the services, on the real database,
and on in-memory values where the tree plays no part."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest

from snapshots_app import tree
from snapshots_app.canonical import dumps
from snapshots_app.diff import apply_patch, diff_values
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


# JSON held in strings -----------------------------------------------------------------------------


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


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400"])
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

"""The tree and diff algorithms on their own (no database): exact round trips and correct patches."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshots_app import tree
from snapshots_app.canonical import dumps
from snapshots_app.diff import apply_patch, diff_trees, diff_values

SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


@pytest.fixture(autouse=True, params=["split-fine", "split-default"])
def split_min(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run every test twice: as configured (subtrees up to SPLIT_MIN and full runs up to RUN_LEAF_MAX
    stay whole) and with every subtree over INLINE_MAX split and long strings with lines cut into
    small chunks, so the run, member-run and chunk paths get exercised by small states too."""
    if request.param == "split-fine":
        monkeypatch.setattr(tree, "SPLIT_MIN", tree.INLINE_MAX)
        monkeypatch.setattr(tree, "RUN_LEAF_MAX", 0)
        monkeypatch.setattr(tree, "STRING_CHUNK_MIN", 40)
    return tree.SPLIT_MIN


class MemoryNodes:
    """An in-memory node table standing in for the database in pure tests."""

    def __init__(self) -> None:
        self.raw: dict[bytes, bytes] = {}

    def existing(self, digests: set[bytes]) -> set[bytes]:
        return {d for d in digests if d in self.raw}

    def nodes(self, digests: set[bytes]) -> dict[bytes, tree.Node]:
        return {d: tree.Node.decode(self.raw[d]) for d in digests if d in self.raw}

    def write(self, state: dict[str, Any]) -> tuple[bytes, dict[bytes, bytes]]:
        writer = tree.TreeWriter(self.existing)
        root = writer.write_root(state, dumps(state))
        self.raw.update(writer.new_nodes)
        return root, writer.new_nodes

    def read(self, root: bytes) -> bytes:
        return tree.assemble(root, self.nodes)[0]


@st.composite
def repeated(draw: st.DrawFn, piece_max: int, times: int, *, min_size: int = 0) -> str:
    """Text made of a random piece repeated (a prefix keeps any length possible), at least `min_size`
    long. Hypothesis draws text a character at a time: drawn whole, 500-900 character strings and
    lines of up to 90 took 80% of these tests' time (53 s for one of them)."""
    prefix = draw(st.text(max_size=8))
    piece = draw(st.text(min_size=1, max_size=piece_max))
    least = max(1, -(-(min_size - len(prefix)) // len(piece)))
    return prefix + piece * draw(st.integers(min_value=least, max_value=least + times))


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    repeated(30, 30, min_size=500).map(lambda text: text[:900]),  # long strings become their own nodes
    st.lists(repeated(10, 8), min_size=10, max_size=40).map("\n".join),  # ... with lines: chunks
)
# recursive() almost never grows a list past 32 items (paged runs) or an object past 64 members
# (member runs): 0 of 120 states had one. Those paths get edited_wide_states below (as leaves here,
# wide values made these tests 3x slower).
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=80),
        st.dictionaries(st.text(max_size=12), children, max_size=90),
    ),
    max_leaves=250,
)
small = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=8))
states = st.dictionaries(st.text(max_size=12), json_values, max_size=20)


def embedded(value: Any) -> str:
    """JSON text inside a string, as LlamaIndex Workflows writes it."""
    return json.dumps({"value": value, "padding": "p" * 600})


@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESSED)
@given(states)
def test_every_state_splices_back_to_its_canonical_bytes(state):
    nodes = MemoryNodes()
    root, _ = nodes.write(state)
    assert nodes.read(root) == dumps(state)


@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESSED)
@given(states, states)
def test_applying_the_diff_patch_to_a_gives_b(a, b):
    nodes = MemoryNodes()
    root_a, _ = nodes.write(a)
    root_b, _ = nodes.write(b)
    result = diff_trees(root_a, root_b, nodes)
    assert dumps(apply_patch(a, result.patch)) == dumps(b)
    assert (result.changes == []) == (dumps(a) == dumps(b))
    assert dumps(apply_patch(a, diff_values(a, b).patch)) == dumps(b)


@st.composite
def edited_wide_states(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A long list and a wide object, then the same with a few items inserted, removed or replaced
    and members added or removed: what an engine's step does to a history or a store."""
    items = draw(st.lists(small, min_size=33, max_size=400))
    members = draw(st.dictionaries(st.text(max_size=12), small, min_size=65, max_size=200))
    edited, changed = list(items), dict(members)
    for _ in range(draw(st.integers(1, 8))):
        where = draw(st.integers(0, len(edited)))
        kind = draw(st.sampled_from(["insert", "remove", "replace", "member"]))
        if kind == "insert" or not edited:
            edited.insert(where, draw(small))
        elif kind == "remove":
            del edited[min(where, len(edited) - 1)]
        elif kind == "replace":
            edited[min(where, len(edited) - 1)] = draw(small)
        elif draw(st.booleans()) and changed:
            del changed[draw(st.sampled_from(sorted(changed)))]
        else:
            changed[draw(st.text(max_size=12))] = draw(small)
    return {"history": items, "store": members}, {"history": edited, "store": changed}


@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESSED)
@given(edited_wide_states())
def test_a_few_edits_to_long_runs_read_back_and_diff_exactly(pair):
    a, b = pair
    nodes = MemoryNodes()
    root_a, _ = nodes.write(a)
    root_b, _ = nodes.write(b)
    assert nodes.read(root_a) == dumps(a) and nodes.read(root_b) == dumps(b)
    result = diff_trees(root_a, root_b, nodes)
    assert dumps(apply_patch(a, result.patch)) == dumps(b)
    assert (result.changes == []) == (dumps(a) == dumps(b))


@settings(max_examples=60, deadline=None, suppress_health_check=SUPPRESSED)
@given(json_values, json_values)
def test_json_strings_round_trip_and_diff_structurally(inner_a, inner_b):
    a = {"store": embedded(inner_a), "compact": json.dumps([inner_a] * 3, separators=(",", ":"))}
    b = {"store": embedded(inner_b), "compact": a["compact"]}
    nodes = MemoryNodes()
    root_a, _ = nodes.write(a)
    root_b, _ = nodes.write(b)
    assert nodes.read(root_a) == dumps(a)
    assert nodes.read(root_b) == dumps(b)
    result = diff_trees(root_a, root_b, nodes)
    assert dumps(apply_patch(a, result.patch)) == dumps(b)
    for change in result.changes:
        if "string_path" in change:
            assert change["string_path"] == "/store"


def test_json_string_changes_are_reported_inside_the_string():
    a = {"ctx": json.dumps({"counter": 1, "history": ["x" * 300] * 5})}
    b = {"ctx": json.dumps({"counter": 2, "history": ["x" * 300] * 5})}
    nodes = MemoryNodes()
    result = diff_trees(nodes.write(a)[0], nodes.write(b)[0], nodes)
    assert result.changes == [
        {"path": "/counter", "op": "replace", "kind": "changed", "old": 1, "new": 2, "string_path": "/ctx"}
    ]
    assert result.patch == [{"op": "replace", "path": "/ctx", "value": b["ctx"]}]


def test_appending_to_a_long_history_stores_only_the_change():
    history = [{"role": "user", "content": f"message {i} " + "lorem ipsum " * 40} for i in range(2000)]
    nodes = MemoryNodes()
    state = {"messages": history, "counter": 1}
    nodes.write(state)
    state = {"messages": [*history, {"role": "assistant", "content": "one more " * 40}], "counter": 2}
    _, new_nodes = nodes.write(state)
    added = sum(len(raw) for raw in new_nodes.values())
    assert len(dumps(state)) > 1_000_000
    assert added < 5_000, f"appending one message stored {added} bytes"


def test_identical_state_stores_nothing_new():
    nodes = MemoryNodes()
    state = {"a": ["x" * 1000] * 3}
    nodes.write(state)
    _, new_nodes = nodes.write(orjson.loads(dumps(state)))
    assert new_nodes == {}


def test_diff_of_one_field_in_a_large_state_reads_few_nodes():
    state = {"messages": [{"content": "m" * 1000, "i": i} for i in range(5000)], "counter": 1}
    changed = {**state, "messages": [*state["messages"]]}
    changed["messages"][2500] = {"content": "m" * 1000, "i": -1}
    nodes = MemoryNodes()
    root_a, root_b = nodes.write(state)[0], nodes.write(changed)[0]

    fetched: list[int] = []

    class Counting:
        def nodes(self, digests):
            fetched.append(len(digests))
            return nodes.nodes(digests)

    result = diff_trees(root_a, root_b, Counting())
    assert result.changes == [{"path": "/messages/2500/i", "op": "replace", "kind": "changed", "old": 2500, "new": -1}]
    assert sum(fetched) < 20, f"diff fetched {sum(fetched)} nodes of a {len(nodes.raw)}-node store"


def test_queue_pop_reads_as_one_removal():
    a = {"queue": ["a", "b", "c", "d"]}
    b = {"queue": ["b", "c", "d"]}
    result = diff_values(a, b)
    assert result.changes == [{"path": "/queue/0", "op": "remove", "kind": "removed", "old": "a"}]


def test_a_queue_that_moved_on_reads_as_removals_and_additions_not_every_slot_changed():
    events = [{"id": n, "type": "ToolCallEvent", "payload": {"note": f"event {n} " + "x" * 600}} for n in range(8)]
    nodes = MemoryNodes()
    a, b = {"queue": events[:5]}, {"queue": events[2:8]}  # two popped from the front, three pushed
    for result in (diff_values(a, b), diff_trees(nodes.write(a)[0], nodes.write(b)[0], nodes)):
        assert [(c["op"], c["path"]) for c in result.changes] == [
            ("remove", "/queue/1"), ("remove", "/queue/0"), ("add", "/queue/3"), ("add", "/queue/4"), ("add", "/queue/5"),
        ]
        assert [c.get("old", c.get("new"))["id"] for c in result.changes] == [1, 0, 5, 6, 7]
        assert apply_patch(a, result.patch) == b


def test_items_between_equal_ones_are_compared_in_place():
    a = {"list": [{"k": 1, "v": "a"}, "keep", {"k": 2, "v": "b"}, "also", 3]}
    b = {"list": [{"k": 1, "v": "A"}, "keep", {"k": 2, "v": "B"}, "also", "new", "newer"]}
    result = diff_values(a, b)
    assert [(c["op"], c["path"]) for c in result.changes] == [
        ("replace", "/list/0/v"), ("replace", "/list/2/v"), ("replace", "/list/4"), ("add", "/list/5"),
    ]
    assert apply_patch(a, result.patch) == b


def test_a_log_that_grows_by_lines_stores_its_new_tail_not_itself_again():
    lines = [f"{n:04d} observed the tool output and planned the next call \u00e9\"quoted\"" for n in range(400)]
    nodes = MemoryNodes()
    state = {"log": "\n".join(lines), "step": 1}
    nodes.write(state)
    state = {"log": state["log"] + "\none more line", "step": 2}
    root, new_nodes = nodes.write(state)
    assert nodes.read(root) == dumps(state)
    assert len(dumps(state)) > 25_000
    assert sum(len(raw) for raw in new_nodes.values()) < 3_000


def test_pointer_escaping_in_paths():
    result = diff_values({"a/b": {"c~d": 1}}, {"a/b": {"c~d": 2}})
    assert result.changes[0]["path"] == "/a~1b/c~0d"
    assert apply_patch({"a/b": {"c~d": 1}}, result.patch) == {"a/b": {"c~d": 2}}

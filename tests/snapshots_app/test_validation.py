"""The fast state validator agrees with the value-by-value one it falls back to for messages, and
canonical bytes built from a state's members are the canonical bytes."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions_app.errors import InvalidState
from snapshots_app.canonical import dumps, dumps_state, explain, validate_state


class Level(enum.IntEnum):
    LOW = 1


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=5),
    st.just(Level.LOW), st.tuples(st.integers()), st.sets(st.integers(), max_size=2),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), children, max_size=5),
    ),
    max_leaves=30,
)


def outcome(check: Any, value: Any, max_depth: int) -> str | None:
    try:
        check(value, max_depth=max_depth)
    except InvalidState as exc:
        return str(exc)
    return None


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=4), values, max_size=6), st.integers(min_value=1, max_value=6))
def test_fast_validation_refuses_what_the_full_walk_refuses(state, max_depth):
    fast, full = outcome(validate_state, state, max_depth), outcome(explain, state, max_depth)
    if full is None:
        assert fast is None
    elif "keys must be strings" in full or "64-bit" in full:
        pass  # orjson.dumps refuses these in state_prepare (tested in test_store's bad-input table)
    else:
        assert fast is not None, full


@pytest.mark.parametrize("state", [{"x": float("nan")}, {"x": [float("inf")]}, {"x": (1, 2)}, {"x": {1, 2}}])
def test_values_json_cannot_hold_are_refused(state):
    with pytest.raises(InvalidState):
        validate_state(state, max_depth=10)


@pytest.mark.parametrize("state", [{"x": [1e308, 1e308]}, {"x": [-1e308], "y": {"z": [-1e308, 0.5]}}])
def test_finite_floats_whose_sum_overflows_are_accepted(state):
    """validate_state spots NaN and Infinity by summing a level's floats; finite ones that
    overflow the sum are JSON all the same."""
    validate_state(state, max_depth=10)


def test_nan_among_many_finite_floats_deep_down_is_refused():
    state = {"runs": [{"scores": [0.5, 1.5, float("nan") if i == 7 else 2.5]} for i in range(10)]}
    with pytest.raises(InvalidState, match="NaN and Infinity are not JSON \\(at /runs/7/scores/2\\)"):
        validate_state(state, max_depth=10)


def test_depth_is_enforced_level_by_level():
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5):
        node["a"] = {}
        node = node["a"]
    validate_state(deep, max_depth=6)
    with pytest.raises(InvalidState, match="deeper than 5"):
        validate_state(deep, max_depth=5)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.text(max_size=8),
              st.floats(allow_nan=False, allow_infinity=False)),
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=6), children, max_size=5)),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=8))
def test_a_state_and_its_members_encode_to_its_canonical_bytes(state):
    """The write keeps its members' bytes for the tree (canonical.dumps_state): they must spell the
    canonical bytes exactly, keys sorted as orjson sorts them."""
    data, members = dumps_state(state)
    assert data == dumps(state)
    assert members == {key: dumps(value) for key, value in state.items()}

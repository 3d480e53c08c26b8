"""A long, seeded history of large states, the shapes the hypothesis tests (small states) do not
reach: arrays paged two levels deep (over 1,024 items), objects split into member runs (over 64
members), a JSON string kept as structure and a log kept in line chunks; edited by insertions,
deletions, moves and slices, rewound, forked, and compacted in between. Every version reads back
exactly, and diff(a, b) applied to a gives b, also across forks."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import orjson
import pytest

from snapshots_app.canonical import dumps
from snapshots_app.compaction import compaction_run
from snapshots_app.diff import apply_patch
from snapshots_app.selectors import version_pair_diff, version_with_state_bytes
from snapshots_app.services import snapshot_fork, snapshot_record, snapshot_rewind
from snapshots_app.tree import OBJECT_RUN_MIN, PAGE
from tests.conftest import clear_cache
from tests.factories import make_session

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
EDITS = ("insert", "delete", "replace", "append", "move", "slice", "member_add", "member_drop", "member_set",
         "json_string", "log", "counter", "rewind", "fork", "switch")


class History:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self, words: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(words))

    def value(self) -> Any:
        roll = self.rng.random()
        if roll < 0.3:
            return self.rng.randint(-10**6, 10**6)
        if roll < 0.5:
            return self.text(self.rng.randint(0, 8))
        if roll < 0.6:
            return self.rng.random() * 1000
        if roll < 0.7:
            return None if roll < 0.65 else roll < 0.67
        return {"role": self.rng.choice(["user", "tool"]), "content": self.text(self.rng.randint(1, 40))}

    def first_state(self) -> dict[str, Any]:
        return {
            "messages": [self.value() for _ in range(PAGE * PAGE + 100)],
            "wide": {f"k{i:04d}": self.value() for i in range(OBJECT_RUN_MIN + 40)},
            "store": {"ctx": json.dumps({"items": [self.value() for _ in range(200)], "n": 1})},
            "log": "\n".join(self.text(self.rng.randint(3, 15)) for _ in range(300)),
            "counter": 0,
        }

    def edited(self, state: dict[str, Any], edit: str) -> dict[str, Any]:
        state = copy.deepcopy(state)
        rng, messages, wide = self.rng, state["messages"], state["wide"]
        if edit == "insert":
            messages.insert(rng.randrange(len(messages) + 1), self.value())
        elif edit == "delete" and messages:
            del messages[rng.randrange(len(messages))]
        elif edit == "replace" and messages:
            messages[rng.randrange(len(messages))] = self.value()
        elif edit == "append":
            messages.extend(self.value() for _ in range(rng.randint(1, 60)))
        elif edit == "move" and len(messages) > 2:
            moved = messages.pop(rng.randrange(len(messages)))
            messages.insert(rng.randrange(len(messages)), moved)
        elif edit == "slice":
            start = rng.randrange(len(messages) + 1)
            del messages[start : start + rng.randint(1, 200)]
        elif edit == "member_add":
            wide[f"k{rng.randint(0, 9999):04d}x"] = self.value()
        elif edit == "member_drop" and wide:
            del wide[rng.choice(sorted(wide))]
        elif edit == "member_set" and wide:
            wide[rng.choice(sorted(wide))] = self.value()
        elif edit == "json_string":
            inner = json.loads(state["store"]["ctx"])
            inner["n"] += 1
            inner["items"].insert(rng.randrange(len(inner["items"]) + 1), self.value())
            state["store"]["ctx"] = json.dumps(inner)
        elif edit == "log":
            lines = state["log"].split("\n")
            at = rng.randrange(len(lines) + 1)
            lines[at:at] = [self.text(rng.randint(3, 15)) for _ in range(rng.randint(1, 4))]
            state["log"] = "\n".join(lines)
        elif edit == "counter":
            state["counter"] += 1
        return state


@pytest.mark.django_db(transaction=True)  # compaction runs its own transactions, as a worker's would
def test_a_long_history_of_large_states_reads_back_and_diffs_exactly_through_rewinds_forks_and_compaction(project):
    history = History(seed=7)
    main = make_session(project, "large")
    sessions, current = [main], main
    states = {main.pk: history.first_state()}
    expected: dict[tuple[Any, int], bytes] = {}  # (session, number) -> the canonical bytes it must read back as
    expected[(main.pk, snapshot_record(session=main, state=states[main.pk]).number)] = dumps(states[main.pk])
    for step in range(1, 121):
        edit = history.rng.choice(EDITS)
        current.refresh_from_db()
        if edit == "rewind":
            target = history.rng.randint(1, current.head_number)
            version = snapshot_rewind(session=current, to_version=target, reason="large history")
            expected[(current.pk, version.number)] = expected[(current.pk, target)]
            states[current.pk] = orjson.loads(expected[(current.pk, target)])
        elif edit == "fork":
            target = history.rng.randint(1, current.head_number)
            fork = snapshot_fork(session=current, from_version=target, reason="large history")
            expected[(fork.pk, 1)] = expected[(current.pk, target)]
            states[fork.pk] = orjson.loads(expected[(current.pk, target)])
            sessions.append(fork)
        elif edit == "switch":
            current = history.rng.choice(sessions)
        else:
            state = history.edited(states[current.pk], edit)
            expected[(current.pk, snapshot_record(session=current, state=state).number)] = dumps(state)
            states[current.pk] = state
        if step % 40 == 0:
            compaction_run(project=project, apply_retention=False)  # collection and re-encoding, mid-history

    clear_cache()
    by_id = {session.pk: session for session in sessions}
    assert len(sessions) > 1 and len(expected) > 100
    for (session_id, number), canonical in expected.items():
        assert bytes(version_with_state_bytes(session=by_id[session_id], number=number)[1]) == canonical
    ends = sorted(expected, key=str)
    for _ in range(60):
        (first_session, first), (second_session, second) = history.rng.sample(ends, 2)
        diff = version_pair_diff(session=by_id[first_session], number=first, other_session=by_id[second_session],
                                 other_number=second)[2]
        patched = apply_patch(orjson.loads(expected[(first_session, first)]), diff.patch)
        assert dumps(patched) == expected[(second_session, second)]

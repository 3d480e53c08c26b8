"""Garbage collection never leaves a stored node without its descendants, between any two batches.

Writers reuse a stored node as a whole subtree without looking below it, so a sweep that deleted a
child before its (garbage) parent would let a concurrent write commit a version with a hole in it.
"""

from __future__ import annotations

import pytest

from sessions_app.services import session_delete
from snapshots_app import tree
from snapshots_app.compaction import compaction_run
from snapshots_app.models import StateNode
from snapshots_app.store import ProjectStore
from tests.factories import make_project
from tests.workers.builders import read_all, record_history

pytestmark = pytest.mark.django_db


def stored_nodes_are_closed(project_id: int) -> bool:
    rows = StateNode.objects.filter(project_id=project_id).values_list("digest", flat=True)
    stored = {bytes(d) for d in rows}
    nodes = ProjectStore(project_id, use_cache=False).nodes(stored)
    return all(child in stored for node in nodes.values() for child in node.children)


def test_every_sweep_batch_deletes_parents_before_children(settings, monkeypatch):
    settings.COMPACTION_BATCH_SIZE = 1  # one node per transaction: every intermediate state is visible
    monkeypatch.setattr(tree, "SPLIT_MIN", tree.INLINE_MAX)  # deep trees: a garbage DAG of many levels
    monkeypatch.setattr(tree, "RUN_LEAF_MAX", 0)
    project = make_project("gc-order")
    doomed = record_history(project, "doomed", 4)
    record_history(project, "kept", 2)
    expected = {key: data for key, data in read_all(project).items() if key[0] == "kept"}
    session_delete(session=doomed, reason="test")
    checks: list[bool] = []

    def after_each_batch(done: int, total: int | None = None, *, force: bool = False) -> None:
        checks.append(stored_nodes_are_closed(project.pk))

    result = compaction_run(project=project, apply_retention=False, recompress=False, progress=after_each_batch)
    assert result["nodes_freed"] > 5
    assert len(checks) > result["nodes_freed"] and all(checks)
    assert read_all(project) == expected

"""Compaction, trim and session deletion on the embedded default (`make run`: SQLite, no services):
the statements PostgreSQL gets in one piece (bulk delete with RETURNING, update from unnest) and the
raw deletes of versions have portable forms there.

Runs in a child process with DATABASE_URL and REDIS_URL unset, against a SQLite database of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json
from datetime import timedelta

import django

django.setup()
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

call_command("migrate", verbosity=0)
assert connection.vendor == "sqlite", connection.vendor

from sessions_app.services import project_create, session_delete, session_get_or_create
from snapshots_app import compaction, selectors, store
from snapshots_app.canonical import dumps
from snapshots_app.models import StateNode, Version
from snapshots_app.services import session_trim, snapshot_fork, snapshot_record
from tests.factories import _text, agent_state

project = project_create(name="Embedded", slug="embedded")
session, _ = session_get_or_create(project=project, external_id="s")
written = {}
for step in range(1, 251):  # a new 3 KB tool result each step: enough zstd nodes to train a dictionary
    state = {**agent_state(step % 7, history=20), "tool_result": _text(step, 3000)}
    written[snapshot_record(session=session, state=state).number] = dumps(state)
recompressed = compaction.compaction_run(project=project, apply_retention=False)
compaction.retention_policy_set(project=project, enabled=True, keep_last=3, keep_days=0, thin_to="day")
thinned = compaction.compaction_run(project=project, now=timezone.now() + timedelta(days=2))
store.node_lru.clear()
left = list(Version.objects.filter(session=session).select_related("session"))
for version in left:
    assert selectors.version_state_bytes(version) == written[version.number], version.number
session.refresh_from_db()
trimmed = session_trim(session=session, keep=[session.head_number], reason="only the head")
gone, _ = session_get_or_create(project=project, external_id="gone")
for step in range(3):
    snapshot_record(session=gone, state={"step": step})
fork = snapshot_fork(session=gone, from_version=2, reason="keep a copy")
session_delete(session=gone, reason="done with it")
print(json.dumps({
    "trimmed": trimmed.removed, "trim_left": Version.objects.filter(session=session).count(),
    "deleted_left": Version.objects.filter(session_id=gone.pk).count(),
    "fork": [(v.parent_id, selectors.version_state_bytes(v).decode()) for v in Version.objects.filter(session=fork)],
    "recompressed": recompressed["nodes_recompressed"], "saved": recompressed["bytes_saved_by_recompression"],
    "removed": thinned["versions_removed"], "freed": thinned["nodes_freed"], "left": len(left),
    "dictionary_nodes": StateNode.objects.filter(project=project, codec=store.CODEC_ZSTD_DICT).count(),
}))
"""


def test_compaction_trim_and_session_deletion_on_the_embedded_sqlite_default(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update(VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (tmp_path / "db.sqlite3").exists()
    # Recompression rewrote nodes with the project's dictionary, and they still read back.
    assert result["recompressed"] > 0 and result["saved"] > 0 and result["dictionary_nodes"] > 0
    # Retention kept the last three (the head among them); garbage collection freed what only the
    # removed versions reached. Every version left reads back as written (checked in the child).
    assert (result["removed"], result["left"]) == (247, 3)
    assert result["freed"] > 0
    # A trim to the head removes the other two; a deleted session takes its versions, not its fork's.
    assert (result["trimmed"], result["trim_left"]) == ([248, 249], 1)
    assert result["deleted_left"] == 0 and result["fork"] == [[None, '{"step":1}']]

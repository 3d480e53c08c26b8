"""Histories for the worker tests: sessions whose versions each add nodes of their own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils import timezone

from sessions_app.models import Project, WorkflowSession
from snapshots_app import store
from snapshots_app.models import Version
from snapshots_app.services import snapshot_record
from tests.factories import make_session


def bulky_state(tag: str, step: int, *, notes: int = 3) -> dict[str, Any]:
    """A state with `notes` ~3 KB strings unique to (tag, step). With one, a version is one node of
    its own. With two or more, the state is over tree.SPLIT_MIN: each version owns its root and its
    notes array (from three on, each note too: five nodes) and all share the "shared" array's."""
    return {
        "pointer": f"{tag}-step-{step}",
        "notes": [f"{tag} v{step} note {k} " + "lorem ipsum " * 250 for k in range(notes)],
        "shared": ["the same long history line " * 30 for _ in range(3)],
        "counters": {"step": step},
    }


def midnight(days_ago: int) -> datetime:
    """Midnight UTC `days_ago` days back: histories that start there fall on the same days whatever
    the time the tests run (retention thins by day and by hour)."""
    day = (timezone.now() - timedelta(days=days_ago)).astimezone(UTC)
    return day.replace(hour=0, minute=0, second=0, microsecond=0)


def record_history(
    project: Project, external_id: str, steps: int, *, start: datetime | None = None, every: timedelta = timedelta(hours=1),
    notes: int = 3,
) -> WorkflowSession:
    """`steps` versions, created_at backdated to start, start+every, ... (oldest first)."""
    session = make_session(project, external_id)
    start = start or midnight(30)
    for step in range(1, steps + 1):
        version = snapshot_record(session=session, state=bulky_state(external_id, step, notes=notes), step=f"s{step}")
        Version.objects.filter(pk=version.pk).update(created_at=start + every * (step - 1))
    session.refresh_from_db()
    return session


def read_all(project: Project) -> dict[tuple[str, int], bytes]:
    """Every version of the project read back from the database alone, verified."""
    versions = Version.objects.filter(session__project=project).select_related("session")
    return {(v.session.external_id, v.number): store.read_canonical(v, use_cache=False) for v in versions}

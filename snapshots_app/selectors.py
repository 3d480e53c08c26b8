"""Reads of versions and states that span rows. Every state read is verified (see store)."""

from __future__ import annotations

from typing import Any

import orjson
from django.db.models import QuerySet

from sessions_app.errors import InvalidState
from sessions_app.models import WorkflowSession
from snapshots_app import store
from snapshots_app.diff import DiffResult, diff_trees
from snapshots_app.models import Version


def version_state_bytes(version: Version) -> bytes:
    """Canonical JSON of the version's state, verified against its checksum."""
    return store.read_canonical(version)


def version_state(version: Version) -> dict[str, Any]:
    return orjson.loads(store.read_canonical(version))


def head_version(session: WorkflowSession) -> Version | None:
    if session.head_number == 0:
        return None
    return Version.objects.select_related("session").get(session=session, number=session.head_number)


def version_diff(a: Version, b: Version, *, structural_strings: bool = True) -> DiffResult:
    """Diff any two versions of one project (also across sessions, e.g. a fork and its source)."""
    if a.session.project_id != b.session.project_id:
        raise InvalidState("versions of different projects cannot be compared")
    # Verify both ends first: a diff of corrupt data must fail like a read of it would.
    store.read_canonical(a)
    store.read_canonical(b)
    return diff_trees(
        bytes(a.root), bytes(b.root), store.ProjectStore(a.session.project_id), structural_strings=structural_strings
    )


def version_list(session: WorkflowSession, *, before: int | None = None, limit: int = 50) -> list[Version]:
    """Newest first, keyset-paginated by number (fast with any number of versions)."""
    queryset = session_versions(session)
    if before is not None:
        queryset = queryset.filter(number__lt=before)
    return list(queryset[:limit])


def session_versions(session: WorkflowSession) -> QuerySet[Version]:
    return (
        Version.objects.filter(session=session)
        .select_related("parent__session", "created_by")
        .order_by("-number")
    )

"""Background work on versions. Tasks take ids, are idempotent and safe to retry or kill."""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from sessions_app import events
from sessions_app.errors import IntegrityProblem
from snapshots_app.models import Version

logger = logging.getLogger(__name__)

SUMMARY_PATHS = 20


@shared_task(acks_late=True, autoretry_for=(ConnectionError,), retry_backoff=True, max_retries=5)
def finalize_version(version_id: int) -> dict | None:
    """Compute a version's change summary against its parent, for the timeline. Idempotent."""
    from snapshots_app.selectors import version_diff

    version = Version.objects.select_related("session", "parent__session").filter(pk=version_id).first()
    if version is None:
        return None  # deleted meanwhile: nothing to do
    if version.summary is not None:
        return version.summary
    parent = version.parent
    if parent is None:
        summary = {"added": 0, "removed": 0, "changed": 0, "paths": [], "bytes_added": version.logical_size,
                   "initial": True}
    elif parent.checksum == version.checksum:
        summary = {"added": 0, "removed": 0, "changed": 0, "paths": [], "bytes_added": 0}
    else:
        try:
            result = version_diff(parent, version)
        except IntegrityProblem:
            logger.exception("cannot summarise version %s: integrity problem", version_id)
            return None
        counts = result.counts
        summary = {
            **counts,
            "paths": [change.get("string_path", change["path"]) for change in result.changes[:SUMMARY_PATHS]],
            "total_paths": len(result.changes),
            "bytes_added": version.logical_size - parent.logical_size,
        }
    summary["stored_bytes"] = version.stored_size
    summary["finalized_at"] = timezone.now().isoformat()
    with transaction.atomic():
        Version.objects.filter(pk=version_id, summary__isnull=True).update(summary=summary)
    events.publish(
        version.session.project_id,
        "version.finalized",
        {"session": str(version.session_id), "version": version.number},
        session_id=version.session_id,
    )
    return summary

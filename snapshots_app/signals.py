"""Reactions of the state store to changes in sessions_app (which must not import snapshots_app)."""

from __future__ import annotations

from functools import partial
from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver

from sessions_app.models import WorkflowSession
from sessions_app.services import session_deleting


@receiver(post_delete, sender=WorkflowSession, dispatch_uid="snapshots_gc_after_session_delete")
def _free_deleted_session_storage(sender: type, instance: WorkflowSession, **kwargs: Any) -> None:
    """A deleted session's versions are gone; free the nodes only they needed, after commit."""
    from snapshots_app.compaction import gc_request

    transaction.on_commit(partial(gc_request, project_id=instance.project_id))


@receiver(pre_delete, sender=WorkflowSession, dispatch_uid="snapshots_forget_deleted_session_copies")
def _forget_deleted_session_copies(sender: type, instance: WorkflowSession, **kwargs: Any) -> None:
    """A deleted session's states must not outlive it outside the database either: the head cache
    held them for a day, and the files of its exports stayed downloadable (and re-importable, which
    brought the session back) for good. Both go once the deletion commits. Exports of the whole
    project are backups of every session, and stay."""
    if getattr(instance, "_copies_forgotten", False):
        return  # session_delete's deletion of its versions did it first (below)
    from snapshots_app import store, transfer

    files = transfer.session_export_files(session=instance)
    cached = store.head_cache_numbers(instance)
    session_id = instance.pk

    def forget() -> None:
        for path in files:
            path.unlink(missing_ok=True)
        store.forget_heads(session_id, cached)

    transaction.on_commit(forget)


@receiver(session_deleting, dispatch_uid="snapshots_delete_versions_of_deleted_session")
def _delete_versions_of_deleted_session(sender: type, session: WorkflowSession, **kwargs: Any) -> None:
    from snapshots_app.compaction import session_versions_delete

    # Its copies first: which of its states the head cache may hold is told by its versions, about to go.
    _forget_deleted_session_copies(sender, session)
    session._copies_forgotten = True  # type: ignore[attr-defined]
    session_versions_delete(session)

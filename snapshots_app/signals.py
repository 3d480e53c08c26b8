"""Reactions of the state store to changes in sessions_app (which must not import snapshots_app)."""

from __future__ import annotations

from functools import partial
from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from sessions_app.models import WorkflowSession


@receiver(post_delete, sender=WorkflowSession, dispatch_uid="snapshots_gc_after_session_delete")
def _free_deleted_session_storage(sender: type, instance: WorkflowSession, **kwargs: Any) -> None:
    """A deleted session's versions are gone; free the nodes only they needed, after commit."""
    from snapshots_app.compaction import gc_request

    transaction.on_commit(partial(gc_request, project_id=instance.project_id))

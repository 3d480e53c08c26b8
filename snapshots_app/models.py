"""Versions (immutable snapshots of a session's state) and the content-addressed nodes behind them."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from sessions_app.models import Project, SessionStatus, WorkflowSession


class VersionKind(models.TextChoices):
    STEP = "step", "Step"
    REWIND = "rewind", "Rewind"
    FORK = "fork", "Fork"
    DATA_FIX = "data_fix", "Data fix"
    IMPORT = "import", "Import"


class Version(models.Model):
    """One immutable snapshot of a session's state, numbered 1..n without gaps per session.

    The state itself is a tree of StateNode rows; the version keeps only the root's digest and the
    SHA-256 of the state's canonical JSON, which every read is verified against.
    """

    session = models.ForeignKey(WorkflowSession, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children",
        help_text="The version this one derives from; another session's version for a fork.",
    )
    kind = models.CharField(max_length=16, choices=VersionKind.choices, default=VersionKind.STEP)
    root = models.BinaryField(max_length=32, help_text="Digest of the state tree's root node.")
    checksum = models.CharField(max_length=64, help_text="SHA-256 of the state's canonical JSON.")
    logical_size = models.BigIntegerField(help_text="Bytes of the state's canonical JSON.")
    stored_size = models.BigIntegerField(default=0, help_text="Compressed bytes of the nodes this version added.")
    step = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=16, choices=SessionStatus.choices, blank=True, default="")
    error = models.TextField(blank=True, default="")
    label = models.CharField(max_length=100, blank=True, default="")
    pinned = models.BooleanField(default=False)
    engine = models.CharField(max_length=100, blank=True, default="")
    engine_version = models.CharField(max_length=50, blank=True, default="")
    tags = models.JSONField(default=list, blank=True)
    reason = models.TextField(blank=True, default="", help_text="Why a rewind, fork or data fix was made.")
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_label = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    # Filled in after commit by the finalize task: {"changed": n, "added": n, "removed": n, "paths": [...], ...}
    summary = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["session", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["session", "number"], name="version_unique_number"),
            models.UniqueConstraint(
                fields=["session", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="version_unique_idempotency_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.session_id} v{self.number}"

    @property
    def has_error(self) -> bool:
        return bool(self.error)


class StateNode(models.Model):
    """One node of a project's content-addressed state trees, stored once per project, compressed.

    `digest` is the BLAKE2b hash of the node's uncompressed encoding (see snapshots_app.tree), so
    identical subtrees in one project are stored once; no node is ever shared across projects.
    """

    pk = models.CompositePrimaryKey("project_id", "digest")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, db_index=False, related_name="+")
    digest = models.BinaryField(max_length=32)
    codec = models.PositiveSmallIntegerField(default=0, help_text="0 = raw, 1 = zstd, 2 = zstd with project dictionary.")
    data = models.BinaryField()
    raw_size = models.PositiveIntegerField()

    class Meta:
        verbose_name = "state node"

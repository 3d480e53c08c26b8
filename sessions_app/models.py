"""Tenancy (projects, members, API keys), workflow sessions and the audit log."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.utils import timezone


class Project(models.Model):
    """A tenant: owns sessions, API keys and members. Nothing crosses projects."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    VIEWER = "viewer", "Viewer"
    OPERATOR = "operator", "Operator"
    ADMIN = "admin", "Admin"


ROLE_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


class Membership(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "user"], name="membership_unique_project_user")]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} ({self.role})"


class Names(frozenset[str]):
    """An enum's values, for membership tests: the enum builds its list of them anew on each use (60 µs
    for the statuses, 2% of a snapshot write). A value that is not text (a list or an object from JSON)
    is in none, where a plain frozenset would raise TypeError (unhashable)."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and super().__contains__(value)


class SessionStatus(models.TextChoices):
    RUNNING = "running", "Running"
    WAITING = "waiting", "Waiting"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


SESSION_STATUSES = Names(SessionStatus.values)


class WorkflowSession(models.Model):
    """One workflow run / thread / conversation. Its versions live in snapshots_app."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: session_unique_external_id (project, external_id) leads with it.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, db_index=False, related_name="sessions")
    external_id = models.CharField(max_length=255, help_text="The engine's own session / thread id.")
    workflow = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=16, choices=SessionStatus.choices, default=SessionStatus.RUNNING)
    metadata = models.JSONField(default=dict, blank=True)
    tags = models.JSONField(default=list, blank=True)
    # Denormalised head and statistics, maintained by the snapshot services (and finalize task).
    head_number = models.PositiveIntegerField(default=0, help_text="Number of the head version; 0 = none yet.")
    version_count = models.PositiveIntegerField(default=0)
    logical_bytes = models.BigIntegerField(default=0, help_text="Canonical JSON size of the head state.")
    stored_bytes = models.BigIntegerField(default=0, help_text="Bytes of storage this session's versions added.")
    last_step = models.CharField(max_length=200, blank=True, default="")
    last_error = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=False)
    archived_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "external_id"], name="session_unique_external_id"),
        ]
        indexes = [
            # Keyset pagination of the session list (newest activity first).
            models.Index(fields=["project", "-updated_at", "-id"], name="session_project_updated"),
            models.Index(fields=["project", "status", "-updated_at"], name="session_project_status"),
            models.Index(fields=["project", "workflow", "-updated_at"], name="session_project_workflow"),
            # The list sorted by creation ("Newest", the API's ?ordering=created_at / -created_at): without it
            # every page sorted all of the project's sessions (38 ms at 50,000, growing with the project).
            models.Index(fields=["project", "-created_at", "-id"], name="session_project_created"),
            # The tag filter (tags @> ...): the dashboard's, and the LangGraph saver's for a thread's sessions
            # (delete_thread, prune, copy_thread). It read every session of the project (36 ms at 200,000;
            # 0.15 ms with it; a write's UPDATE of its session took no measurably longer). PostgreSQL only
            # (migration 0014): the embedded SQLite default scans.
            GinIndex(fields=["tags"], opclasses=["jsonb_path_ops"], name="session_tagged"),
        ]

    def __str__(self) -> str:
        return self.external_id

    @property
    def is_archived(self) -> bool:
        return self.archived_at is not None

    @property
    def has_error(self) -> bool:
        return bool(self.last_error)


class AuditAction(models.TextChoices):
    """Every action the audit log records (services.audit_record refuses others)."""

    SESSION_REWIND = "session.rewind", "Rewind"
    SESSION_FORK = "session.fork", "Fork"
    SESSION_UPDATE = "session.update", "Session changed"
    SESSION_ARCHIVE = "session.archive", "Session archived"
    SESSION_UNARCHIVE = "session.unarchive", "Session unarchived"
    SESSION_DELETE = "session.delete", "Session deleted"
    SESSION_IMPORT = "session.import", "Session imported"
    SESSION_TRIM = "session.trim", "History trimmed"
    VERSION_DATA_FIX = "version.data_fix", "Data fix"
    VERSION_PIN = "version.pin", "Version pinned"
    VERSION_UNPIN = "version.unpin", "Version unpinned"
    VERSION_LABEL = "version.label", "Version labelled"
    RETENTION_POLICY = "retention.policy", "Retention policy set"
    RETENTION_REMOVE = "retention.remove", "Versions removed by retention"
    INTEGRITY_RESOLVE = "integrity.resolve", "Integrity problem resolved"
    PROJECT_CREATE = "project.create", "Project created"
    MEMBERSHIP_SET = "membership.set", "Member role set"
    MEMBERSHIP_REMOVE = "membership.remove", "Member removed"
    USER_DEACTIVATE = "user.deactivate", "Member's account deactivated"
    USER_REACTIVATE = "user.reactivate", "Member's account reactivated"
    API_KEY_CREATE = "api_key.create", "API key created"
    API_KEY_REVOKE = "api_key.revoke", "API key revoked"
    API_KEY_EXPIRY = "api_key.expiry", "API key expiry changed"


class AuditEvent(models.Model):
    """Append-only record of every rewind, fork, data fix, deletion and policy change."""

    # No index of its own: audit_project_created (project, -created_at) serves every lookup by project.
    project = models.ForeignKey(Project, on_delete=models.CASCADE, db_index=False, related_name="audit_events")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_label = models.CharField(max_length=200, blank=True, default="", help_text="User name or API key name.")
    action = models.CharField(max_length=64, choices=AuditAction.choices)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    # Plain ids, not foreign keys: the event must outlive a deleted session.
    session_id = models.UUIDField(null=True, blank=True, db_index=True)
    reason = models.TextField(blank=True, default="")
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["project", "-created_at"], name="audit_project_created"),
            # The admin's search by id (a session's, a fork's or a version's): see AuditEventAdmin.
            models.Index(fields=["target_id"], name="audit_target_id"),
            # Every project's events by time: the admin's date filters ("Today": its page and count walked
            # the whole log by id for the few events of the day), its sort by date, and the API's list
            # across a member's projects.
            models.Index(fields=["-created_at", "-id"], name="audit_created"),
            # The admin's and the API's filter by action: a rare action (a membership change among
            # millions of pins) read the whole log for a page of a few events, and again for its count.
            models.Index(fields=["action", "project", "-created_at"], name="audit_action"),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.target_type}:{self.target_id} by {self.actor_label or 'system'}"


class ApiKey(models.Model):
    """A project-scoped API key. Only a hash is stored; the key is shown once on creation."""

    class Scope(models.TextChoices):
        READ = "read", "Read"
        WRITE = "write", "Write"
        ADMIN = "admin", "Admin"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, help_text="Public part of the key, for lookup.")
    key_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Who made it, as the audit log names them (a username, an API key, a command): still there once
    # created_by is gone with a deleted account.
    created_by_label = models.CharField(max_length=200, blank=True, default="", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="From this moment the key is refused (401 api_key_expired). Empty: never."
    )
    # The Idempotency-Key of the request that made it (see services.RequestKey); empty without one.
    request_key = models.CharField(max_length=64, blank=True, default="", editable=False)
    request_digest = models.CharField(max_length=64, blank=True, default="", editable=False)

    class Meta:
        ordering = ["project", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["request_key"], condition=~models.Q(request_key=""), name="apikey_unique_request_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        EXPIRED = "expired", "Expired"
        REVOKED = "revoked", "Revoked"

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return self.Status.REVOKED
        return self.Status.EXPIRED if self.is_expired else self.Status.ACTIVE

    @property
    def is_active(self) -> bool:
        """Neither revoked nor expired: the key signs requests in."""
        return self.revoked_at is None and not self.is_expired

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

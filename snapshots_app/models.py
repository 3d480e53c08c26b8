"""Versions (immutable snapshots of a session's state) and the content-addressed nodes behind them."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.db import models

from sessions_app.models import Names, Project, SessionStatus, WorkflowSession


class VersionKind(models.TextChoices):
    STEP = "step", "Step"
    REWIND = "rewind", "Rewind"
    FORK = "fork", "Fork"
    DATA_FIX = "data_fix", "Data fix"
    IMPORT = "import", "Import"


VERSION_KINDS = Names(VersionKind.values)

# The kinds an operator made (the timeline filters by them): every other version is an engine's step
# or an import of one.
TIMELINE_KINDS = (VersionKind.REWIND, VersionKind.FORK, VersionKind.DATA_FIX)


class Version(models.Model):
    """One immutable snapshot of a session's state, numbered 1, 2, 3… per session (never renumbered;
    retention may leave gaps).

    The state itself is a tree of StateNode rows; the version keeps only the root's digest and the
    SHA-256 of the state's canonical JSON, which every read is verified against.
    """

    # No index of its own: version_unique_number (session, number) leads with it.
    session = models.ForeignKey(WorkflowSession, on_delete=models.CASCADE, db_index=False, related_name="versions")
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
    # NULL (not "") when absent, so the partial unique constraint ignores writes without a key.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
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
        # The versions still waiting for their summary (a handful): what beat's finalize_pending looks
        # for every 5 min, without reading the whole table.
        indexes = [
            models.Index(fields=["id"], condition=models.Q(summary__isnull=True), name="version_unfinalized"),
            # The timeline's filters (selectors.TimelineFilters), newest first: each reads only the versions
            # it shows. With version_unique_number alone a filter that matches few of a long session's
            # versions read them all, or the whole table (92 ms for "pinned" at 400,000 versions; 0.3 ms so).
            models.Index(fields=["session", "number"], condition=~models.Q(error=""), name="version_with_error"),
            models.Index(fields=["session", "number"], condition=models.Q(pinned=True), name="version_pinned"),
            models.Index(fields=["session", "number"], condition=~models.Q(label=""), name="version_labelled"),
            models.Index(fields=["session", "kind", "number"], condition=models.Q(kind__in=TIMELINE_KINDS),
                         name="version_operator_kind"),
            # The API's `tag` filter (tags @> ...): how the LangGraph saver finds a checkpoint by its id and
            # its pending writes, on every get_tuple. Without it each such lookup read the whole table
            # (44 ms at 200,000 versions, growing with every project's history; 0.1 ms with it). Not
            # partial: a query's parameters (server-side binding) cannot prove a `tags <> '[]'` predicate.
            # PostgreSQL only (migration 0013): the embedded SQLite default scans.
            GinIndex(fields=["tags"], opclasses=["jsonb_path_ops"], name="version_tagged"),
        ]

    def __str__(self) -> str:
        return f"{self.session} v{self.number}"

    @property
    def has_error(self) -> bool:
        return bool(self.error)


class RemovedWrite(models.Model):
    """The idempotency key of a version that a trim or retention removed, and the number it had. The key
    went with the row, so a retry of that write (a client's, after a lost answer) found no version with
    it and wrote its state again, on top of everything written since; it is now refused, naming the
    version it made (services._replay, and the one-statement write's check in rows._append_sql)."""

    session = models.ForeignKey(WorkflowSession, on_delete=models.CASCADE, related_name="removed_writes")
    idempotency_key = models.CharField(max_length=200)
    number = models.PositiveIntegerField()
    removed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session", "idempotency_key"], name="removedwrite_unique_key"),
        ]

    def __str__(self) -> str:
        return f"{self.idempotency_key} wrote v{self.number}, since removed"


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
    # The child digests (16 bytes each, in hole order), also inside `data`: kept bare so PostgreSQL
    # can walk a tree without decompressing anything (store._TREE_SHAPE_SQL, _PROBE_TWO_LEVELS_SQL).
    children = models.BinaryField(default=b"")
    # BLAKE2b-64 of the uncompressed encoding: checks one node on its own, where a read that does not
    # splice the whole state (a diff) cannot check the version's SHA-256.
    seal = models.BigIntegerField()

    class Meta:
        verbose_name = "state node"

    def __str__(self) -> str:
        return f"{bytes(self.digest).hex()} ({self.raw_size} bytes)"


# A session with this tag keeps every version: its versions are not successive states of one thing
# (the LangGraph saver's pending writes: each holds other writes, and a resumed graph needs them).
KEEP_ALL_TAG = "retention:keep-all"


class Thinning(models.TextChoices):
    HOUR = "hour", "Keep one version per hour"
    DAY = "day", "Keep one version per day"
    NONE = "none", "Keep none"


class RetentionPolicy(models.Model):
    """How a project's old versions are thinned by compaction. No row = keep everything.

    A version survives if any rule keeps it: it is among its session's last `keep_last`; it is
    younger than `keep_days`; it is the newest of its hour/day bucket (per `thin_to`); or it is
    protected (head, pinned, labelled, carries an error, or a rewind/fork points at it).
    """

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="retention_policy")
    enabled = models.BooleanField(default=True)
    keep_last = models.PositiveIntegerField(default=100, help_text="Always keep each session's newest N versions.")
    keep_days = models.PositiveIntegerField(default=7, help_text="Always keep versions younger than this many days.")
    thin_to = models.CharField(
        max_length=8, choices=Thinning.choices, default=Thinning.HOUR,
        help_text="Beyond keep_days, keep at most one version per hour or day (besides protected ones).",
    )
    updated_at = models.DateTimeField(auto_now=True)
    updated_by_label = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        verbose_name_plural = "retention policies"

    def __str__(self) -> str:
        return f"retention of {self.project_id}: last {self.keep_last}, {self.keep_days} days, {self.thin_to}"

    @property
    def in_words(self) -> str:
        """What a compaction run removes under this policy, as an operator reads it before one."""
        if not self.enabled:
            return "Retention is off: compaction removes no version."
        kept = [f"each session's newest {self.keep_last} version{'s' if self.keep_last != 1 else ''}"] if self.keep_last else []
        if self.keep_days:
            kept.append(f"every version younger than {self.keep_days} day{'s' if self.keep_days != 1 else ''}")
        beyond = {
            Thinning.HOUR: "older versions are thinned to one per hour (UTC)",
            Thinning.DAY: "older versions are thinned to one per day (UTC)",
            Thinning.NONE: "every older version is removed",
        }[Thinning(self.thin_to)]
        return (
            f"Keeps {' and '.join(kept) or 'no version for its rank or age'}; {beyond}. Heads, pinned, labelled and "
            "error versions, rewinds, forks and data fixes (and the versions they point at) are always kept, and so "
            f"is every version of an archived session or of one tagged {KEEP_ALL_TAG}."
        )


class JobKind(models.TextChoices):
    COMPACTION = "compaction", "Compaction"
    GC = "gc", "Garbage collection"
    SCRUB = "scrub", "Integrity scrub"
    EXPORT = "export", "Export"
    IMPORT = "import", "Import"


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"


class Job(models.Model):
    """A long background job and its progress, shown live in the UI. Tasks take the job's id."""

    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    session = models.ForeignKey(
        WorkflowSession, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The session a session-scoped job (e.g. export) is about.",
    )
    kind = models.CharField(max_length=16, choices=JobKind.choices)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    params = models.JSONField(default=dict, blank=True)
    done = models.PositiveBigIntegerField(default=0)
    total = models.PositiveBigIntegerField(default=0)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveSmallIntegerField(default=0, help_text="Deliveries so far (a killed worker redelivers).")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_label = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life of the worker running it (see snapshots_app.jobs)."
    )
    resent_at = models.DateTimeField(
        null=True, blank=True, help_text="When jobs_requeue_stale last sent it again (once per wait, not every run)."
    )
    send_failed_at = models.DateTimeField(
        null=True, blank=True,
        help_text="When its task could not be handed to the broker (it was down): jobs_requeue_stale sends it "
                  "on its next run and clears this.",
    )
    finished_at = models.DateTimeField(null=True, blank=True)
    # A job started with an Idempotency-Key keeps it here, so a retry finds this job again even
    # after a cache loss (see sessions_app.services.RequestKey). Empty for jobs started without one.
    request_key = models.CharField(max_length=64, blank=True, default="", editable=False)
    request_digest = models.CharField(max_length=64, blank=True, default="", editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["request_key"], condition=~models.Q(request_key=""), name="job_unique_request_key"
            ),
        ]
        indexes = [
            models.Index(fields=["project", "kind", "-created_at"], name="job_project_kind_created"),
            # A project's jobs newest first (the API's list, the admin's list filtered to a project): with
            # only the index above (kind second) PostgreSQL sorted every job of the project for a page.
            models.Index(fields=["project", "-created_at", "-id"], name="job_project_created"),
            # jobs_requeue_stale looks at unfinished jobs every minute; finished ones pile up for good.
            models.Index(fields=["status"], condition=models.Q(status__in=["queued", "running"]), name="job_unfinished"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} job {self.pk} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in (JobStatus.DONE, JobStatus.FAILED)

    @property
    def public_params(self) -> Any:
        """The params as callers see them: a verification of chosen versions says how many
        (`selected`), not which (its id runs can be long)."""
        return _without(self.params, "versions")

    @property
    def public_result(self) -> Any:
        """The result as callers see it: the server's own file system (an export's `path`) stays on the server."""
        return _without(self.result, "path")

    @property
    def percent(self) -> int:
        if self.is_finished and self.status == JobStatus.DONE:
            return 100
        return int(100 * self.done / self.total) if self.total else 0


def _without(value: Any, hidden: str) -> Any:
    """A JSON value as callers see it: an object without its `hidden` key; anything else as it is."""
    if not isinstance(value, dict):
        return value
    return {key: item for key, item in value.items() if key != hidden}


class IntegrityProblem(models.Model):
    """A version whose stored data failed verification. Recorded by the scrub; never auto-repaired."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="integrity_problems")
    session = models.ForeignKey(WorkflowSession, on_delete=models.CASCADE, related_name="integrity_problems")
    version = models.ForeignKey(Version, on_delete=models.CASCADE, related_name="integrity_problems")
    version_number = models.PositiveIntegerField()
    detail = models.TextField()
    found_by = models.ForeignKey(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="problems")
    first_seen_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(auto_now=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-last_seen_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["version"], condition=models.Q(resolved_at__isnull=True), name="integrity_one_open_per_version"
            ),
        ]

    def __str__(self) -> str:
        return f"integrity problem in {self.session} v{self.version_number}"

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None


class CompressionDictionary(models.Model):
    """A zstd dictionary trained by compaction on one project's nodes (StateNode codec 2).

    Nodes compressed with it name it in their zstd frame header (`zstd_id`), so it is never
    changed or deleted while the project lives; a newer dictionary is a new row.
    """

    ZSTD_ID_BASE = 1 << 16  # keeps our ids clear of zstd's small reserved range

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    data = models.BinaryField()
    samples = models.PositiveIntegerField(help_text="How many nodes it was trained on.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["project", "-id"]

    def __str__(self) -> str:
        return f"zstd dictionary {self.pk} of project {self.project_id}"

    @property
    def zstd_id(self) -> int:
        return self.ZSTD_ID_BASE + self.pk

"""Retention (thinning old versions per project policy) and garbage collection of state nodes.

Compaction of a project = retention, then garbage collection of the nodes no remaining version
reaches. Both are idempotent and safe to kill at any instant: every step is its own short
transaction and a rerun recomputes everything from what is committed.

Concurrency with writers (see store.project_write_lock): writers hold the project's advisory lock
*shared* for their whole transaction; garbage collection marks outside the lock, then sweeps in
batches, each under the *exclusive* lock. Under that lock no writer is in flight, so every version
that could reference a node is committed; each batch first marks the versions created since the
previous batch (a writer may have reused a node that was a candidate), then deletes only nodes
still unmarked. Nodes inserted after the candidate list was taken are never candidates. Batches
delete parents before children (_parents_first): a writer that finds a node stored reuses its
whole subtree, so no stored node may ever lose a descendant.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import zstandard
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import F, Sum
from django.db.models.functions import Length
from django.utils import timezone

from sessions_app import events
from sessions_app.models import AuditAction, AuditEvent, Project, WorkflowSession
from sessions_app.selectors import removal_details, removed_numbers
from sessions_app.services import RequestKey, User, audit_record
from snapshots_app import jobs, store
from snapshots_app.models import (
    KEEP_ALL_TAG,
    CompressionDictionary,
    IntegrityProblem,
    Job,
    JobKind,
    JobStatus,
    RemovedWrite,
    RetentionPolicy,
    StateNode,
    Thinning,
    Version,
    VersionKind,
)
from snapshots_app.tasks import finalize_in_batches

logger = logging.getLogger(__name__)

ProgressFn = Callable[..., None]


def _no_progress(done: int, total: int | None = None, *, force: bool = False) -> None:
    return None


def _batch_size() -> int:
    return int(getattr(settings, "COMPACTION_BATCH_SIZE", 2000))


# Ids one statement's IN list names, at most: PostgreSQL refuses a statement of over 65,535
# parameters, and a trim or retention of a long session removes more versions than that.
_IN_LIST = 5000


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------------
# Retention policy


def retention_policy_get(*, project: Project) -> RetentionPolicy:
    """The project's policy; an unsaved, disabled one (keep everything) if none was ever set."""
    policy = RetentionPolicy.objects.filter(project=project).first()
    return policy or RetentionPolicy(project=project, enabled=False)


# The most a retention policy's keep_last (versions) and keep_days may be (the API and the admin check it too).
RETENTION_KEEP_MAX = 1_000_000


@transaction.atomic
def retention_policy_set(
    *,
    project: Project,
    enabled: bool,
    keep_last: int,
    keep_days: int,
    thin_to: str,
    actor: User = None,
    actor_label: str = "",
) -> RetentionPolicy:
    """Create or change the project's retention policy (project admins only: the edge checks). Audited
    when it changes something: the policy it has already is answered as it is, recorded nowhere (a
    deployment that puts its policy on every start filled the audit log with changes from X to X)."""
    from sessions_app.errors import InvalidState

    for name, value in (("keep_last", keep_last), ("keep_days", keep_days)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > RETENTION_KEEP_MAX:
            raise InvalidState(f"{name} must be an integer between 0 and {RETENTION_KEEP_MAX}")
    if thin_to not in Thinning.values:
        raise InvalidState(f"thin_to must be one of {', '.join(Thinning.values)}")
    if not isinstance(enabled, bool):
        raise InvalidState("enabled must be true or false")
    previous = RetentionPolicy.objects.select_for_update().filter(project=project).first()
    before = (
        {"enabled": previous.enabled, "keep_last": previous.keep_last, "keep_days": previous.keep_days,
         "thin_to": previous.thin_to}
        if previous else None
    )
    after = {"enabled": enabled, "keep_last": keep_last, "keep_days": keep_days, "thin_to": thin_to}
    if previous is not None and before == after:
        return previous
    from sessions_app.services import actor_fields

    label = actor_fields(actor, actor_label)["actor_label"]
    policy, _ = RetentionPolicy.objects.update_or_create(project=project, defaults={**after, "updated_by_label": label})
    audit_record(
        project=project, action="retention.policy", target_type="project", target_id=project.pk,
        actor=actor, actor_label=actor_label, details={"before": before, "after": after},
    )
    return policy


@dataclass
class _Row:
    id: int
    session_id: Any
    number: int
    created_at: datetime
    kind: str
    parent_id: int | None
    pinned: bool
    label: str
    error: str
    root: bytes
    stored_size: int


@dataclass
class RetentionPlan:
    """Which versions a policy removes. `remove` maps session id -> version ids (newest first)."""

    remove: dict[Any, list[int]] = field(default_factory=dict)
    removed_numbers: dict[str, list[int]] = field(default_factory=dict)
    kept_roots: set[bytes] = field(default_factory=set)
    versions_total: int = 0

    @property
    def remove_count(self) -> int:
        return sum(len(ids) for ids in self.remove.values())


def _bucket(moment: datetime, thin_to: str) -> tuple[int, ...]:
    moment = moment.astimezone(UTC)
    if thin_to == Thinning.HOUR:
        return (moment.year, moment.month, moment.day, moment.hour)
    return (moment.year, moment.month, moment.day)


# Versions an operator made (each in the audit log) are kept whatever the policy: they are what the
# log points at, and a rewind or fork kept keeps its source (below), run after run.
OPERATOR_KINDS = (VersionKind.REWIND, VersionKind.FORK, VersionKind.DATA_FIX)


def _rows(project_id: int) -> list[_Row]:
    return [
        _Row(*values[:9], bytes(values[9]), values[10])
        for values in Version.objects.filter(session__project_id=project_id)
        .order_by("session_id", "-number")
        .values_list("id", "session_id", "number", "created_at", "kind", "parent_id", "pinned", "label", "error",
                     "root", "stored_size")
        .iterator(chunk_size=5000)
    ]


def retention_plan(*, project: Project, now: datetime | None = None) -> RetentionPlan:
    """What the project's policy would remove now (read only)."""
    return _plan(project.pk, retention_policy_get(project=project), _rows(project.pk), now or timezone.now())


def _plan(project_id: int, policy: RetentionPolicy, rows: list[_Row], now: datetime) -> RetentionPlan:
    plan = RetentionPlan(versions_total=len(rows))
    if not policy.enabled:
        plan.kept_roots = {row.root for row in rows}
        return plan
    heads: dict[Any, int] = {}
    keep_all: set[Any] = set()
    for session_id, head_number, tags, archived_at in WorkflowSession.objects.filter(project_id=project_id).values_list(
        "id", "head_number", "tags", "archived_at"
    ):
        heads[session_id] = head_number
        # Archiving "keeps the whole history" (its confirm page says so, and pins and labels, which
        # would protect versions, are refused while it lasts): retention thinned it all the same.
        if KEEP_ALL_TAG in tags or archived_at is not None:
            keep_all.add(session_id)
    # A rewind or fork points at its source version: removing the source would break its lineage.
    sources = {row.parent_id for row in rows if row.kind in (VersionKind.REWIND, VersionKind.FORK) and row.parent_id}
    young = now - timedelta(days=policy.keep_days)
    by_session: dict[Any, list[_Row]] = defaultdict(list)
    for row in rows:
        by_session[row.session_id].append(row)  # newest first (see _rows)
    for session_id, versions in by_session.items():
        if session_id in keep_all:
            plan.kept_roots.update(row.root for row in versions)
            continue
        kept: set[int] = set()
        occupied: set[tuple[int, ...]] = set()
        for index, row in enumerate(versions):
            if (
                index < policy.keep_last
                or row.created_at >= young
                or row.number == heads.get(session_id)
                or row.pinned
                or row.label
                or row.error
                or row.kind in OPERATOR_KINDS
                or row.id in sources
            ):
                kept.add(row.id)
                occupied.add(_bucket(row.created_at, policy.thin_to))
        removed = []
        for row in versions:
            if row.id in kept:
                continue
            bucket = _bucket(row.created_at, policy.thin_to)
            if policy.thin_to != Thinning.NONE and bucket not in occupied:
                occupied.add(bucket)  # the newest version of an otherwise empty bucket stays
                kept.add(row.id)
                continue
            removed.append(row)
        if removed:
            plan.remove[session_id] = [row.id for row in removed]
            plan.removed_numbers[str(session_id)] = sorted(row.number for row in removed)
        plan.kept_roots.update(row.root for row in versions if row.id in kept)
    return plan


@dataclass(frozen=True)
class _Remover:
    """Who removes versions (for the audit log): the job's starter, "schedule", "manage.py"…"""

    actor: User = None
    actor_label: str = ""
    job_id: int | None = None


def _retention_apply(
    project_id: int, plan: RetentionPlan, policy: RetentionPolicy, remover: _Remover, progress: ProgressFn, done: int
) -> tuple[dict[str, list[int]], int]:
    """Remove the planned versions, one session per transaction. Returns (the numbers removed, by
    session: fewer than planned where a pin, label or rewind came meanwhile; progress)."""
    removed: dict[str, list[int]] = {}
    for session_id, ids in plan.remove.items():
        numbers = _retention_apply_session(project_id, session_id, ids, policy, remover)
        if numbers:
            removed[str(session_id)] = sorted(numbers)
        done += len(ids)
        progress(done)
    return removed, done


@transaction.atomic
def _retention_apply_session(
    project_id: int, session_id: Any, planned: list[int], policy: RetentionPolicy, remover: _Remover
) -> list[int]:
    """Remove the session's planned versions that are still unprotected, audited as one event.
    Returns the numbers removed."""
    session = WorkflowSession.objects.select_for_update().filter(pk=session_id, project_id=project_id).first()
    if session is None or KEEP_ALL_TAG in session.tags or session.archived_at is not None:  # since the plan
        return []
    # Re-check protection under the session lock: a pin, label or rewind may have arrived since the plan.
    doomed: set[int] = set()
    for chunk in _chunks(planned, _IN_LIST):
        sources = Version.objects.filter(parent_id__in=chunk, kind__in=[VersionKind.REWIND, VersionKind.FORK])
        doomed.update(
            Version.objects.filter(session=session, id__in=chunk, pinned=False, label="", error="")
            .exclude(number=F("session__head_number"))
            .exclude(kind__in=OPERATOR_KINDS)
            .exclude(id__in=sources.values("parent_id"))
            .values_list("id", flat=True)
        )
    if not doomed:
        return []
    numbers, freed_bytes = remove_versions(session, doomed)
    audit_record(
        project=session.project, action="retention.remove", target_type="session", target_id=session.pk,
        session_id=session.pk, actor=remover.actor, actor_label=remover.actor_label,
        reason="retention policy",
        details={"external_id": session.external_id, **removal_details(numbers), "bytes_freed": freed_bytes,
                 "job": remover.job_id,
                 "policy": {"keep_last": policy.keep_last, "keep_days": policy.keep_days, "thin_to": policy.thin_to}},
    )
    return numbers


def remove_versions(session: WorkflowSession, doomed: set[int]) -> tuple[list[int], int]:
    """Delete these versions of a session (locked by the caller; never its head) and tell the live
    views. Returns their numbers and the stored bytes freed; the caller audits. Nodes only they
    reached are freed by the next garbage collection."""
    # Keep lineage connected: a surviving version whose parent goes now points at the nearest
    # surviving ancestor (its own state and metadata are untouched). Its change summary, which told
    # what changed since the removed parent, is made again against the new one after commit (the
    # timeline shows it under that ancestor, and its diff link compares with it).
    parents: dict[int, int | None] = {}
    numbers: list[int] = []
    freed_bytes = 0
    for version_id, parent_id, number, size in Version.objects.filter(session=session).values_list(
        "id", "parent_id", "number", "stored_size"
    ):
        parents[version_id] = parent_id
        if version_id in doomed:
            numbers.append(number)
            freed_bytes += size
    relink: dict[int | None, list[int]] = defaultdict(list)
    for child, parent in parents.items():
        if child in doomed or parent not in doomed:
            continue
        ancestor: int | None = parent
        passed: set[int] = set()
        while ancestor in doomed:
            if ancestor in passed:
                # A cycle of parents (an import took one, before imports refused them): this walk
                # looped for good, holding the session's lock. None survives on it: no parent.
                logger.warning("session %s: the versions with ids %s are each other's ancestors; version id %s keeps no parent",
                               session.pk, sorted(passed), child)
                ancestor = None
                break
            passed.add(ancestor)
            ancestor = parents.get(ancestor)
        relink[ancestor].append(child)
    for ancestor, children in relink.items():
        for chunk in _chunks(children, _IN_LIST):
            Version.objects.filter(id__in=chunk).update(parent_id=ancestor, summary=None)
    _summarise_after_commit(sorted(version_id for children in relink.values() for version_id in children))
    _delete_versions(session, doomed & parents.keys())
    numbers.sort()
    session.version_count = len(parents) - len(numbers)
    session.stored_bytes = max(0, session.stored_bytes - freed_bytes)
    session.save(update_fields=["version_count", "stored_bytes"])
    payload = {"session": str(session.pk), "numbers": numbers, "versions": session.version_count}
    events.publish_after_commit(session.project_id, "versions.removed", payload, session_id=session.pk)
    return numbers, freed_bytes


def _delete_versions(session: WorkflowSession, doomed: set[int]) -> None:
    """Delete these version rows and their integrity problems; no other version may derive from them.

    Not QuerySet.delete(): its collector read every row and set each child's parent to NULL (which
    remove_versions has already relinked); a trim of 100,000 versions took 14 s with it, 3 s
    without, and holds the session's lock (its writers wait) all that time. Another session's
    version (a fork) made from one of these would fail the foreign key at commit, and nothing would
    be removed; trim and retention keep fork sources, under the session lock forks take."""
    problems = [pk for pk, version_id in session.integrity_problems.values_list("id", "version_id") if version_id in doomed]
    for chunk in _chunks(problems, _IN_LIST):
        IntegrityProblem.objects.filter(id__in=chunk).delete()
    table = connection.ops.quote_name(Version._meta.db_table)
    removed = connection.ops.quote_name(RemovedWrite._meta.db_table)
    with connection.cursor() as cursor:
        for chunk in _chunks(sorted(doomed), _IN_LIST):
            listed = ", ".join(["%s"] * len(chunk))
            # Their idempotency keys stay (RemovedWrite): a retry of one of these writes is refused, not written again.
            cursor.execute(
                f"INSERT INTO {removed} (session_id, idempotency_key, number, removed_at) "
                f"SELECT session_id, idempotency_key, number, %s FROM {table} "
                f"WHERE id IN ({listed}) AND idempotency_key IS NOT NULL ON CONFLICT DO NOTHING",
                [connection.ops.adapt_datetimefield_value(timezone.now()), *chunk],
            )
            cursor.execute(f"DELETE FROM {table} WHERE id IN ({listed})", chunk)


def session_versions_delete(session: WorkflowSession) -> None:
    """Delete every version of a session being deleted (locked by the caller), in three statements
    however many there are. Another session's version made from one of them (a fork) stays, and
    no longer names a parent, as Django's cascade left it (on_delete=SET_NULL)."""
    Version.objects.filter(parent__session=session).exclude(session=session).update(parent=None)
    IntegrityProblem.objects.filter(version__session=session).delete()
    session_id = WorkflowSession._meta.pk.get_db_prep_value(session.pk, connection)  # SQLite keeps uuids as text
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {connection.ops.quote_name(Version._meta.db_table)} WHERE session_id = %s",
                       [session_id])


def _summarise_after_commit(version_ids: list[int]) -> None:
    """Queue the change summaries of these versions of one session (once the transaction commits);
    should the broker be down, beat's finalize_pending makes them (versions without a summary)."""
    if version_ids:
        transaction.on_commit(partial(finalize_in_batches, version_ids), robust=True)


# --------------------------------------------------------------------------------------------------
# Garbage collection


def _mark(project_store: store.ProjectStore | _NodeGraph, roots: Iterable[bytes], marked: set[bytes]) -> None:
    """Add to `marked` every node reachable from `roots`, never descending into marked subtrees."""
    frontier = set(roots) - marked
    while frontier:
        marked |= frontier
        children: set[bytes] = set()
        for chunk in _chunks(list(frontier), 1000):
            for kids in project_store.children(chunk).values():
                children.update(kids)
        frontier = children - marked


def _parents_first(project_store: store.ProjectStore, candidates: list[bytes]) -> list[bytes]:
    """Order garbage so that no node is deleted while a garbage parent of it still exists.

    Writers treat an existing node as a complete subtree (they skip its children), so between two
    sweep batches every stored node must still have all its descendants: a writer may reuse it,
    and the next batch then marks it live. Deleting parents before children keeps that true.
    """
    candidate_set = set(candidates)
    children: dict[bytes, list[bytes]] = {}
    for chunk in _chunks(candidates, 1000):
        for digest, below in project_store.children(chunk).items():
            children[digest] = [child for child in below if child in candidate_set]
    waiting_on = dict.fromkeys(candidates, 0)
    for kids in children.values():
        for child in kids:
            waiting_on[child] += 1
    ordered = [digest for digest in candidates if waiting_on[digest] == 0]
    for digest in ordered:  # grows while iterating: Kahn's algorithm over the garbage DAG
        for child in children.get(digest, ()):
            waiting_on[child] -= 1
            if waiting_on[child] == 0:
                ordered.append(child)
    return ordered


class _NodeGraph:
    """Every node of a project, read in one pass over the table: digest -> (stored bytes, its
    children's digests run together). The dry run marks from it in memory (`_mark` takes it as it
    takes a ProjectStore): asking the table for each level's children, 1,000 digests a query, was 85%
    of its time (1.5 of 1.7 s at 40,000 nodes)."""

    def __init__(self, project_id: int) -> None:
        self.nodes = {
            bytes(digest): (size, bytes(children))
            for digest, size, children in StateNode.objects.filter(project_id=project_id)
            .annotate(size=Length("data"))
            .values_list("digest", "size", "children")
            .iterator(chunk_size=10_000)
        }

    def children(self, digests: Iterable[bytes]) -> dict[bytes, tuple[bytes, ...]]:
        return {digest: store.split_children(self.nodes[digest][1]) for digest in digests if digest in self.nodes}


def stored_bytes(*, project: Project) -> int:
    """Bytes of node data the project stores (what compaction shrinks)."""
    return StateNode.objects.filter(project=project).aggregate(total=Sum(Length("data")))["total"] or 0


# How long a sweep batch waits for the project's exclusive lock before it lets writers by and tries
# again later (pausing twice as long each time, up to the most). PostgreSQL queues a lock request
# that waits ahead of the ones after it: writers' shared requests waited behind the sweep's, itself
# waiting for a long holder of the shared lock (an import stores a whole file in one transaction),
# so every write to the project stalled until that import committed (minutes for a large file).
SWEEP_LOCK_WAIT_MS = 200
SWEEP_LOCK_PAUSE_SECONDS = (0.5, 30.0)


class _LockBusy(Exception):
    """The project's exclusive lock was not granted within SWEEP_LOCK_WAIT_MS."""


def _exclusive_lock(project_id: int) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('lock_timeout')")
            previous = cursor.fetchone()[0]
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{SWEEP_LOCK_WAIT_MS}ms"])
            try:
                cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [store.PROJECT_LOCK_CLASS, project_id])
            except OperationalError as exc:
                if getattr(exc.__cause__, "sqlstate", None) == "55P03":  # lock_not_available
                    raise _LockBusy from exc
                raise
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [previous])


def _versions_since(project_id: int, after_id: int | None) -> list[tuple[int, bytes]]:
    queryset = Version.objects.filter(session__project_id=project_id)
    if after_id is not None:
        queryset = queryset.filter(id__gt=after_id)
    return [(version_id, bytes(root)) for version_id, root in queryset.values_list("id", "root").iterator()]


def _sweep_batch(
    project_id: int, batch: list[bytes], marked: set[bytes], seen: dict[str, Any], project_store: store.ProjectStore
) -> tuple[int, int]:
    """Delete the batch's nodes no version reaches. Returns (nodes, bytes) deleted."""
    pause, longest = SWEEP_LOCK_PAUSE_SECONDS
    while True:
        try:
            return _sweep_batch_locked(project_id, batch, marked, seen, project_store)
        except _LockBusy:
            logger.info("project %s: garbage collection waits %.1f s for a long write transaction (an import?) "
                        "to end", project_id, pause)
            time.sleep(pause)
            pause = min(2 * pause, longest)


def _sweep_batch_locked(
    project_id: int, batch: list[bytes], marked: set[bytes], seen: dict[str, Any], project_store: store.ProjectStore
) -> tuple[int, int]:
    with transaction.atomic():
        _exclusive_lock(project_id)
        # The first batch rescans every version (writers in flight during the mark may have taken
        # ids lower than ones already seen); later ones need only ids assigned after the last lock,
        # since writers take their (shared) lock before inserting a version.
        fresh = _versions_since(project_id, seen["max_id"])
        if seen["max_id"] is None:
            fresh = [(version_id, root) for version_id, root in fresh if version_id not in seen["ids"]]
            seen["max_id"] = max(seen["ids"], default=0)
        if fresh:
            seen["max_id"] = max(seen["max_id"], *(version_id for version_id, _ in fresh))
            _mark(project_store, {root for _, root in fresh}, marked)
        doomed = [digest for digest in batch if digest not in marked]
        if not doomed:
            return 0, 0
        sizes = _delete_nodes(project_id, doomed)
    return len(sizes), sum(sizes)


def _delete_nodes(project_id: int, digests: list[bytes]) -> list[int]:
    """Delete those nodes of the project; returns the stored sizes of the ones deleted."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:  # one statement: delete and say what it freed
            cursor.execute(
                f"DELETE FROM {StateNode._meta.db_table} WHERE project_id = %s AND digest = ANY(%b) "
                "RETURNING octet_length(data)",
                [project_id, digests],
            )
            return [size for (size,) in cursor.fetchall()]
    nodes = StateNode.objects.filter(project_id=project_id, digest__in=digests)
    sizes = list(nodes.annotate(size=Length("data")).values_list("size", flat=True))
    nodes.delete()
    return sizes


# --------------------------------------------------------------------------------------------------
# Recompression with a project dictionary

DICTIONARY_MIN_NODES = 200  # fewer zstd nodes than this: not enough to learn from, nor to gain much
DICTIONARY_SAMPLES = 4000
DICTIONARY_MAX_BYTES = 64 * 1024
RECOMPRESS_LEVEL = 12
RECOMPRESS_MIN_GAIN = 0.95  # rewrite a node only if it shrinks by at least 5%


def _sound(digest: bytes, codec: int, data: bytes, seal: int) -> bytes | None:
    """A node's encoding, or None if its data is damaged (it does not decode, or not to its seal):
    compaction leaves such a node as it is rather than failing the whole project's run."""
    try:
        return store.sealed_encoding(digest, codec, data, seal)
    except store.CorruptNode:
        return None


def _dictionary(project_id: int) -> CompressionDictionary | None:
    """The project's dictionary, trained now from a sample of its nodes if it has none yet."""
    existing = CompressionDictionary.objects.filter(project_id=project_id).order_by("-id").first()
    if existing is not None:
        return existing
    # Digests are hashes, so the first nodes by digest are a uniform sample, read off the primary key
    # index; ORDER BY random() sorted every node of the project and trained a different dictionary
    # (saving 20.3-21.1% on one test project) from run to run.
    rows = list(
        StateNode.objects.filter(project_id=project_id, codec=store.CODEC_ZSTD)
        .order_by("digest")
        .values_list("digest", "codec", "data", "seal")[:DICTIONARY_SAMPLES]
    )
    if len(rows) < DICTIONARY_MIN_NODES:
        return None
    samples: list[bytes | bytearray | memoryview] = [
        raw for digest, codec, data, seal in rows if (raw := _sound(bytes(digest), codec, bytes(data), seal)) is not None
    ]
    size = min(DICTIONARY_MAX_BYTES, sum(map(len, samples)) // 10)
    with transaction.atomic():
        row = CompressionDictionary.objects.create(project_id=project_id, data=b"", samples=len(samples))
        try:
            trained = zstandard.train_dictionary(size, samples, dict_id=row.zstd_id)
        except zstandard.ZstdError:
            logger.info("project %s: no zstd dictionary could be trained from %s nodes", project_id, len(samples))
            transaction.set_rollback(True)
            return None
        row.data = trained.as_bytes()
        row.save(update_fields=["data"])
    return row


def _store_recompressed(project_id: int, updates: list[tuple[bytes, bytes, int]]) -> None:
    """Store nodes re-encoded with the dictionary, (digest, data, bytes saved) each. Only nodes still
    plain zstd are rewritten: a concurrent run that got there first is not overwritten."""
    with transaction.atomic():
        if connection.vendor != "postgresql":
            for digest, data, _ in updates:
                StateNode.objects.filter(project_id=project_id, digest=digest, codec=store.CODEC_ZSTD).update(
                    codec=store.CODEC_ZSTD_DICT, data=data
                )
            return
        with connection.cursor() as cursor:  # one statement for the batch
            cursor.execute(
                f"UPDATE {StateNode._meta.db_table} AS n SET codec = %s, data = u.data "
                "FROM unnest(%b::bytea[], %b::bytea[]) AS u(digest, data) "
                "WHERE n.project_id = %s AND n.digest = u.digest AND n.codec = %s",
                [store.CODEC_ZSTD_DICT, [u[0] for u in updates], [u[1] for u in updates], project_id,
                 store.CODEC_ZSTD],
            )


def _recompress(project_id: int, progress: Callable[[int], None]) -> tuple[int, int]:
    """Re-encode the project's zstd nodes with its dictionary, telling `progress` how many it went
    through so far. Returns (nodes re-encoded, bytes saved).

    The bytes a node decodes to never change, so readers are unaffected whichever encoding they
    meet; each rewritten node is verified to decode back exactly before it is stored.
    """
    dictionary = _dictionary(project_id)
    if dictionary is None:
        return 0, 0
    zdict = zstandard.ZstdCompressionDict(bytes(dictionary.data))
    compressor = zstandard.ZstdCompressor(level=RECOMPRESS_LEVEL, dict_data=zdict)
    checker = zstandard.ZstdDecompressor(dict_data=zdict)
    digests = [
        bytes(d) for d in StateNode.objects.filter(project_id=project_id, codec=store.CODEC_ZSTD)
        .values_list("digest", flat=True).iterator(chunk_size=10_000)
    ]
    nodes = saved = done = 0
    for batch in _chunks(digests, 500):
        rows = StateNode.objects.filter(project_id=project_id, digest__in=batch, codec=store.CODEC_ZSTD).values_list(
            "digest", "data", "seal"
        )
        updates = []
        for digest, data, seal in rows:
            data = bytes(data)
            raw = _sound(bytes(digest), store.CODEC_ZSTD, data, seal)
            if raw is None:
                continue  # damaged: left as it is, for the integrity scrub to report
            packed = compressor.compress(raw)
            if len(packed) < len(data) * RECOMPRESS_MIN_GAIN and checker.decompress(packed) == raw:
                updates.append((bytes(digest), packed, len(data) - len(packed)))
        if updates:
            _store_recompressed(project_id, updates)
            nodes += len(updates)
            saved += sum(u[2] for u in updates)
        done += len(batch)
        progress(done)
    return nodes, saved


# A run's confirmation counts what retention would remove while the projects asked about hold at most
# this many versions together: the count reads every version row (15-35 us each, so up to ~1.5 s).
# Past it the confirmation states the policy in words, and the dry run counts (the whole walk).
RETENTION_COUNTED_MAX = 50_000


@dataclass(frozen=True)
class RetentionOutlook:
    """What a compaction run started now would do to a project's versions, for its confirmation."""

    project: Project
    policy: RetentionPolicy
    versions_total: int
    versions_removed: int | None  # None: not counted (more versions than the caller's budget)
    sessions_touched: int | None


def retention_outlook(*, project: Project, count_max: int = RETENTION_COUNTED_MAX,
                      policy: RetentionPolicy | None = None) -> RetentionOutlook:
    """The project's policy (or `policy`, one proposed for it) and, when the project holds at most
    `count_max` versions, how many versions (of how many sessions) retention would remove if it ran
    now. Read only: nothing is locked or kept, so a run started later may remove a few more (versions
    age) or fewer (new pins)."""
    policy = policy or retention_policy_get(project=project)
    total = WorkflowSession.objects.filter(project=project).aggregate(total=Sum("version_count"))["total"] or 0
    if not policy.enabled:
        return RetentionOutlook(project, policy, total, 0, 0)
    if total > count_max:
        return RetentionOutlook(project, policy, total, None, None)
    plan = _plan(project.pk, policy, _rows(project.pk), timezone.now())
    return RetentionOutlook(project, policy, plan.versions_total, plan.remove_count, len(plan.remove))


@dataclass
class CompactionPreview:
    """What compaction would do now: versions removed by retention and node bytes freed."""

    versions_total: int
    versions_removed: int
    removed_numbers: dict[str, list[int]]
    nodes_total: int
    nodes_freed: int
    bytes_total: int
    bytes_freed: int
    policy_enabled: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compaction_dry_run(
    *, project: Project, now: datetime | None = None, apply_retention: bool = True
) -> CompactionPreview:
    """Predict compaction without changing anything: what retention removes, what GC frees."""
    policy = retention_policy_get(project=project)
    rows = _rows(project.pk)
    if not apply_retention:
        policy = RetentionPolicy(project=project, enabled=False)
    plan = _plan(project.pk, policy, rows, now or timezone.now())
    graph = _NodeGraph(project.pk)
    marked: set[bytes] = set()
    _mark(graph, plan.kept_roots, marked)
    freed = [size for digest, (size, _) in graph.nodes.items() if digest not in marked]
    return CompactionPreview(
        versions_total=plan.versions_total,
        versions_removed=plan.remove_count,
        removed_numbers=plan.removed_numbers,
        nodes_total=len(graph.nodes),
        nodes_freed=len(freed),
        bytes_total=sum(size for size, _ in graph.nodes.values()),
        bytes_freed=sum(freed),
        policy_enabled=policy.enabled,
    )


def compaction_run(
    *,
    project: Project,
    apply_retention: bool = True,
    recompress: bool | None = None,
    now: datetime | None = None,
    progress: ProgressFn = _no_progress,
    actor: User = None,
    actor_label: str = "",
    job_id: int | None = None,
) -> dict[str, Any]:
    """Compact a project now: retention per its policy, garbage collection, then (unless
    `recompress` is False; default settings.COMPACTION_RECOMPRESS) re-encoding nodes with a zstd
    dictionary trained on the project. Idempotent. Each session whose versions retention removes gets
    a `retention.remove` audit event naming `actor`/`actor_label` (who started it) and the job.

    Returns figures for the job result and benchmarks: versions and bytes before/after, seconds.
    """
    if recompress is None:
        recompress = bool(getattr(settings, "COMPACTION_RECOMPRESS", True))
    started = time.monotonic()
    project_id = project.pk
    bytes_before = stored_bytes(project=project)
    policy = retention_policy_get(project=project) if apply_retention else RetentionPolicy(enabled=False)
    rows = _rows(project_id)
    plan = _plan(project_id, policy, rows, now or timezone.now())
    # One scale from start to end, so the job's percentage only goes up (it went back from 100 to 2
    # when the collection found its work): retention's versions, then a share the size of the
    # project's node count for the collection and another for re-encoding (each goes through at most
    # every node, bar nodes written meanwhile); a phase that needs less skips the rest of its share.
    node_share = StateNode.objects.filter(project_id=project_id).count()
    total = plan.remove_count + node_share * (2 if recompress else 1)
    progress(0, total, force=True)
    remover = _Remover(actor=actor, actor_label=actor_label, job_id=job_id)
    removed_numbers, done = _retention_apply(project_id, plan, policy, remover, progress, 0)
    removed = sum(len(numbers) for numbers in removed_numbers.values())
    retention_seconds = time.monotonic() - started

    project_store = store.ProjectStore(project_id, use_cache=False)
    remaining = _versions_since(project_id, None)
    seen: dict[str, Any] = {"ids": {version_id for version_id, _ in remaining}, "max_id": None}
    marked: set[bytes] = set()
    _mark(project_store, {root for _, root in remaining}, marked)
    candidates = _parents_first(project_store, [
        digest for (digest,) in (
            (bytes(d),) for d in StateNode.objects.filter(project_id=project_id).values_list("digest", flat=True)
            .iterator(chunk_size=10_000)
        ) if digest not in marked
    ])
    progress(done, total, force=True)
    nodes_freed = bytes_freed = swept = 0
    for batch in _chunks(candidates, _batch_size()):
        nodes, size = _sweep_batch(project_id, batch, marked, seen, project_store)
        nodes_freed += nodes
        bytes_freed += size
        swept += len(batch)
        progress(done + min(swept, node_share), total)
    done += node_share
    gc_seconds = time.monotonic() - started - retention_seconds
    recompressed = bytes_saved = 0
    if recompress:
        recompressed, bytes_saved = _recompress(project_id, lambda encoded: progress(done + min(encoded, node_share), total))
    progress(total, total, force=True)
    versions_after = Version.objects.filter(session__project_id=project_id).count()
    earlier = _removed_by_job(project_id, job_id) if job_id is not None else {}
    if earlier:
        # A job run again after its worker died: what earlier attempts removed counts too (the result
        # said 0 removed, while the audit log named thousands). The audit events, committed with each
        # removal, say what went, this attempt's included.
        removed_numbers = earlier
        counted = sum(len(numbers) for numbers in earlier.values())
        plan.versions_total += counted - removed
        removed = counted
    seconds = time.monotonic() - started
    return {
        "versions_before": plan.versions_total,
        "versions_removed": removed,
        "versions_after": versions_after,
        "removed_numbers": removed_numbers,
        "nodes_freed": nodes_freed,
        "bytes_freed": bytes_freed,
        "bytes_before": bytes_before,
        "bytes_after": stored_bytes(project=project),
        "nodes_recompressed": recompressed,
        "bytes_saved_by_recompression": bytes_saved,
        "retention_seconds": round(retention_seconds, 3),
        "gc_seconds": round(gc_seconds, 3),
        "seconds": round(seconds, 3),
        "seconds_per_1000_versions": round(1000 * seconds / plan.versions_total, 3) if plan.versions_total else 0.0,
        "retention_applied": policy.enabled,  # False for a run told not to (GC after a delete), whatever the policy
    }


def _removed_by_job(project_id: int, job_id: int) -> dict[str, list[int]]:
    """The version numbers each session lost to job `job_id`'s retention, by every attempt of it."""
    by_session: dict[str, list[int]] = defaultdict(list)
    removals = AuditEvent.objects.filter(project_id=project_id, action=AuditAction.RETENTION_REMOVE, details__job=job_id)
    for session_id, details in removals.values_list("session_id", "details"):
        by_session[str(session_id)].extend(removed_numbers(details))
    return {session_id: sorted(numbers) for session_id, numbers in by_session.items()}


# --------------------------------------------------------------------------------------------------
# Starting jobs (what the API, the UI and the beat schedule call)


def compaction_start(
    *, project: Project, apply_retention: bool = True, actor: User = None, actor_label: str = "",
    request: RequestKey | None = None,
) -> Job:
    """Queue a compaction of the project (retention per policy unless told not to, then GC).
    `request`: the starting request's idempotency key (see jobs.job_create)."""
    from snapshots_app import tasks

    return jobs.job_create(
        kind=JobKind.COMPACTION, project=project, params={"apply_retention": apply_retention},
        actor=actor, actor_label=actor_label, enqueue=lambda job_id: tasks.compaction_job.delay(job_id), request=request,
    )


def gc_request(*, project_id: int) -> Job | None:
    """Queue a garbage collection (no retention) of the project, unless one is already queued.

    Called after a session is deleted, so what only that session needed is freed.
    """
    from snapshots_app import tasks

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return None  # the whole project went: its nodes went with it (cascade)
    queued = Job.objects.filter(project=project, kind=JobKind.GC, status=JobStatus.QUEUED).first()
    if queued is not None:
        return queued
    return jobs.job_create(
        kind=JobKind.GC, project=project, params={"apply_retention": False}, actor_label="system",
        enqueue=lambda job_id: tasks.compaction_job.delay(job_id),
    )

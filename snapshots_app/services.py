"""Every write to versions: record a snapshot, rewind, fork, data fix, pin and label.

Each service is one transaction. Version numbers are assigned under a row lock on the session, so
concurrent writers get gap-free numbers; expected-version and idempotency checks happen under the
same lock. Side effects (live events, the finalize task) run only after commit.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from config.celery import app as celery_app
from sessions_app import background, events
from sessions_app.errors import (
    HeadNotKept,
    IdempotencyKeyReused,
    IntegrityProblem,
    InvalidState,
    SessionExists,
    StateStoreError,
    VersionConflict,
    VersionDamaged,
    VersionNotFound,
    WriteRemoved,
)
from sessions_app.models import SESSION_STATUSES, AuditEvent, SessionStatus, WorkflowSession
from sessions_app.selectors import removal_details
from sessions_app.services import (
    User,
    actor_fields,
    audit_event,
    audit_record,
    audit_record_many,
    clean_tags,
    ensure_writable,
    new_fork_external_id,
    require_reason,
    session_event,
    session_gone,
    session_lock,
)
from sessions_app.strict_json import refuse_duplicate_keys, refuse_huge_integers
from snapshots_app import canonical, compaction, rows, store
from snapshots_app.diff import PatchError, apply_patch
from snapshots_app.models import VERSION_KINDS, RemovedWrite, Version, VersionKind
from snapshots_app.selectors import TIMELINE_PAGE, trim_plan, version_get

logger = logging.getLogger(__name__)
finalize_send_failures = background.OutageLog(logger, "finalize messages (Celery broker)")

METADATA_LIMITS = {"step": 200, "label": 100, "engine": 100, "engine_version": 50, "idempotency_key": 200}
ERROR_MAX = 10_000


class _Head:
    """`parent=HEAD`: the new version's parent is the session's current head."""


HEAD = _Head()


@dataclass(frozen=True)
class PreparedState:
    """A validated state and its canonical bytes, computed before any lock is taken."""

    value: dict[str, Any]
    canonical: bytes
    checksum: str
    members: dict[str, bytes]  # the canonical bytes of each top-level member


def state_prepare(state: dict[str, Any] | bytes | str | PreparedState) -> PreparedState:
    """Validate input (raw JSON text, or an already parsed dict) into canonical form."""
    if isinstance(state, PreparedState):
        return state
    if isinstance(state, (bytes, str)):
        value = canonical.parse_state(state, max_bytes=settings.STATE_MAX_BYTES, max_depth=settings.STATE_MAX_DEPTH)
    else:
        canonical.validate_state(state, max_depth=settings.STATE_MAX_DEPTH)
        value = state
    try:
        data, members = canonical.dumps_state(value)
    except TypeError as exc:
        # A non-string key or an integer beyond 64 bits: say where.
        canonical.explain(value, max_depth=settings.STATE_MAX_DEPTH)
        raise InvalidState(f"state cannot be stored as JSON: {exc}") from None
    if len(data) > settings.STATE_MAX_BYTES:
        raise canonical.StateTooLarge(
            f"state is {len(data)} bytes as canonical JSON; the limit is {settings.STATE_MAX_BYTES}",
            size=len(data), limit=settings.STATE_MAX_BYTES,
        )
    return PreparedState(value=value, canonical=data, checksum=canonical.checksum(data), members=members)


def state_with_value(state: dict[str, Any], pointer: str, text: str) -> dict[str, Any]:
    """`state` with the value at JSON pointer `pointer` replaced by the JSON `text` (a data fix of one
    part of a large state). InvalidState if the pointer names nothing or the text is not strict JSON,
    or writes a key twice in one object (typed by a person: the first value would be lost unseen)."""
    if not pointer:
        return canonical.parse_state(text, max_bytes=settings.STATE_MAX_BYTES, max_depth=settings.STATE_MAX_DEPTH)
    # The text alone, as typed: wrapped in an object to reuse parse_state, every syntax error was placed
    # 9 characters off ({"value": came first) and every other one named a path under /value.
    raw, value = canonical.parse_json(text, max_bytes=settings.STATE_MAX_BYTES, what=f"the value at {pointer}")
    try:
        fixed = apply_patch(state, [{"op": "replace", "path": pointer, "value": value}], copy=lambda doc: doc)
    except PatchError as exc:
        raise InvalidState(f"{pointer}: {exc}") from None
    # As parse_state checks a whole state (the limits on nesting, names its paths in the state).
    canonical.validate_state(fixed, max_depth=settings.STATE_MAX_DEPTH, floats_checked=True)
    refuse_huge_integers(raw)
    refuse_duplicate_keys(raw, what=f"the value at {pointer}", value=value)
    return fixed  # type: ignore[no-any-return]


def _clean_text(name: str, value: Any, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidState(f"{name} must be a string")
    if "\x00" in value:  # PostgreSQL text cannot hold it
        raise InvalidState(f"{name} must not contain NUL characters")
    if len(value) > limit:
        raise InvalidState(f"{name} is longer than {limit} characters")
    return value


def _clean_status(status: Any) -> str:
    if status in (None, ""):
        return ""
    if status not in SESSION_STATUSES:
        raise InvalidState(f"status must be one of {', '.join(SessionStatus.values)}")
    return str(status)


def _clean_expected(expected_version: Any) -> int | None:
    if expected_version is None:
        return None
    if isinstance(expected_version, bool) or not isinstance(expected_version, int) or expected_version < 0:
        raise InvalidState("expected_version must be a non-negative integer (0 = the session has no versions yet)")
    return expected_version


def _check_expected(session: WorkflowSession, expected_version: int | None) -> None:
    if expected_version is not None and expected_version != session.head_number:
        raise VersionConflict(
            f"expected head version {expected_version} but the head is {session.head_number}; nothing was written",
            expected=expected_version,
            head=session.head_number,
        )


def _head(session: WorkflowSession) -> Version | None:
    if session.head_number == 0:
        return None
    return Version.objects.get(session=session, number=session.head_number)


def _lock_for_write(session: WorkflowSession) -> WorkflowSession:
    """The project's shared write lock, then the session's row lock (snapshot_record's hot path)."""
    if connection.vendor == "postgresql":
        locked = rows.session_lock(session.pk)
        if locked is None:
            raise session_gone(session)
        return locked
    store.project_write_lock(session.project_id)
    return session_lock(session)


@dataclass(frozen=True)
class _Announcement:
    """What the committed versions `first`..`newest.number` of one session leave to do: announce
    them, queue their finalize, and keep the newest state in the head cache."""

    newest: Version
    first: int
    version_ids: tuple[int, ...]
    canonical: bytes | None  # the newest state, if the write had it at hand


def _merged(waiting: _Announcement, newer: _Announcement) -> _Announcement:
    return _Announcement(newer.newest, waiting.first, waiting.version_ids + newer.version_ids, newer.canonical)


def _announce(announcement: _Announcement) -> None:
    from snapshots_app import tasks

    version = announcement.newest
    session = version.session
    if announcement.canonical is not None:
        store.remember_head(version, announcement.canonical)
    payload = {**session_event(session), "version": version.number, "first": announcement.first,
               "kind": version.kind, "step": version.step}
    events.publish(session.project_id, "version.created", payload, session_id=session.pk)
    try:
        tasks.finalize_versions.delay(list(announcement.version_ids))
    except Exception as exc:  # noqa: BLE001 - the write is committed; tasks.finalize_pending catches up
        finalize_send_failures.failed(exc, f"finalize of versions {announcement.version_ids} not queued; "
                                           "beat's finalize_pending catches up (every 5 min)")
    else:
        finalize_send_failures.succeeded()


def _after_commit(version: Version, canonical_bytes: bytes | None) -> None:
    """Announce the new version, queue its finalize task and warm the head cache, after commit and
    off the caller's thread (sessions_app.background): none of it is needed for the write to count.
    A session written again within SESSION_NOTIFY_INTERVAL_MS of its last announcement is announced
    once for all those versions at the end of the interval (an engine writing step after step
    would otherwise pay a publish, a task message and a head-cache write per step)."""
    announcement = _Announcement(version, version.number, (version.pk,), canonical_bytes)
    if celery_app.conf.task_always_eager:  # the app itself: a task's proxy costs ~0.2 ms per lookup
        # Eager Celery (the embedded default) runs finalize inline, against the database: keep that
        # on the committing thread, where SQLite has its one writer (and a test its transaction).
        transaction.on_commit(lambda: _announce(announcement))
    else:
        background.after_commit_coalesced(
            ("session", version.session_id), announcement, _announce, merge=_merged,
            interval=settings.SESSION_NOTIFY_INTERVAL_MS / 1000,
        )


# What a new version changes on its session.
MOVED_FIELDS = (
    "head_number", "version_count", "logical_bytes", "stored_bytes", "status", "last_step", "last_error", "updated_at",
)


def _append(
    session: WorkflowSession,
    *,
    kind: str,
    root: bytes,
    checksum: str,
    logical_size: int,
    stored_size: int,
    parent: Version | _Head | None,
    status: str = "",
    step: str = "",
    error: str = "",
    label: str = "",
    engine: str = "",
    engine_version: str = "",
    tags: list[str] | None = None,
    reason: str = "",
    idempotency_key: str | None = None,
    actor: User = None,
    actor_label: str = "",
) -> Version:
    """Insert the next version of a locked session and move its head. Caller holds the lock.
    `parent=HEAD` means the session's current head (looked up by the insert itself on PostgreSQL)."""
    version = _new_version(
        session, session.head_number + 1, kind=kind, root=root, checksum=checksum, logical_size=logical_size,
        stored_size=stored_size, status=status, step=step, error=error, label=label, engine=engine,
        engine_version=engine_version, tags=tags, reason=reason, idempotency_key=idempotency_key, actor=actor,
        actor_label=actor_label,
    )
    fast = parent is HEAD and connection.vendor == "postgresql"
    if not fast:
        version.parent = _head(session) if parent is HEAD else parent  # type: ignore[assignment]
    session.head_number = version.number
    session.version_count += 1
    session.stored_bytes += stored_size
    for name, value in _session_moves(kind=kind, status=status, step=step, error=error, logical_size=logical_size).items():
        setattr(session, name, value)
    if fast:
        rows.version_insert_after_head(version, session, list(MOVED_FIELDS))
    else:
        version.save(force_insert=True)
        session.save(update_fields=MOVED_FIELDS)
    return version


def _new_version(
    session: WorkflowSession,
    number: int,
    *,
    tags: list[str] | None,
    actor: User,
    actor_label: str,
    **values: Any,
) -> Version:
    who = actor_fields(actor, actor_label)
    return Version(
        session=session, number=number, tags=tags or [], created_by=who["actor"], created_by_label=who["actor_label"],
        **values,
    )


def _session_moves(*, kind: str, status: str, step: str, error: str, logical_size: int) -> dict[str, Any]:
    """What a new version sets on its session, besides the head number and the counters."""
    moves: dict[str, Any] = {"logical_bytes": logical_size, "updated_at": timezone.now()}
    if status:
        moves["status"] = status
    if step:
        moves["last_step"] = step
    if error:
        moves["last_error"] = error
    elif status in (SessionStatus.RUNNING, SessionStatus.COMPLETED) or kind in (VersionKind.REWIND, VersionKind.DATA_FIX):
        # A rewind's or data fix's state is its version's, error included: none means none.
        moves["last_error"] = ""
    return moves


def _refuse_damaged(target: Version, action: str) -> None:
    """A rewind or fork copies its target's stored state without reading it: a target that fails its
    checksum made a head (or a fork) no read could serve, and an engine resuming from it got an
    integrity error instead of the state it was sent back to. Refused up front, naming the version."""
    try:
        # From the stored rows: the caches hold what was verified before, not what the copy would share.
        store.read_canonical(target, use_cache=False)
    except IntegrityProblem as exc:
        raise VersionDamaged(
            f"{exc.message}: a {action} to it would copy the damage. Choose another version, or restore its "
            "data first (the integrity scrub lists every version the damage affects)",
            version=target.number, session=str(target.session_id),
        ) from None


def copied_fields(source: Version) -> dict[str, Any]:
    """What a version that copies `source` (a rewind or fork) takes from it besides its state's root and
    size: state (checksum), status, step, error and engine. A rewind to a failed version left the session
    failed with no error to say why."""
    return {"checksum": source.checksum, "status": source.status or SessionStatus.RUNNING, "step": source.step,
            "error": source.error, "engine": source.engine, "engine_version": source.engine_version}


def _append_copy(
    session: WorkflowSession,
    source: Version,
    *,
    kind: str,
    reason: str,
    idempotency_key: str | None = None,
    actor: User = None,
    actor_label: str = "",
) -> Version:
    """Append a version whose state is `source`'s (a rewind or fork): it points at the same root,
    so it stores no nodes. It takes the rest of copied_fields from `source` too. Caller holds the
    session lock."""
    return _append(
        session,
        kind=kind,
        root=bytes(source.root),
        logical_size=source.logical_size,
        stored_size=0,
        parent=source,
        **copied_fields(source),
        reason=reason,
        idempotency_key=idempotency_key,
        actor=actor,
        actor_label=actor_label,
    )


def snapshot_record(
    *,
    session: WorkflowSession,
    state: dict[str, Any] | bytes | str | PreparedState,
    step: str | None = None,
    status: str | None = None,
    error: str | None = None,
    label: str | None = None,
    engine: str | None = None,
    engine_version: str | None = None,
    tags: list[str] | None = None,
    expected_version: int | None = None,
    idempotency_key: str | None = None,
    kind: str = VersionKind.STEP,
    actor: User = None,
    actor_label: str = "",
) -> Version:
    """Record a snapshot as the session's new head version.

    Stale `expected_version` -> VersionConflict, nothing written. A repeated `idempotency_key`
    returns the version the first call created (IdempotencyKeyReused if the state differs).
    """
    fields: dict[str, Any] = {
        "step": _clean_text("step", step, METADATA_LIMITS["step"]),
        "status": _clean_status(status),
        "error": _clean_text("error", error, ERROR_MAX),
        "label": _clean_text("label", label, METADATA_LIMITS["label"]).strip(),  # as version_label keeps it
        "engine": _clean_text("engine", engine, METADATA_LIMITS["engine"]),
        "engine_version": _clean_text("engine_version", engine_version, METADATA_LIMITS["engine_version"]),
        "tags": clean_tags(tags),
    }
    key = _clean_text("idempotency_key", idempotency_key, METADATA_LIMITS["idempotency_key"]) or None
    expected = _clean_expected(expected_version)
    if kind not in VERSION_KINDS:
        raise InvalidState(f"kind must be one of {', '.join(VersionKind.values)}")
    prepared = state_prepare(state)
    if key is None:
        ensure_writable(session)  # (with a key, under the lock: see _replay_or_writable)
    if connection.vendor == "postgresql":
        appended = _append_to_known_head(
            session, prepared, kind=kind, key=key, expected=expected, actor=actor, actor_label=actor_label, **fields
        )
        if appended is not None:
            return appended

    with transaction.atomic():
        # Session lock first: under it the head is known, and the new nodes are checked against the
        # head's tree in memory (see store.ProjectStore.write_state) instead of the database.
        locked = _lock_for_write(session)
        replay = _replay_or_writable(locked, key, kind=kind, checksum=prepared.checksum, **fields)
        if replay is not None:
            return replay
        _check_expected(locked, expected)
        written = store.ProjectStore(session.project_id).write_state(
            prepared.value, prepared.canonical, prepared.checksum, prepared.members,
            session_id=locked.pk, head=locked.head_number,
        )
        version = _append(
            locked,
            kind=kind,
            root=written.root,
            checksum=prepared.checksum,
            logical_size=len(prepared.canonical),
            stored_size=written.stored_bytes,
            parent=HEAD,
            idempotency_key=key,
            actor=actor,
            actor_label=actor_label,
            **fields,
        )
        if written.shape is not None:
            shape = written.shape
            transaction.on_commit(lambda: store.head_shapes.put(locked.pk, (version.number, shape)))
        _after_commit(version, prepared.canonical)
    _refresh(session, locked)
    return version


def snapshot_record_batch(
    *,
    session: WorkflowSession,
    snapshots: list[dict[str, Any]],
    expected_version: int | None = None,
    idempotency_key: str | None = None,
    actor: User = None,
    actor_label: str = "",
) -> list[Version]:
    """Record `snapshots` (each snapshot_record's metadata and `state`) in order, all or nothing;
    `expected_version` applies to the first. A repeated `idempotency_key` returns the versions the
    first call created; another batch under the same key (more, fewer or other snapshots) is
    IdempotencyKeyReused, nothing written.

    Each version carries a key derived from the batch's (rows.batch_key), numbered by its place in
    the batch. A key a single write used (snapshot, rewind) is IdempotencyKeyReused here, and the
    other way round."""
    key = _clean_text("idempotency_key", idempotency_key, METADATA_LIMITS["idempotency_key"]) or None
    with transaction.atomic():
        if key is not None:
            _lock_for_write(session)  # a retry racing the first call waits for it, then counts
            _refuse_removed_write(session, key, batch=True)
            earlier = Version.objects.filter(session=session, idempotency_key__startswith=rows.batch_key_prefix(key)).count()
            if earlier and earlier != len(snapshots):
                raise IdempotencyKeyReused(
                    f"idempotency key {key!r} was used for a batch of {earlier} snapshots, not {len(snapshots)}; "
                    "nothing was written"
                )
            single = None if earlier else (
                Version.objects.filter(session=session, idempotency_key=key).first()
                or RemovedWrite.objects.filter(session=session, idempotency_key=key).first()  # (since removed)
            )
            if single is not None:
                raise IdempotencyKeyReused(
                    f"idempotency key {key!r} was used for version {single.number}, written alone, not by a batch; "
                    "nothing was written", version=single.number,
                )
        return [
            snapshot_record(
                session=session, expected_version=expected_version if index == 0 else None,
                idempotency_key=rows.batch_key(key, index), actor=actor, actor_label=actor_label, **snapshot,
            )
            for index, snapshot in enumerate(snapshots)
        ]


def _refresh(session: WorkflowSession, moved: WorkflowSession) -> None:
    """Bring the caller's copy of the session up to the write it made (its head above all, which
    the next write of the same copy starts from; see _append_to_known_head)."""
    if session is not moved:
        for name in MOVED_FIELDS:
            setattr(session, name, getattr(moved, name))


def _append_to_known_head(
    session: WorkflowSession,
    prepared: PreparedState,
    *,
    kind: str,
    key: str | None,
    expected: int | None,
    actor: User,
    actor_label: str,
    **fields: Any,
) -> Version | None:
    """snapshot_record in one statement: the new nodes are found against the head's tree before any
    lock, then one statement (rows.version_append_if_head) takes the locks, checks the head is still
    that one, and inserts the nodes and the version and moves the session — outside a transaction,
    with no BEGIN or COMMIT of its own. The head's tree is the one this process remembers when
    `session.head_number` (as fresh as the caller's copy; an API request's is) says it is still the
    head, else it is read first, in one round trip, so writes of a session spread over several
    processes take this path too. None if the head moved meanwhile, the key was used before, the
    session has no version yet (the full path shares its subtrees with other sessions), or anything
    else needs the full path, which then decides (and raises) under the lock.
    """
    if session.head_number == 0:
        return None  # a first version (or a copy too stale to say): the full path finds out
    project = store.ProjectStore(session.project_id)
    cached = store.head_shapes.get(session.pk)
    if cached is not None and cached[0] == session.head_number:
        head, known = cached
    else:
        head, known = project.current_head_shape(session.pk)
        if head and not connection.in_atomic_block:  # inside a transaction, the head may not be committed
            store.head_shapes.put(session.pk, (head, known))
    if not head or (expected is not None and expected != head):
        return None
    root, new_nodes = project.plan(prepared.value, prepared.canonical, prepared.checksum, known, prepared.members)
    version = _new_version(
        session, head + 1, kind=kind, root=root, checksum=prepared.checksum, logical_size=len(prepared.canonical),
        idempotency_key=key, actor=actor, actor_label=actor_label, **fields,
    )
    moves = _session_moves(
        kind=kind, status=fields["status"], step=fields["step"], error=fields["error"],
        logical_size=len(prepared.canonical),
    )
    try:
        # Inside a caller's transaction a savepoint keeps a failed attempt from aborting it.
        with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
            if not rows.version_append_if_head(version, head, project.node_rows(new_nodes), moves):
                return None
            shape = store.shape_after(root, new_nodes, known)
            if shape is not None:
                transaction.on_commit(lambda: store.head_shapes.put(session.pk, (version.number, shape)))
            _after_commit(version, prepared.canonical)
    except IntegrityError:
        return None  # e.g. the same idempotency key committed by a concurrent call: see _replay
    return version


def _replay_or_writable(session: WorkflowSession, key: str | None, **request: Any) -> Version | None:
    """The version an earlier call with idempotency key `key` wrote (see _replay), else None once the
    session is known to take writes (SessionArchived if not). The replay comes first: a retry whose
    first answer was lost gets it even after the session was archived meanwhile, not a 409 saying
    nothing was written about a write that was made."""
    replay = None if key is None else _replay(session, key, **request)
    if replay is None:
        ensure_writable(session)
    return replay


_REQUEST_NAMES = {"checksum": "state", "parent_id": "version to rewind to", "kind": "kind of write"}


def _replay(session: WorkflowSession, key: str, **request: Any) -> Version | None:
    """The version an earlier call with idempotency key `key` created, if any. `request` is what this
    call asks for, as version fields; if the first call asked for anything else (another state,
    step, status, error…, or a rewind where this is a snapshot) the key is being reused:
    IdempotencyKeyReused, nothing written."""
    first = Version.objects.filter(session=session, idempotency_key=key).select_related("session").first()
    if first is None:
        _refuse_removed_write(session, key)
        batched = Version.objects.filter(session=session, idempotency_key=rows.batch_key(key, 0)).first()
        if batched is not None:
            raise IdempotencyKeyReused(
                f"idempotency key {key!r} was used for a batch (from version {batched.number}), not a single write; "
                "nothing was written", version=batched.number,
            )
        return None
    differs = [name for name, value in request.items() if getattr(first, name) != value]
    if differs == ["label"] and _label_when_written(first) == request["label"]:
        differs = []  # relabelled by an operator since: the retry still asks for what the first call wrote
    if differs:
        raise IdempotencyKeyReused(
            f"idempotency key {key!r} was used for version {first.number} with a different "
            f"{', '.join(_REQUEST_NAMES.get(name, name.replace('_', ' ')) for name in differs)}; nothing was written",
            version=first.number,
        )
    return first


def _refuse_removed_write(session: WorkflowSession, key: str, *, batch: bool = False) -> None:
    """WriteRemoved if a call with idempotency key `key` (a batch's, with `batch`) wrote versions that a
    trim or retention has removed since: its first answer cannot be given, and writing it again would
    put an old state on top of what was written after it."""
    removed = RemovedWrite.objects.filter(session=session)
    removed = (removed.filter(idempotency_key__startswith=rows.batch_key_prefix(key)) if batch
               else removed.filter(idempotency_key__in=[key, rows.batch_key(key, 0)]))
    numbers = sorted(removed.values_list("number", flat=True))
    if numbers:
        wrote = f"version {numbers[0]}" if len(numbers) == 1 else f"versions from {numbers[0]}"
        raise WriteRemoved(
            f"idempotency key {key!r} wrote {wrote}, since removed (by a trim or retention); its answer cannot be "
            "given again and nothing was written again", version=numbers[0],
        )


def _label_when_written(version: Version) -> str:
    """The label `version` was written with: its first relabel's `previous`, if it was relabelled."""
    first_relabel = (
        AuditEvent.objects.filter(action="version.label", target_type="version", target_id=str(version.pk))
        .order_by("created_at", "id")
        .values_list("details", flat=True)
        .first()
    )
    return version.label if first_relabel is None else first_relabel.get("previous", "")


def snapshot_rewind(
    *,
    session: WorkflowSession,
    to_version: int,
    reason: str,
    expected_version: int | None = None,
    idempotency_key: str | None = None,
    actor: User = None,
    actor_label: str = "",
) -> Version:
    """Append a new head whose state equals version `to_version`. History is never rewritten."""
    reason = require_reason(reason)
    expected = _clean_expected(expected_version)
    key = _clean_text("idempotency_key", idempotency_key, METADATA_LIMITS["idempotency_key"]) or None
    if key is None:
        ensure_writable(session)  # (with a key, under the lock: see _replay_or_writable)
    with transaction.atomic():
        # The new head reuses the target's nodes: hold off garbage collection until commit.
        store.project_write_lock(session.project_id)
        # The session's lock before the target is read: retention removes a session's versions
        # under it, so a target read after it stays (retention then sees the rewind pointing at it).
        # Read before the lock, a target retention was removing made the rewind fail at commit on
        # its parent key (a 500) instead of a 404.
        locked = session_lock(session)
        target = version_get(session=session, number=to_version)
        replay = _replay_or_writable(locked, key, kind=VersionKind.REWIND, parent_id=target.pk, reason=reason)
        if replay is not None:
            return replay
        _check_expected(locked, expected)
        _refuse_damaged(target, "rewind")
        previous_head = locked.head_number
        version = _append_copy(
            locked, target, kind=VersionKind.REWIND, reason=reason, idempotency_key=key,
            actor=actor, actor_label=actor_label,
        )
        audit_record(
            project=locked.project, action="session.rewind", target_type="version", target_id=version.pk,
            session_id=locked.pk, reason=reason, actor=actor, actor_label=actor_label,
            details={"to_version": target.number, "previous_head": previous_head, "new_head": version.number},
        )
        _after_commit(version, None)
    return version


def snapshot_fork(
    *,
    session: WorkflowSession,
    from_version: int,
    external_id: str | None = None,
    reason: str = "",
    idempotency_key: str | None = None,
    actor: User = None,
    actor_label: str = "",
) -> WorkflowSession:
    """Start a new session (same project) whose first version is `from_version` of `session`.
    `reason` is required: it goes into the audit log.

    A repeated `idempotency_key` (per source session) returns the session the first call created
    (IdempotencyKeyReused if it asked for another version, external id or reason)."""
    from sessions_app.services import session_get_or_create

    reason = require_reason(reason)
    key = _clean_text("idempotency_key", idempotency_key, METADATA_LIMITS["idempotency_key"]) or None
    with transaction.atomic():
        store.project_write_lock(session.project_id)  # the fork reuses the source's nodes
        # The source session's lock before the source version is read, as in snapshot_rewind: retention
        # removes versions under it, so the source stays until this fork (which protects it) commits.
        # It also decides concurrent retries of one fork one at a time.
        session_lock(session)
        source = version_get(session=session, number=from_version)
        if key is not None:
            earlier = _fork_replay(session, key, source=source, external_id=external_id, reason=reason)
            if earlier is not None:
                return earlier
        _refuse_damaged(source, "fork")
        new_external_id = external_id or new_fork_external_id(session, source.number)
        fork, created = session_get_or_create(
            project=session.project,
            external_id=new_external_id,
            workflow=session.workflow,
            metadata={**session.metadata, "forked_from": {"session": str(session.pk), "version": source.number}},
            tags=list(session.tags),
            actor=actor,
            metadata_copied=True,
        )
        if not created:
            raise SessionExists(f"a session with external_id {new_external_id!r} already exists", external_id=new_external_id)
        fork = session_lock(fork)
        version = _append_copy(
            fork, source, kind=VersionKind.FORK, reason=reason, idempotency_key=key, actor=actor, actor_label=actor_label
        )
        audit_record(
            project=session.project, action="session.fork", target_type="session", target_id=fork.pk,
            session_id=session.pk, reason=reason, actor=actor, actor_label=actor_label,
            details={"from_session": str(session.pk), "from_version": source.number, "new_session": str(fork.pk),
                     "new_external_id": fork.external_id, **({"idempotency_key": key} if key else {})},
        )
        _after_commit(version, None)
    return fork


def _fork_replay(
    session: WorkflowSession, key: str, *, source: Version, external_id: str | None, reason: str
) -> WorkflowSession | None:
    """The session an earlier fork of `session` with idempotency key `key` created, if any and still
    there; IdempotencyKeyReused if that fork was asked for differently.

    Found by the fork's audit event, which keeps the key: the fork's first version, which carries it
    too, may have been trimmed since, and its `forked_from` metadata edited (either made a retry fork
    again). Forks from before events kept the key are found by that first version."""
    # The newest: once a fork is deleted, its retry makes another, which later retries must find (the
    # oldest named the deleted one, and each retry made one more).
    event = (AuditEvent.objects.filter(session_id=session.pk, action="session.fork", details__idempotency_key=key)
             .order_by("-pk").first())
    if event is not None:
        fork = WorkflowSession.objects.filter(pk=event.target_id, project_id=session.project_id).first()
        if fork is None:
            return None  # deleted since: this retry makes it again
        asked_version, asked_reason = event.details.get("from_version"), event.reason
    else:
        first = (Version.objects.filter(kind=VersionKind.FORK, number=1, idempotency_key=key, parent__session=session)
                 .select_related("session", "parent").first())
        if first is None:
            return None
        fork, asked_version, asked_reason = first.session, first.parent.number if first.parent else None, first.reason
    differs = [
        name for name, same in (
            ("version", asked_version == source.number),
            ("external id", external_id in (None, "", fork.external_id)),
            ("reason", asked_reason == reason),
        ) if not same
    ]
    if differs:
        raise IdempotencyKeyReused(
            f"idempotency key {key!r} was used for fork {fork.external_id!r} with a different "
            f"{', '.join(differs)}; nothing was written",
            version=1,
        )
    return fork


def snapshot_data_fix(
    *,
    session: WorkflowSession,
    state: dict[str, Any] | bytes | str | PreparedState,
    based_on: int,
    reason: str,
    expected_version: int | None = None,
    edited: str | None = None,
    actor: User = None,
    actor_label: str = "",
) -> Version:
    """Record a corrected state (edited by staff from version `based_on`) as a new head; audited.
    `edited`: the JSON pointer of the one part that was edited, when not the whole state.

    A state that is the head's already changes nothing: the head is answered as it is, and nothing
    is recorded or audited (so the caller tells a fix from none by the number: the head's, not the
    next). Like a pin of a pinned version, or a retention policy set to the one in force."""
    reason = require_reason(reason)
    base = version_get(session=session, number=based_on)
    prepared = state_prepare(state)
    with transaction.atomic():
        locked = _lock_for_write(session)  # (the head compared is the one the fix would follow)
        ensure_writable(locked)
        _check_expected(locked, _clean_expected(expected_version))
        head = _head(locked)
        if head is not None and head.checksum == prepared.checksum:
            head.session = locked
            return head
        # Its status, step and error are its base's, as a rewind's are: a fix of a failed version made
        # the session failed with no error to say why.
        version = snapshot_record(
            session=session, state=prepared, step=base.step, status=base.status or None, error=base.error or None,
            expected_version=expected_version, kind=VersionKind.DATA_FIX, actor=actor, actor_label=actor_label,
        )
        Version.objects.filter(pk=version.pk).update(reason=reason)
        version.reason = reason
        audit_record(
            project=session.project, action="version.data_fix", target_type="version", target_id=version.pk,
            session_id=session.pk, reason=reason, actor=actor, actor_label=actor_label,
            details={"based_on": base.number, "new_head": version.number, "checksum": version.checksum,
                     **({"edited": edited} if edited else {})},
        )
    return version


MAX_TRIM_KEEP = 10_000


@dataclass(frozen=True)
class TrimOutcome:
    removed: list[int]  # the numbers removed
    kept: list[int]  # every version still there
    protected: list[int]  # kept although not asked for: pinned, labelled, a fork's or a kept rewind's source


def session_trim(
    *,
    session: WorkflowSession,
    keep: Any,
    reason: str,
    expected_version: int | None = None,
    actor: User = None,
    actor_label: str = "",
) -> TrimOutcome:
    """Remove every version of the session except the numbers in `keep` (which must name the head),
    in one transaction, audited as one `session.trim` event. What an operator marked (pinned or
    labelled versions), versions another session was forked from and the versions kept rewinds
    restored stay (as retention keeps them), and are reported as protected. Kept versions keep their numbers, states and checksums; one whose parent goes points
    at its nearest kept ancestor, as after retention. Trimming what is already trimmed removes
    nothing and records nothing.

    What automation asks instead of deleting a session and writing its last state again (LangGraph's
    `prune`): there, a crash between the two lost that state."""
    reason = require_reason(reason)
    expected = _clean_expected(expected_version)
    wanted = _clean_numbers(keep)
    with transaction.atomic():
        locked = session_lock(session)
        ensure_writable(locked)
        _check_expected(locked, expected)
        plan = trim_plan(locked, wanted)
        ids = plan.ids
        missing = sorted(wanted - ids.keys())
        if missing:
            raise VersionNotFound(
                f"session {locked.external_id} has no version {missing[0]}"
                f"{f' (nor {len(missing) - 1} more of those asked to keep)' if len(missing) > 1 else ''}; "
                "nothing was removed",
                numbers=missing[:100],
            )
        if locked.head_number not in wanted:
            raise HeadNotKept(
                f"keep must include the head, v{locked.head_number}: a trim never moves the head (rewind first "
                "to go back); nothing was removed",
                head=locked.head_number,
            )
        protected = plan.protected
        doomed = {ids[number] for number in plan.removed}
        removed: list[int] = []
        if doomed:
            removed, freed_bytes = compaction.remove_versions(locked, doomed)
            audit_record(
                project=locked.project, action="session.trim", target_type="session", target_id=locked.pk,
                session_id=locked.pk, reason=reason, actor=actor, actor_label=actor_label,
                details={"external_id": locked.external_id, **removal_details(removed), "bytes_freed": freed_bytes,
                         "head": locked.head_number, "protected": sorted(protected)},
            )
    return TrimOutcome(removed=removed, kept=sorted(ids.keys() - set(removed)), protected=sorted(protected))


def _clean_numbers(numbers: Any) -> set[int]:
    if not isinstance(numbers, (list, tuple, set, frozenset)) or not numbers:
        raise InvalidState("keep must be a non-empty list of version numbers (it must name the head)")
    if len(numbers) > MAX_TRIM_KEEP:
        raise InvalidState(f"keep may name at most {MAX_TRIM_KEEP} versions")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in numbers):
        raise InvalidState("keep must hold version numbers: integers from 1")
    return set(numbers)


@transaction.atomic
def version_pin(*, version: Version, pinned: bool, actor: User = None, actor_label: str = "") -> Version:
    """Pin or unpin a version (audited). Pinning a pinned version, or unpinning an unpinned one, is
    answered with the version as it is and records nothing: a retry or a second click is no event."""
    ensure_writable(session_lock(version.session))  # under the lock archiving takes
    version.pinned = _kept_value(version, "pinned")
    if version.pinned == pinned:
        return version
    _update_kept_version(version, pinned=pinned)
    version.pinned = pinned
    audit_record(
        project=version.session.project, action="version.pin" if pinned else "version.unpin", target_type="version",
        target_id=version.pk, session_id=version.session_id, actor=actor, actor_label=actor_label,
        details={"version": version.number},
    )
    _announce_changed(version)
    return version


PIN_BATCH = 1_000  # versions per transaction of versions_pin: its session locks are held for a moment


@dataclass
class PinOutcome:
    done: int = 0
    unchanged: int = 0  # pinned (or unpinned) already: left as they were, not audited
    refused: Counter[str] = field(default_factory=Counter)  # why -> how many versions were refused for it


def versions_pin(*, versions: QuerySet[Version], pinned: bool, actor: User = None, actor_label: str = "") -> PinOutcome:
    """version_pin for many versions at once (an admin's select-all of thousands): the same checks
    under the same session locks, the same audit event per version and one live update per session,
    in transactions of about PIN_BATCH versions that each lock their sessions once (in id order,
    as no other change takes several). One by one, 20,000 pins took a request of minutes."""
    outcome = PinOutcome()
    chosen = versions.order_by("session_id", "number").values_list("pk", "session_id")
    batch: list[tuple[int, Any]] = []
    for row in chosen.iterator(chunk_size=10_000):
        if len(batch) >= PIN_BATCH and row[1] != batch[-1][1]:  # a session's versions stay in one batch
            _pin_batch(batch, pinned, actor, actor_label, outcome)
            batch = []
        batch.append(row)
    if batch:
        _pin_batch(batch, pinned, actor, actor_label, outcome)
    return outcome


@transaction.atomic
def _pin_batch(batch: list[tuple[int, Any]], pinned: bool, actor: User, actor_label: str, outcome: PinOutcome) -> None:
    # Their rows only (of=self), not their project's: a session_lock of a later session (a pin, a
    # rewind) locks that session and then the project row, so holding the project row while waiting
    # on the sessions in turn deadlocked with it.
    sessions = WorkflowSession.objects.select_for_update(of=("self",)).select_related("project").order_by("pk")
    writable = {}
    for session in sessions.filter(pk__in={session_id for _, session_id in batch}):
        try:
            ensure_writable(session)
        except StateStoreError as exc:  # an archived session's versions stay as they are
            outcome.refused[exc.message] += sum(1 for _, session_id in batch if session_id == session.pk)
        else:
            writable[session.pk] = session
    # Under the session locks, as retention removes versions: a version gone meanwhile is not pinned
    # (nor audited as pinned), as version_pin answers VersionNotFound.
    found = list(Version.objects.filter(pk__in=[pk for pk, session_id in batch if session_id in writable])
                 .order_by("session_id", "number").values_list("pk", "session_id", "number", "pinned"))
    gone = sum(1 for _, session_id in batch if session_id in writable) - len(found)
    if gone:
        outcome.refused["a version no longer exists; nothing was changed"] += gone
    # Those pinned (unpinned) already stay as they are, unaudited, as version_pin leaves them.
    kept = [(pk, session_id, number) for pk, session_id, number, was in found if was != pinned]
    outcome.unchanged += len(found) - len(kept)
    Version.objects.filter(pk__in=[pk for pk, _, _ in kept]).update(pinned=pinned)
    audit_record_many([
        audit_event(project=writable[session_id].project, action="version.pin" if pinned else "version.unpin",
                    target_type="version", target_id=pk, session_id=session_id, actor=actor, actor_label=actor_label,
                    details={"version": number})
        for pk, session_id, number in kept
    ])
    outcome.done += len(kept)
    numbers: dict[Any, list[int]] = {}
    for _, session_id, number in kept:
        numbers.setdefault(session_id, []).append(number)
    for session_id, changed in numbers.items():
        # One event per session: open timelines redraw the rows of `numbers`, or, for more than a
        # page of them (only `count`), reload (see SessionTimelineConsumer).
        payload: dict[str, Any] = {"session": str(session_id), "version": max(changed), "first": min(changed),
                                   "count": len(changed), "pinned": pinned}
        if len(changed) <= TIMELINE_PAGE:
            payload["numbers"] = changed
        events.publish_after_commit(writable[session_id].project_id, "version.updated", payload, session_id=session_id)


@transaction.atomic
def version_label(*, version: Version, label: str, actor: User = None, actor_label: str = "") -> Version:
    label = _clean_text("label", label, METADATA_LIMITS["label"]).strip()
    ensure_writable(session_lock(version.session))  # under the lock archiving takes
    previous = version.label = _kept_value(version, "label")
    if previous == label:  # (as a repeated pin: nothing changes, nothing is recorded)
        return version
    _update_kept_version(version, label=label)
    version.label = label
    audit_record(
        project=version.session.project, action="version.label", target_type="version", target_id=version.pk,
        session_id=version.session_id, actor=actor, actor_label=actor_label,
        details={"version": version.number, "label": label, "previous": previous},
    )
    _announce_changed(version)
    return version


def _kept_value(version: Version, name: str) -> Any:
    """The version's field `name` as committed, read under its session's lock (the caller's): the
    instance may be older than a pin or label made meanwhile. VersionNotFound if it is gone (below)."""
    values = list(Version.objects.filter(pk=version.pk).values_list(name, flat=True))
    if not values:
        raise _gone(version)
    return values[0]


def _gone(version: Version) -> VersionNotFound:
    return VersionNotFound(
        f"session {version.session.external_id} has no version {version.number} (any more); nothing was changed",
        version=version.number,
    )


def _update_kept_version(version: Version, **values: Any) -> None:
    """Set `values` on the version, under its session's lock (the caller's). VersionNotFound if it
    is gone: retention removes versions under that lock, and one it removed while this call waited
    must not be answered (and audited) as pinned or labelled, a pin that protects nothing."""
    if not Version.objects.filter(pk=version.pk).update(**values):
        raise _gone(version)


def _announce_changed(version: Version) -> None:
    """After commit: open timelines redraw the version's row (its pin or label changed)."""
    payload = {"session": str(version.session_id), "version": version.number}
    events.publish_after_commit(version.session.project_id, "version.updated", payload, session_id=version.session_id)

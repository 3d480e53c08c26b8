"""Every write to projects, members, sessions and the audit log goes through here."""

from __future__ import annotations

import enum
import hashlib
import math
import re
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, models, transaction
from django.db.models import Q, QuerySet
from django.dispatch import Signal
from django.utils import timezone

from sessions_app import events
from sessions_app.errors import (
    IdempotencyKeyReused,
    InvalidState,
    LastAdmin,
    NotFound,
    ReasonRequired,
    SecretShownOnce,
    SessionArchived,
    SessionNotFound,
)
from sessions_app.models import (
    SESSION_STATUSES,
    ApiKey,
    AuditAction,
    AuditEvent,
    Membership,
    Names,
    Project,
    Role,
    SessionStatus,
    WorkflowSession,
)
from sessions_app.selectors import projects_left_without_admin
from sessions_app.strict_json import same_json

# Who acts: a user (possibly anonymous) or None for the system. Typed loosely on purpose: the
# concrete user model is swappable.
User = Any
M = TypeVar("M", bound=models.Model)

MAX_TAGS = 50
TAG_RE = re.compile(r"^[\w.:\-/ ]{1,64}$")


def actor_fields(actor: User, actor_label: str = "") -> dict[str, Any]:
    """(actor, label) for rows that record who did something: a user, or an API key's name."""
    if actor is not None and getattr(actor, "is_authenticated", False):
        return {"actor": actor, "actor_label": actor_label or actor.get_username()}
    return {"actor": None, "actor_label": actor_label or "system"}


@dataclass(frozen=True)
class RequestKey:
    """The Idempotency-Key of a request, for a write that keeps it on the row it makes (jobs, API
    keys): `key` hashes the caller, endpoint and key, `digest` the request's input. A retry with
    the same key finds that row; the same key with other input is IdempotencyKeyReused."""

    key: str
    digest: str

    def find(self, rows: QuerySet[M]) -> M | None:
        """The row an earlier request with this key made, or None (IdempotencyKeyReused if that
        request's input differed: another body, or another project)."""
        row = rows.filter(request_key=self.key).first()
        if row is not None and row.request_digest != self.digest:  # type: ignore[attr-defined]
            raise IdempotencyKeyReused("this Idempotency-Key was used before with a different request")
        return row


def create_once(request: RequestKey | None, rows: QuerySet[M], create: Callable[..., M]) -> tuple[M, bool]:
    """(row, created): `create(request_key=…, request_digest=…)`, unless a request with this key made
    its row already. Concurrent retries make one row: the unique request_key makes a second insert
    wait for the first one's commit and fail, and it gets the first one's row."""
    if request is None:
        return create(), True
    earlier = request.find(rows)
    if earlier is not None:
        return earlier, False
    try:
        with transaction.atomic():
            return create(request_key=request.key, request_digest=request.digest), True
    except IntegrityError:
        earlier = request.find(rows)
        if earlier is None:
            raise
        return earlier, False


REASON_MAX = 2_000


def require_reason(reason: Any, *, name: str = "reason") -> str:
    """`reason` stripped, for an action whose audit event must say why; ReasonRequired if blank.
    `name`: what the caller calls it (an integrity problem's resolve takes a `resolution`)."""
    if not isinstance(reason, str) or not reason.strip():
        raise ReasonRequired(f"a {name} is required: it goes into the audit log")
    if "\x00" in reason or len(reason) > REASON_MAX:
        raise InvalidState(f"{name} must be at most {REASON_MAX} characters, without NUL")
    return reason.strip()


AUDIT_ACTIONS = Names(AuditAction.values)


def audit_record(**fields: Any) -> AuditEvent:
    """Store one audit event (the keyword arguments of audit_event)."""
    event = audit_event(**fields)
    event.save(force_insert=True)
    return event


def audit_record_many(events: list[AuditEvent]) -> list[AuditEvent]:
    """Events made by audit_event, stored in one statement (an action on thousands of rows)."""
    return AuditEvent.objects.bulk_create(events, batch_size=2_000)


def audit_event(
    *,
    project: Project,
    action: str,
    target_type: str,
    target_id: Any,
    actor: User = None,
    actor_label: str = "",
    session_id: Any = None,
    reason: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """The audit event, not yet stored (audit_record stores it, audit_record_many many of them)."""
    if action not in AUDIT_ACTIONS:
        raise ValueError(f"unknown audit action {action!r}: add it to AuditAction")
    return AuditEvent(
        project=project,
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        session_id=session_id,
        reason=reason,
        details=details or {},
        **actor_fields(actor, actor_label),
    )


@transaction.atomic
def project_create(*, name: str, slug: str, owner: User = None, actor_label: str = "") -> Project:
    """A new project; `owner` (who creates it) becomes its admin. Audited."""
    project = Project.objects.create(name=name, slug=slug)
    member = owner is not None and getattr(owner, "is_authenticated", False)
    if member:
        Membership.objects.create(project=project, user=owner, role=Role.ADMIN)
    audit_record(
        project=project, action="project.create", target_type="project", target_id=project.pk,
        actor=owner if member else None, actor_label=actor_label,
        details={"slug": slug, "name": name, "admin": str(owner) if member else None},
    )
    return project


@transaction.atomic
def membership_set(*, project: Project, user: Any, role: str, actor: User = None, actor_label: str = "") -> Membership:
    """Give `user` `role` in `project` (adding them, or changing their role). Audited when it changes access.
    LastAdmin, nothing changed, if it demotes the project's last admin (see projects_left_without_admin)."""
    role = Role(role)
    _members_lock([project.pk])
    before = Membership.objects.select_for_update().filter(project=project, user=user).first()
    if before is not None and before.role == role:
        return before
    if before is not None:
        _refuse(membership_demotion_refused(membership=before, role=role))
    membership, _ = Membership.objects.update_or_create(project=project, user=user, defaults={"role": role})
    audit_record(
        project=project, action="membership.set", target_type="user", target_id=user.pk,
        actor=actor, actor_label=actor_label,
        details={"user": str(user), "role": role.value, "previous": None if before is None else before.role},
    )
    return membership


def clean_tags(tags: Any) -> list[str]:
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise InvalidState("tags must be a list of strings")
    cleaned = list(dict.fromkeys(tag.strip() for tag in tags if tag.strip()))
    if len(cleaned) > MAX_TAGS:
        raise InvalidState(f"at most {MAX_TAGS} tags")
    bad = [tag for tag in cleaned if not TAG_RE.match(tag)]
    if bad:
        raise InvalidState(f"invalid tag {bad[0]!r}: 1-64 letters, digits, spaces or . : - / _")
    return cleaned


def _lineage_bytes(metadata: dict[str, Any]) -> int:
    """What a fork's lineage (`forked_from`, see snapshot_fork) adds to its source's metadata: not
    counted against the limit, or a fork of a session at the limit could not be imported again."""
    lineage = metadata.get("forked_from")
    if (
        isinstance(lineage, dict) and lineage.keys() == {"session", "version"}
        and isinstance(lineage["session"], str) and len(lineage["session"]) <= 36
        and isinstance(lineage["version"], int)
    ):
        return len(orjson.dumps({"forked_from": lineage}))
    return 0


def clean_metadata(metadata: Any, *, limit_size: bool = True) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidState("metadata must be a JSON object")
    # The same limits as states: whatever is stored must render back as strict JSON. The walk comes
    # first: it names a too deep path, where orjson would only say "Recursion limit reached".
    _refuse_lossy_jsonb(metadata)
    try:
        size = len(orjson.dumps(metadata))
    except TypeError as exc:
        raise InvalidState(f"metadata cannot be stored as JSON: {exc}") from None
    if limit_size and size - _lineage_bytes(metadata) > settings.SESSION_METADATA_MAX_BYTES:
        raise InvalidState(
            f"metadata is {size:,} bytes as JSON, over the {settings.SESSION_METADATA_MAX_BYTES:,}-byte limit "
            "(SESSION_METADATA_MAX_BYTES): keep large data in the session's state",
            limit=settings.SESSION_METADATA_MAX_BYTES,
        )
    return metadata


def _refuse_lossy_jsonb(metadata: dict[str, Any]) -> None:
    """InvalidState for what PostgreSQL's jsonb would not give back as it was sent: NUL in a string
    (refused by the database), NaN and infinities (orjson writes them as null), and floats of 2**63
    or more (jsonb keeps them as decimals, read back as integers too long for strict JSON); and
    nesting past STATE_MAX_DEPTH levels, as for states (orjson cannot write 255, and every
    answer that carries the metadata nests it a level or more deeper)."""
    max_depth = settings.STATE_MAX_DEPTH
    stack: list[tuple[str, Any, int]] = [("", metadata, 1)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth > max_depth:
            raise InvalidState(f"metadata nests deeper than {max_depth} levels (at {path})", limit=max_depth)
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    raise InvalidState(f"metadata{path}: a key holds a NUL character, which cannot be stored")
                stack.append((f"{path}/{key}", item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}/{index}", item, depth + 1) for index, item in enumerate(value))
        elif isinstance(value, str) and "\x00" in value:
            raise InvalidState(f"metadata{path} holds a NUL character, which cannot be stored")
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) < 2**63):
            raise InvalidState(f"metadata{path} is {value!r}: numbers must be finite and below 2**63 in magnitude")


def clean_external_id(external_id: Any) -> str:
    if not isinstance(external_id, str) or not external_id.strip():
        raise InvalidState("external_id is required (the engine's own session or thread id)")
    if len(external_id) > 255:
        raise InvalidState("external_id is longer than 255 characters")
    if "\x00" in external_id:
        raise InvalidState("external_id must not contain NUL characters")
    # Kept as the engine sent it: stripped, "run-7 " and "run-7" were one session (two threads'
    # checkpoints in one history), and `?external_id=run-7%20` (the id the engine knows) found nothing.
    return external_id


def session_get_or_create(
    *,
    project: Project,
    external_id: str,
    workflow: str = "",
    metadata: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    actor: User = None,
    metadata_copied: bool = False,
) -> tuple[WorkflowSession, bool]:
    """The session with this external id, created if new. Idempotent: safe for engines to call
    at every start; an existing session is returned unchanged. `metadata_copied`: the metadata is
    another session's, accepted when it was set (a fork's, plus its lineage): no size limit."""
    external_id = clean_external_id(external_id)
    metadata = clean_metadata(metadata, limit_size=not metadata_copied)
    tags = clean_tags(tags)
    if not isinstance(workflow, str) or len(workflow) > 200:
        raise InvalidState("workflow must be a string of at most 200 characters")
    existing = WorkflowSession.objects.filter(project=project, external_id=external_id).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            session = WorkflowSession.objects.create(
                project=project,
                external_id=external_id,
                workflow=workflow,
                metadata=metadata,
                tags=tags,
                created_by=actor if getattr(actor, "is_authenticated", False) else None,
            )
    except IntegrityError:
        # A concurrent request created it first; this call is idempotent, so return that one.
        return WorkflowSession.objects.get(project=project, external_id=external_id), False
    events.publish_after_commit(project.pk, "session.created", session_event(session))
    return session, True


def session_event(session: WorkflowSession) -> dict[str, Any]:
    return {
        "session": str(session.pk),
        "external_id": session.external_id,
        "status": session.status,
        "head": session.head_number,
    }


def session_lock(session: WorkflowSession) -> WorkflowSession:
    """The session's row, locked until the transaction ends: the lock every change of a session takes
    (writes, rewinds, forks, pins, retention, archiving, deletion), so they happen one at a time."""
    # of=self: the project row comes along unlocked. Locked too, every change in a project queued on
    # it, and code locking sessions one after another deadlocked against a change of another session.
    locked = (WorkflowSession.objects.select_for_update(of=("self",)).select_related("project")
              .filter(pk=session.pk).first())
    if locked is None:
        raise session_gone(session)
    return locked


def session_gone(session: WorkflowSession) -> SessionNotFound:
    """A session deleted while a call waited for its lock: a 404, as if the deletion had come first."""
    return SessionNotFound(f"session {session.external_id} no longer exists; nothing was changed", session=str(session.pk))


@transaction.atomic
def session_update(
    *,
    session: WorkflowSession,
    status: str | None = None,
    metadata: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    workflow: str | None = None,
    actor: User = None,
    actor_label: str = "",
) -> WorkflowSession:
    """Change a session's status, metadata, tags or workflow name. Audited when anything changes
    (tags decide retention, e.g. `retention:keep-all`)."""
    session = session_lock(session)
    ensure_writable(session)
    asked: dict[str, Any] = {}
    if status is not None:
        if status not in SESSION_STATUSES:
            raise InvalidState(f"status must be one of {', '.join(SessionStatus.values)}")
        asked["status"] = status
    if metadata is not None:
        asked["metadata"] = clean_metadata(metadata)
    if tags is not None:
        asked["tags"] = clean_tags(tags)
    if workflow is not None:
        if not isinstance(workflow, str) or len(workflow) > 200:
            raise InvalidState("workflow must be a string of at most 200 characters")
        asked["workflow"] = workflow
    changed = {name: value for name, value in asked.items() if not same_json(getattr(session, name), value)}
    if not changed:
        return session
    details = {name: {"before": _audit_value(getattr(session, name)), "after": _audit_value(value)}
               for name, value in changed.items()}
    for name, value in changed.items():
        setattr(session, name, value)
    session.save()
    audit_record(
        project=session.project, action="session.update", target_type="session", target_id=session.pk,
        session_id=session.pk, actor=actor, actor_label=actor_label, details=details,
    )
    events.publish_after_commit(session.project_id, "session.updated", session_event(session), session_id=session.pk)
    return session


AUDIT_VALUE_MAX = 2000


def _audit_value(value: Any) -> Any:
    """`value` for an audit event's details, unless its JSON is longer than AUDIT_VALUE_MAX bytes."""
    size = len(orjson.dumps(value))
    return value if size <= AUDIT_VALUE_MAX else {"omitted": f"{size} bytes of JSON"}


@transaction.atomic
def session_archive(*, session: WorkflowSession, reason: str = "", actor: User = None, actor_label: str = "") -> WorkflowSession:
    session = session_lock(session)
    if session.archived_at is None:
        session.archived_at = timezone.now()
        session.save(update_fields=["archived_at", "updated_at"])
        audit_record(
            project=session.project, action="session.archive", target_type="session", target_id=session.pk,
            session_id=session.pk, reason=reason, actor=actor, actor_label=actor_label,
            details={"external_id": session.external_id},
        )
        _announce_archiving(session)
    return session


@transaction.atomic
def session_unarchive(
    *, session: WorkflowSession, reason: str = "", actor: User = None, actor_label: str = ""
) -> WorkflowSession:
    """Accept writes again; the archiving and this are both in the audit log."""
    session = session_lock(session)
    if session.archived_at is not None:
        archived_at, session.archived_at = session.archived_at, None
        session.save(update_fields=["archived_at", "updated_at"])
        audit_record(
            project=session.project, action="session.unarchive", target_type="session", target_id=session.pk,
            session_id=session.pk, reason=reason, actor=actor, actor_label=actor_label,
            details={"external_id": session.external_id, "archived_at": archived_at.isoformat()},
        )
        _announce_archiving(session)
    return session


def _announce_archiving(session: WorkflowSession) -> None:
    """After commit: open pages of the session show it archived or writable again."""
    payload = {**session_event(session), "archived": session.archived_at is not None}
    events.publish_after_commit(session.project_id, "session.archived", payload, session_id=session.pk)


# Sent by session_delete under the session's lock, just before the row goes (`session=`): the state
# store deletes the session's versions itself (snapshots_app.signals). Django's cascade named them
# all in one statement, which PostgreSQL refuses past 65,535 parameters: a longer session could not
# be deleted.
session_deleting = Signal()


@transaction.atomic
def session_delete(*, session: WorkflowSession, reason: str, actor: User = None, actor_label: str = "") -> None:
    """Delete a session and its versions; nodes only it needed are freed by the next compaction.
    `reason` is required: it goes into the audit log. SessionNotFound if it is already gone."""
    reason = require_reason(reason)
    # The session's row lock first, the one writers, rewinds and retention take: a write in flight
    # commits before the versions are collected (it is deleted with them), and one that comes later
    # finds no session (404). Without it the deletion removed the versions, then waited for the
    # row behind a writer that waited for the removed head: a deadlock, and the deletion failed.
    session = session_lock(session)
    audit_record(
        project=session.project, action="session.delete", target_type="session", target_id=session.pk,
        session_id=session.pk, reason=reason, actor=actor, actor_label=actor_label,
        details={"external_id": session.external_id, "versions": session.version_count},
    )
    project_id, session_id = session.project_id, session.pk
    session_deleting.send(sender=WorkflowSession, session=session)
    session.delete()
    events.publish_after_commit(project_id, "session.deleted", {"session": str(session_id)})


def ensure_writable(session: WorkflowSession) -> None:
    if session.archived_at is not None:
        raise SessionArchived(
            f"session {session.external_id} is archived: nothing was written; unarchive it to write",
            session=str(session.pk),
        )


def new_fork_external_id(source: WorkflowSession, number: int) -> str:
    return f"{source.external_id[:200]}~fork-v{number}-{uuid.uuid4().hex[:8]}"


# -- API keys ----------------------------------------------------------------------------------------

API_KEY_TOUCH_EVERY = 60  # seconds: last_used_at is informative, not worth a write per request


def api_key_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _clean_scopes(scopes: Any) -> list[str]:
    if isinstance(scopes, str):
        scopes = [part.strip() for part in scopes.split(",") if part.strip()]
    if not isinstance(scopes, list) or not scopes or not all(isinstance(scope, str) for scope in scopes):
        raise InvalidState(f"scopes must be a non-empty list of {', '.join(ApiKey.Scope.values)}")
    unknown = [scope for scope in scopes if scope not in ApiKey.Scope.values]
    if unknown:
        raise InvalidState(f"unknown scope {unknown[0]!r}; use {', '.join(ApiKey.Scope.values)}")
    return list(dict.fromkeys(scopes))


class DefaultExpiry(enum.Enum):
    """`expires_at` not given: the key gets API_KEY_DEFAULT_LIFETIME_DAYS (None, for "never", is a choice)."""

    DEFAULT = "default"


DEFAULT_EXPIRY = DefaultExpiry.DEFAULT


def api_key_default_expiry() -> datetime | None:
    """When a key made now expires unless its creator says otherwise (None: never)."""
    days = settings.API_KEY_DEFAULT_LIFETIME_DAYS
    return timezone.now() + timedelta(days=days) if days else None


def api_key_clean_expiry(expires_at: Any) -> datetime | None:
    """`expires_at` as a key may hold it: None (never) or an aware moment still to come."""
    if expires_at is None:
        return None
    if not isinstance(expires_at, datetime):
        raise InvalidState("expires_at must be a date-time (ISO 8601) or null for never")
    if timezone.is_naive(expires_at):
        expires_at = timezone.make_aware(expires_at, UTC)
    if expires_at <= timezone.now():
        raise InvalidState(f"expires_at must be in the future, not {expires_at.isoformat()}", expires_at=expires_at.isoformat())
    return expires_at


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@transaction.atomic
def api_key_create(
    *, project: Project, name: str, scopes: Any, actor: User = None, actor_label: str = "",
    expires_at: datetime | DefaultExpiry | None = DEFAULT_EXPIRY, request: RequestKey | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret token. Only the token's hash is stored: the token is shown once.
    It expires at `expires_at` (None: never; not given: after API_KEY_DEFAULT_LIFETIME_DAYS).

    With a `request` key, a retry of the request that made a key is SecretShownOnce naming that key
    (its token is not kept, so it cannot be answered again), never a second key."""
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise InvalidState("name is required (at most 100 characters)")
    scopes = _clean_scopes(scopes)
    expires = api_key_default_expiry() if expires_at is DEFAULT_EXPIRY else api_key_clean_expiry(expires_at)
    prefix = secrets.token_hex(6)
    token = f"sr_{prefix}_{secrets.token_urlsafe(32)}"
    who = actor_fields(actor, actor_label)
    api_key, created = create_once(request, ApiKey.objects.all(), lambda **keyed: ApiKey.objects.create(
        project=project, name=name.strip(), prefix=prefix, key_hash=api_key_hash(token), scopes=scopes,
        created_by=who["actor"], created_by_label=who["actor_label"], expires_at=expires, **keyed,
    ))
    if not created:
        raise SecretShownOnce(
            f"the first request with this Idempotency-Key already made key {api_key.pk} (prefix {api_key.prefix}); its "
            "secret was shown only in that answer. Revoke it if the answer was lost, and make another.",
            api_key=api_key.pk, prefix=api_key.prefix,
        )
    audit_record(
        project=project, action=AuditAction.API_KEY_CREATE, target_type="api_key", target_id=api_key.pk,
        actor=actor, actor_label=actor_label,
        details={"name": api_key.name, "prefix": prefix, "scopes": scopes, "expires_at": _iso(expires)},
    )
    return api_key, token


def api_key_lock(api_key: ApiKey) -> ApiKey:
    """The key's row, locked until the transaction ends; NotFound if it was deleted (by a script, or
    with its project) after the caller read it: a 404 (the admin's "doesn't exist"), not a 500."""
    locked = ApiKey.objects.select_for_update().filter(pk=api_key.pk).first()
    if locked is None:
        raise NotFound(f"API key {api_key.name} ({api_key.prefix}…) no longer exists; nothing was changed",
                       key=str(api_key.pk))
    return locked


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey, actor: User = None, actor_label: str = "") -> ApiKey:
    api_key = api_key_lock(api_key)
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit_record(
            project=api_key.project, action=AuditAction.API_KEY_REVOKE, target_type="api_key", target_id=api_key.pk,
            actor=actor, actor_label=actor_label, details={"name": api_key.name, "prefix": api_key.prefix},
        )
    return api_key


@transaction.atomic
def api_key_set_expiry(*, api_key: ApiKey, expires_at: Any, actor: User = None, actor_label: str = "") -> ApiKey:
    """Move a key's expiry (None: never), e.g. extend one about to expire, or give an old key one.
    An expired key so extended works again (that is the point: no engine redeploy at 3 a.m.); a
    revoked key stays revoked. Audited with the expiry before and after."""
    expires = api_key_clean_expiry(expires_at)
    api_key = api_key_lock(api_key)
    if api_key.revoked_at is not None:
        raise InvalidState("this API key is revoked; a revoked key stays revoked (make a new one)", api_key=api_key.pk)
    if api_key.expires_at != expires:
        before = api_key.expires_at
        api_key.expires_at = expires
        api_key.save(update_fields=["expires_at"])
        audit_record(
            project=api_key.project, action=AuditAction.API_KEY_EXPIRY, target_type="api_key", target_id=api_key.pk,
            actor=actor, actor_label=actor_label,
            details={"name": api_key.name, "prefix": api_key.prefix, "from": _iso(before), "to": _iso(expires)},
        )
    return api_key


def api_key_touch(*, api_key: ApiKey) -> None:
    """Record that the key was used, at most once a minute. The row as read decides whether to write;
    the UPDATE asks again, so requests of one engine read together at the minute's turn (each saw the
    old time) write once, not once each: the others find the row fresh and write nothing."""
    now = timezone.now()
    if api_key.last_used_at is not None and (now - api_key.last_used_at).total_seconds() < API_KEY_TOUCH_EVERY:
        return
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - timedelta(seconds=API_KEY_TOUCH_EVERY))
    ApiKey.objects.filter(stale, pk=api_key.pk).update(last_used_at=now)
    api_key.last_used_at = now


def membership_remove(*, membership: Membership, actor: User = None, actor_label: str = "") -> None:
    """Take a user out of a project (admin); audited, since it removes access. LastAdmin, nothing
    changed, if they are its last admin."""
    memberships_remove(memberships=[membership], actor=actor, actor_label=actor_label)


@transaction.atomic
def memberships_remove(*, memberships: list[Membership], actor: User = None, actor_label: str = "") -> None:
    """Take these members out of their projects, all or none: LastAdmin, nothing changed, if that
    would leave a project without an admin (even when each alone would not). Each removal audited."""
    _members_lock(membership.project_id for membership in memberships)
    present = Membership.objects.filter(pk__in=[membership.pk for membership in memberships])
    _refuse(memberships_removal_refused(memberships=present))
    # Audited as they are now, under the lock: one another admin removed meanwhile is not recorded as
    # removed twice, and a role changed meanwhile is recorded as it was when removed.
    for membership in present.select_related("project", "user"):
        membership_removal_audit(membership=membership, actor=actor, actor_label=actor_label)
    present.delete()


def user_delete(*, user: Any, actor: User = None, actor_label: str = "") -> None:
    """Delete a user account; each project it leaves records who deleted it. (An account deleted
    otherwise, e.g. by a script, is still audited, by sessions_app.signals, without an actor.)
    LastAdmin, nothing deleted, if it is the last admin of a project."""
    users_delete(users=[user], actor=actor, actor_label=actor_label)


@transaction.atomic
def users_delete(*, users: list[Any], actor: User = None, actor_label: str = "") -> None:
    """Delete these accounts, all or none (as user_delete): LastAdmin, nothing deleted, if that would
    leave a project without an admin."""
    memberships = Membership.objects.filter(user__in=[user.pk for user in users])
    _members_lock(memberships.values_list("project_id", flat=True))
    _refuse(users_deletion_refused(users=users))
    for membership in memberships.select_related("project", "user"):
        membership_removal_audit(membership=membership, actor=actor, actor_label=actor_label,
                                 reason="the user account was deleted")
    memberships.delete()
    for user in users:
        user.delete()


def _members_lock(project_ids: Iterable[int]) -> None:
    """Lock these projects' rows until the transaction ends: every change of a project's members takes
    it first, so two at once (each removing one of its last two admins) cannot both see the other
    admin still there. In id order, so two changes never wait for each other crosswise; FOR NO KEY
    UPDATE, so rows that only point at the project (sessions, keys, audit events) are still inserted."""
    wanted = sorted(set(project_ids))
    list(Project.objects.select_for_update(no_key=True).filter(pk__in=wanted).order_by("pk").values_list("pk"))


def _refuse(refusal: LastAdmin | None) -> None:
    if refusal is not None:
        raise refusal


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _admins_kept_or_refusal(leaving: QuerySet[Membership], describe: Callable[[], str]) -> LastAdmin | None:
    """The LastAdmin error (not raised) if taking these memberships away (or their admin role) would
    leave a project with no admin who can sign in, else None; `describe()` says what was asked. A
    read: forms and confirmation pages ask it before acting; the services above raise it, asked
    again under the projects' lock.

    An admin whose account is deactivated does not count: nobody could sign in as one to manage the
    project's members and keys (a superuser could, but one should not be needed at 3 a.m.)."""
    orphaned = projects_left_without_admin(leaving)
    if not orphaned:
        return None
    slugs = [project.slug for project in orphaned]
    where = f"the project {slugs[0]}" if len(slugs) == 1 else f"the projects {', '.join(slugs)}"
    return LastAdmin(
        f"{describe()} would leave {where} with no admin who can sign in, and nobody could manage "
        f"{'its' if len(slugs) == 1 else 'their'} members and API keys: make another member an admin first. "
        "Nothing was changed.",
        projects=slugs,
    )


def membership_demotion_refused(*, membership: Membership, role: str) -> LastAdmin | None:
    """Why membership_set would refuse to give this member `role` instead of admin, or None."""
    if membership.role != Role.ADMIN or role == Role.ADMIN:
        return None
    return _admins_kept_or_refusal(Membership.objects.filter(pk=membership.pk),
                                   lambda: f"Making {membership.user} {_a(role)} instead of an admin")


def memberships_removal_refused(*, memberships: QuerySet[Membership]) -> LastAdmin | None:
    """Why memberships_remove would refuse to remove these members, or None."""

    def describe() -> str:
        shown = list(memberships.select_related("user")[:2])
        return f"Removing {shown[0].user}" if len(shown) == 1 else "Removing these members"

    return _admins_kept_or_refusal(memberships, describe)


def users_deletion_refused(*, users: Iterable[Any]) -> LastAdmin | None:
    """Why users_delete would refuse to delete these accounts, or None."""
    ids: Any = users.values("pk") if isinstance(users, QuerySet) else [user.pk for user in users]

    def describe() -> str:
        named = list(get_user_model().objects.filter(pk__in=ids)[:2])
        return f"Deleting the account {named[0]}" if len(named) == 1 else "Deleting these accounts"

    return _admins_kept_or_refusal(Membership.objects.filter(user__in=ids), describe)


def user_active_changed(*, user: Any, actor: User = None, actor_label: str = "") -> None:
    """Record, in each project the account is a member of, that it was deactivated (it can no longer
    sign in: as good as removed, but its roles come back with it) or reactivated, and by whom."""
    action = "user.reactivate" if user.is_active else "user.deactivate"
    for membership in Membership.objects.filter(user=user).select_related("project"):
        audit_record(
            project=membership.project, action=action, target_type="user", target_id=user.pk,
            actor=actor, actor_label=actor_label, details={"user": str(user), "role": membership.role},
        )


def membership_removal_audit(
    *, membership: Membership, actor: User = None, actor_label: str = "", reason: str = ""
) -> AuditEvent:
    """The audit event of a membership going away (removed here, or with its user's account)."""
    return audit_record(
        project=membership.project, action="membership.remove", target_type="user", target_id=membership.user_id,
        actor=actor, actor_label=actor_label, reason=reason,
        details={"user": str(membership.user), "role": membership.role},
    )

"""Reads of projects, memberships and sessions."""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import uuid
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import import_module
from types import SimpleNamespace
from typing import Any

import orjson
from django.conf import settings
from django.contrib import auth
from django.core.exceptions import ValidationError
from django.db import connection, models
from django.db.models import Case, Exists, ExpressionWrapper, OuterRef, Q, QuerySet, Value, When
from django.utils import timezone

from sessions_app.errors import SessionNotFound
from sessions_app.models import ROLE_RANK, ApiKey, AuditAction, AuditEvent, Membership, Project, Role, WorkflowSession


def projects_for_user(user: Any) -> QuerySet[Project]:
    if not getattr(user, "is_authenticated", False):
        return Project.objects.none()
    return Project.objects.filter(memberships__user=user).order_by("name")


def membership_role(user: Any, project: Project) -> str | None:
    if not getattr(user, "is_authenticated", False):
        return None
    membership = Membership.objects.filter(project=project, user=user).only("role").first()
    return membership.role if membership else None


def membership_exists(*, user: Any, project_id: int) -> bool:
    """Whether the user is a member of the project (one query, by the project's id)."""
    if not getattr(user, "is_authenticated", False):
        return False
    return Membership.objects.filter(project_id=project_id, user=user).exists()


def projects_left_without_admin(leaving: QuerySet[Membership]) -> list[Project]:
    """The projects (by slug) where the admin memberships among `leaving` (to be removed, demoted, or
    deleted with their accounts) are the last held by an account that can sign in (an active one)."""
    others = Membership.objects.filter(project_id=OuterRef("pk"), role=Role.ADMIN, user__is_active=True).exclude(
        pk__in=leaving.values("pk")
    )
    losing = leaving.filter(role=Role.ADMIN).values("project_id")
    return list(Project.objects.filter(pk__in=losing).exclude(Exists(others)).order_by("slug"))


def session_user(session_key: str | None) -> Any:
    """The user a browser session signs in now, read afresh from the session store as a page load
    reads it: AnonymousUser once it was logged out or expired, its account deactivated or its
    password changed."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return auth.get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]  # (it reads only .session)


def role_allows(role: str | None, needed: str) -> bool:
    return role is not None and ROLE_RANK[Role(role)] >= ROLE_RANK[Role(needed)]


def users_reaching_only(users: QuerySet[Any], *, project_ids: Any) -> QuerySet[Any]:
    """Those of `users` that reach no more than these projects' data: neither superusers nor staff
    (who reach the admin, and through it, with the permissions, other accounts), and members of no
    project outside `project_ids` (an account of no project reaches no data)."""
    elsewhere = Membership.objects.exclude(project_id__in=project_ids).values("user_id")
    return users.filter(is_superuser=False, is_staff=False).exclude(pk__in=elsewhere)


API_KEY_PREFIX_RE = re.compile(r"[0-9a-f]{12}")


def api_key_for_token(token: str) -> ApiKey | None:
    """The key (revoked or not) whose secret is `token`, or None. Constant-time hash comparison."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "sr" or not API_KEY_PREFIX_RE.fullmatch(parts[1]):
        return None
    api_key = ApiKey.objects.select_related("project").filter(prefix=parts[1]).first()
    if api_key is None:
        return None
    digest = hashlib.sha256(token.encode()).hexdigest()
    return api_key if hmac.compare_digest(digest, api_key.key_hash) else None


def roles_for_user(user: Any) -> dict[int, str]:
    """project id -> role for every project the user is a member of."""
    if not getattr(user, "is_authenticated", False):
        return {}
    return dict(Membership.objects.filter(user=user).values_list("project_id", "role"))


def role_for_scopes(scopes: list[str]) -> str | None:
    """API key scopes map to member roles: read -> viewer, write -> operator, admin -> admin."""
    roles = [SCOPE_ROLES[scope] for scope in scopes if scope in SCOPE_ROLES]
    return max(roles, key=lambda role: ROLE_RANK[Role(role)]) if roles else None


SCOPE_ROLES: dict[str, str] = {
    ApiKey.Scope.READ: Role.VIEWER, ApiKey.Scope.WRITE: Role.OPERATOR, ApiKey.Scope.ADMIN: Role.ADMIN,
}


# -- API keys, as their lists show them (never on the authentication path) ----------------------------

API_KEY_EXPIRING_DAYS = 14  # "expiring soon" in the lists: time to extend a key or roll out its successor


class CreatorStatus(models.TextChoices):
    """Whether the account that made a key still stands behind it. Keys are never revoked for this
    (an engine holding one would stop): the lists show it, so an admin decides."""

    ADMIN = "admin", "Still an admin"
    NOT_ADMIN = "not_admin", "No longer an admin of the project"
    DEACTIVATED = "deactivated", "Account deactivated"
    NO_ACCOUNT = "no_account", "No user account (made by a command or an API key, or the account was deleted)"


def api_keys_listed(keys: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
    """`keys` with their project and `creator_status` (a CreatorStatus): one query for any page."""
    admin_member = Membership.objects.filter(
        project_id=OuterRef("project_id"), user_id=OuterRef("created_by_id"), role=Role.ADMIN
    )
    return keys.select_related("project").annotate(creator_status=Case(
        When(created_by__isnull=True, then=Value(CreatorStatus.NO_ACCOUNT)),
        When(created_by__is_active=False, then=Value(CreatorStatus.DEACTIVATED)),
        # A superuser reaches every project's keys in the admin (and made them there as such).
        When(Q(created_by__is_superuser=True) | Exists(admin_member), then=Value(CreatorStatus.ADMIN)),
        default=Value(CreatorStatus.NOT_ADMIN),
        output_field=models.CharField(),
    ))


def api_key_status_q(status: str) -> Q:
    """Keys in this state now: active (incl. expiring), expiring (active, expiring within
    API_KEY_EXPIRING_DAYS), expired (not revoked), revoked."""
    now = timezone.now()
    live = Q(revoked_at__isnull=True)
    if status == "revoked":
        return ~live
    if status == "expired":
        return live & Q(expires_at__lte=now)
    if status == "expiring":
        return live & Q(expires_at__gt=now, expires_at__lte=now + timedelta(days=API_KEY_EXPIRING_DAYS))
    if status == "active":
        return live & (Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    raise ValueError(f"unknown API key status {status!r}")


# The states a key list filters by (value, label): the admin's filter and the API's `status`.
API_KEY_STATUS_CHOICES = [("active", "Active"), ("expiring", f"Expiring within {API_KEY_EXPIRING_DAYS} days"),
                          ("expired", "Expired"), ("revoked", "Revoked")]
API_KEY_STATUSES = [value for value, _ in API_KEY_STATUS_CHOICES]


def api_keys_working_made_by(*, user: Any, project_ids: Any) -> QuerySet[ApiKey]:
    """The keys `user` made in these projects that still sign requests in (neither revoked nor expired)."""
    return ApiKey.objects.filter(api_key_status_q("active"), created_by_id=user.pk, project_id__in=project_ids)


SESSION_SORTS: dict[str, tuple[str, bool]] = {
    # name -> (field, descending). Every sort ends in id, so a keyset cursor is exact.
    "-updated": ("updated_at", True),
    "updated": ("updated_at", False),
    "-created": ("created_at", True),
    "external_id": ("external_id", False),
}
SESSION_PAGE = 50
# The sorts whose open first page takes sessions in on top as they come to belong there (see
# sessions_app.consumers.ProjectEventsConsumer): the latest activity first, and the newest first.
LIVE_TOP_SORTS = ("-updated", "-created")


@dataclass(frozen=True)
class SessionFilters:
    q: str = ""
    status: str = ""
    workflow: str = ""
    tag: str = ""
    has_error: str = ""  # "", "yes", "no"
    updated_from: datetime | None = None
    updated_to: datetime | None = None
    sort: str = "-updated"

    @property
    def active(self) -> bool:
        return bool(self.q or self.status or self.workflow or self.tag or self.has_error
                     or self.updated_from or self.updated_to or self.sort != "-updated")

    @property
    def updated_to_day(self) -> date | None:
        """The last day the range takes in, as the "to" field shows it: `updated_to` is the moment
        it ends, excluded (a day typed there ends at the next midnight). The field showed that next
        day, and every reload moved the range on by one more."""
        return (self.updated_to - timedelta(microseconds=1)).date() if self.updated_to else None

    @property
    def backwards(self) -> bool:
        """A range that ends before it starts (no session can match)."""
        return bool(self.updated_from and self.updated_to and self.updated_from >= self.updated_to)


SESSION_ID_IN_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def session_matches(filters: SessionFilters) -> Q:
    """The condition a session meets to be listed under `filters` (its sort aside)."""
    condition = Q()
    if filters.q:
        text = Q(external_id__icontains=filters.q) | Q(workflow__icontains=filters.q)
        # A session's own id, or a link to one of its pages, pasted from a log, the API or a colleague.
        pasted = SESSION_ID_IN_TEXT.search(filters.q)
        condition &= text | Q(pk=pasted.group(0).lower()) if pasted else text
    if filters.status:
        condition &= Q(status=filters.status)
    if filters.workflow:
        condition &= Q(workflow=filters.workflow)
    if filters.tag:
        if connection.vendor == "postgresql":
            condition &= Q(tags__contains=[filters.tag])
        else:  # SQLite has no JSON containment; match the element's JSON text instead
            condition &= Q(tags__icontains=orjson.dumps(filters.tag).decode())
    if filters.has_error == "yes":
        condition &= ~Q(last_error="")
    elif filters.has_error == "no":
        condition &= Q(last_error="")
    if filters.updated_from:
        condition &= Q(updated_at__gte=filters.updated_from)
    if filters.updated_to:
        condition &= Q(updated_at__lt=filters.updated_to)
    return condition


def session_list(
    *, project: Project, filters: SessionFilters, after: str = "", limit: int = SESSION_PAGE
) -> tuple[list[WorkflowSession], str]:
    """One page of a project's sessions and the cursor of the next page ("" = last page).

    Keyset pagination: the cursor is the last row's (sort value, id), so page 10,000 costs what
    page 1 does; the default sort walks the session_project_updated index.
    """
    queryset = WorkflowSession.objects.filter(project=project).filter(session_matches(filters))
    field, descending = SESSION_SORTS.get(filters.sort, SESSION_SORTS["-updated"])
    position = _decode_cursor(after, field)
    if position is not None:
        value, last_id = position
        beyond, not_behind = ("lt", "lte") if descending else ("gt", "gte")
        # The redundant range condition lets PostgreSQL use the index bound, not just a filter.
        queryset = queryset.filter(
            Q(**{f"{field}__{not_behind}": value}),
            Q(**{f"{field}__{beyond}": value}) | Q(**{field: value, f"id__{beyond}": last_id}),
        )
    order = [f"-{field}", "-id"] if descending else [field, "id"]
    rows = list(queryset.order_by(*order)[: limit + 1])
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, _encode_cursor(getattr(rows[-1], field), rows[-1].pk)


def _encode_cursor(value: Any, pk: Any) -> str:
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return urlsafe_b64encode(orjson.dumps([text, str(pk)])).decode()


def session_cursor_valid(cursor: str, sort: str) -> bool:
    """Whether `cursor` names a place in the session list in order `sort` ("" = the default)."""
    return _decode_cursor(cursor, SESSION_SORTS.get(sort, SESSION_SORTS["-updated"])[0]) is not None


def _decode_cursor(cursor: str, field: str) -> tuple[Any, uuid.UUID] | None:
    if not cursor:
        return None
    try:
        text, pk = orjson.loads(urlsafe_b64decode(cursor.encode()))
        if "\x00" in text:
            raise ValueError("PostgreSQL text cannot hold NUL")
        value: Any = str(text)
        if field.endswith("_at"):
            # In UTC and aware, as the database compares: year 1 at +14:00 lies before year 1 there.
            value = datetime.fromisoformat(text)
            value = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return value, uuid.UUID(pk)
    except (ValueError, TypeError, OverflowError, binascii.Error, orjson.JSONDecodeError):
        return None  # a mangled cursor restarts at the first page rather than failing


def session_for_member(*, user: Any, session_id: Any) -> tuple[WorkflowSession, str]:
    """The session and the user's role in its project; SessionNotFound also when the user is no
    member, so a session id reveals nothing about other projects."""
    try:
        session = WorkflowSession.objects.select_related("project").get(pk=session_id)
    except (WorkflowSession.DoesNotExist, ValueError, ValidationError):
        raise SessionNotFound(f"no session {session_id}") from None
    role = membership_role(user, session.project)
    if role is None:
        raise SessionNotFound(f"no session {session_id}")
    return session, role


def session_exists(*, project_id: int, session_id: Any) -> bool:
    """Whether the project still has this session (one query)."""
    return WorkflowSession.objects.filter(project_id=project_id, pk=session_id).exists()


def session_rows(*, project_id: int, session_ids: Iterable[Any], limit: int | None = None) -> list[WorkflowSession]:
    """The rows of the project's sessions among `session_ids` (in one query), in the session list's
    default order (newest activity first); only the first `limit` of them if given."""
    return list(_session_rows(project_id, session_ids, limit))


def session_rows_matching(
    *, project_id: int, session_ids: Iterable[Any], filters: SessionFilters
) -> tuple[list[WorkflowSession], set[uuid.UUID]]:
    """session_rows, and the ids of those among them the list under `filters` shows (in the same query)."""
    condition = session_matches(filters)
    if not condition:
        rows = session_rows(project_id=project_id, session_ids=session_ids)
        return rows, {row.pk for row in rows}
    queryset = _session_rows(project_id, session_ids).annotate(
        matches=ExpressionWrapper(condition, output_field=models.BooleanField())
    )
    rows = list(queryset)
    return rows, {row.pk for row in rows if row.matches}  # type: ignore[attr-defined]


def _session_rows(project_id: int, session_ids: Iterable[Any], limit: int | None = None) -> QuerySet[WorkflowSession]:
    queryset = WorkflowSession.objects.filter(project_id=project_id, pk__in=list(session_ids)).order_by("-updated_at", "-id")
    return queryset if limit is None else queryset[:limit]


SESSION_AUDIT_PAGE = 50


def about_session(session_id: Any) -> Q:
    """The audit events about a session: its own, and for a fork the fork that made it (recorded on
    its source, naming the fork as its target)."""
    return Q(session_id=session_id) | Q(target_type="session", target_id=str(session_id))


def session_audit(session: WorkflowSession, *, before: int | None = None, limit: int = SESSION_AUDIT_PAGE) -> list[AuditEvent]:
    """The session's audit events, newest first (by id, through the session_id index), a page at a time:
    those with an id below `before`. A fork's include the fork that made it (recorded on its source,
    naming it as its target: see about_session)."""
    events = AuditEvent.objects.filter(about_session(session.pk))
    if before is not None:
        events = events.filter(pk__lt=before)
    return list(events.order_by("-id")[:limit])


def number_runs(numbers: Iterable[int]) -> list[list[int]]:
    """Ascending numbers as runs of consecutive ones, each [first, last]."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return runs


def removed_numbers(details: Any) -> list[int]:
    """The version numbers a session.trim or retention.remove event records, ascending: kept as runs
    (`removed`: [[first, last], ...], with `count`), or, in events written before, as a list (`numbers`:
    a trim of 20,000 versions made a 109 KB event, and every page of the audit list carrying it)."""
    if not isinstance(details, dict):
        return []
    if isinstance(details.get("removed"), list):
        return [number for run in details["removed"] if isinstance(run, list) and len(run) == 2
                and all(type(end) is int for end in run) for number in range(run[0], run[1] + 1)]
    if isinstance(details.get("numbers"), list):
        return sorted(number for number in details["numbers"] if type(number) is int)
    return []


def removal_details(numbers: Iterable[int]) -> dict[str, Any]:
    """What a removal's audit event records of the numbers removed (see removed_numbers)."""
    ordered = sorted(numbers)
    return {"removed": number_runs(ordered), "count": len(ordered)}


def number_ranges(numbers: Iterable[int], shown: int = 12) -> str:
    """Ascending version numbers as runs ("v1\u2013v40, v42"), the first `shown` runs and a count of the rest."""
    runs = number_runs(numbers)
    words = [f"v{first}" if first == last else f"v{first}\u2013v{last}" for first, last in runs[:shown]]
    if len(runs) > shown:
        words.append(f"and {len(runs) - shown:,} more runs")
    return ", ".join(words)


def audit_change(event: AuditEvent) -> str:
    """What an event did to a session's versions, in their numbers ("v5 \u2192 v6, the state of v2", "v120
    labelled \u201cgood\u201d"), from what it recorded; "" where the action says it all. Its target id is a
    version's or a session's internal key."""
    details = event.details if isinstance(event.details, dict) else {}
    action, version = event.action, details.get("version")
    if action == AuditAction.SESSION_REWIND and "new_head" in details:
        return f"v{details.get('previous_head')} \u2192 v{details['new_head']}, the state of v{details.get('to_version')}"
    if action == AuditAction.SESSION_FORK and "new_external_id" in details:
        return f"v{details.get('from_version')} \u2192 {details['new_external_id']}"
    if action == AuditAction.VERSION_DATA_FIX and "new_head" in details:
        return f"v{details['new_head']}: the state of v{details.get('based_on')}, edited"
    if action in (AuditAction.VERSION_PIN, AuditAction.VERSION_UNPIN, AuditAction.INTEGRITY_RESOLVE) and version:
        return f"v{version}"
    if action == AuditAction.VERSION_LABEL and version:
        label = details.get("label")
        return f"v{version} labelled \u201c{label}\u201d" if label else f"v{version}: label removed"
    if action in (AuditAction.SESSION_TRIM, AuditAction.RETENTION_REMOVE) and (numbers := removed_numbers(details)):
        return f"removed {number_ranges(numbers)}"
    if action == AuditAction.SESSION_UPDATE and details:
        return ", ".join(sorted(details)) + " changed"
    return ""

"""Who is calling and what they may touch.

Two ways in: a project API key (`Authorization: Bearer sr_...`, scopes read/write/admin) or the
dashboard's browser session (Membership roles). Both become a `Principal`: project id -> role.
Anything outside those projects does not exist for the caller (404, never 403).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from rest_framework import authentication, exceptions, permissions, throttling
from rest_framework.request import Request

from sessions_app.errors import NotFound, SessionNotFound
from sessions_app.models import ApiKey, Project, Role, WorkflowSession
from sessions_app.selectors import api_key_for_token, role_allows, role_for_scopes, roles_for_user
from sessions_app.services import api_key_touch

SLUG_RE = re.compile(r"[-a-zA-Z0-9_]{1,100}")
NO_PROJECT = "You are a member of no project; an admin of one can add you."


class ApiKeyExpired(exceptions.AuthenticationFailed):
    default_code = "api_key_expired"

    def __init__(self, api_key: ApiKey) -> None:
        assert api_key.expires_at is not None
        expired_at = api_key.expires_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        super().__init__(f"This API key expired at {expired_at}; an admin of its project can extend it or make a new one.")
        self.problem_details = {"expired_at": expired_at}


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != self.keyword.lower():
            return None
        token = token.strip()
        if not token:
            raise exceptions.AuthenticationFailed("Bearer needs an API key after it.")
        api_key = api_key_for_token(token)
        if api_key is None:
            raise exceptions.AuthenticationFailed("Unknown API key.")
        # Only now, the secret proven: what is said below is about the caller's own key, never another's.
        if api_key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API key has been revoked.")
        if api_key.is_expired:
            raise ApiKeyExpired(api_key)
        api_key_touch(api_key=api_key)
        return AnonymousUser(), api_key

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="api"'


@dataclass(frozen=True)
class Principal:
    roles: dict[int, str]
    api_key: ApiKey | None
    user: Any

    @property
    def actor(self) -> dict[str, Any]:
        """Keyword arguments for services that record who acted."""
        if self.api_key is not None:
            return {"actor": None, "actor_label": f"api key {self.api_key.name} ({self.api_key.prefix})"}
        return {"actor": self.user, "actor_label": ""}

    def role(self, project_id: int) -> str | None:
        return self.roles.get(project_id)


def principal(request: Request) -> Principal:
    cached = getattr(request, "_rewind_principal", None)
    if cached is not None:
        return cached
    if isinstance(request.auth, ApiKey):
        role = role_for_scopes(request.auth.scopes)
        found = Principal(roles={request.auth.project_id: role} if role else {}, api_key=request.auth, user=None)
    else:
        found = Principal(roles=roles_for_user(request.user), api_key=None, user=request.user)
    request._rewind_principal = found  # type: ignore[attr-defined]
    return found


def _role_needed(role: str) -> str:
    return f"This needs the {Role(role).label.lower()} role (or an API key with that scope)."


def require_role(request: Request, project_id: int, role: str) -> None:
    """403 when the caller sees the project but its role is too low (callers 404 unseen projects first)."""
    if not role_allows(principal(request).role(project_id), role):
        raise exceptions.PermissionDenied(_role_needed(role))


def visible_project_ids(request: Request) -> list[int]:
    return list(principal(request).roles)


def project_for(request: Request, slug: str | None, *, role: str) -> Project:
    """The project a request acts on: an API key's own, or (browser session) the one named by slug,
    or the user's only project."""
    ids = visible_project_ids(request)
    projects = Project.objects.filter(pk__in=ids)
    if slug:
        project = projects.filter(slug=slug).first() if SLUG_RE.fullmatch(slug) else None
        if project is None:
            raise NotFound(f"no project {slug!r}", project=slug)
    else:
        candidates = list(projects[:2])
        if not candidates:
            raise exceptions.PermissionDenied(NO_PROJECT)
        if len(candidates) != 1:
            raise exceptions.ValidationError({"project": ["Name the project (its slug): you are a member of several."]})
        project = candidates[0]
    require_role(request, project.pk, role)
    return project


def session_for(request: Request, session_id: Any, *, role: str = Role.VIEWER) -> WorkflowSession:
    """The session with this UUID if the caller can see it (else 404) and has `role` in its project (else 403)."""
    try:
        pk = uuid.UUID(str(session_id))
    except ValueError:
        raise SessionNotFound(f"no session {session_id}", session=str(session_id)) from None
    session = (
        WorkflowSession.objects.select_related("project")
        .filter(pk=pk, project_id__in=visible_project_ids(request))
        .first()
    )
    if session is None:
        raise SessionNotFound(f"no session {session_id}", session=str(session_id))
    require_role(request, session.project_id, role)
    return session


class IsAuthenticatedPrincipal(permissions.BasePermission):
    """Any API key or logged-in user; per-project roles are checked where the project is known."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, ApiKey) or bool(getattr(request.user, "is_authenticated", False))


class HoldsLeastRole(permissions.BasePermission):
    """A call needs the view's `least_role(method)` (operator for a write, viewer for a read, unless the
    view names more) in at least one of the caller's projects, checked before the request is read any
    further: a caller who may make this call nowhere (a read-only key writing, an operator managing
    keys) gets 403 whatever it sent, and learns nothing about what the body, the query or the
    Idempotency-Key would have to be. The role in the project the call acts on (named in its body or
    query, or the session's) is checked again where that is known."""

    message = "This needs a higher role (or an API key with that scope)."

    def has_permission(self, request: Request, view: Any) -> bool:
        method = request.method or ""
        if method == "OPTIONS" or not hasattr(view, method.lower()):
            return True  # OPTIONS tells no more than the schema; a method the view lacks is 405
        safe = method in permissions.SAFE_METHODS
        needed = view.least_role(method) if hasattr(view, "least_role") else Role.VIEWER if safe else Role.OPERATOR
        if needed == Role.VIEWER and safe:
            return True  # what a read shows is scoped to the caller's projects (none: an empty list, or a 403 saying so)
        roles = principal(request).roles
        if any(role_allows(role, needed) for role in roles.values()):
            return True
        self.message = _role_needed(needed) if roles else NO_PROJECT
        return False


class PrincipalRateThrottle(throttling.SimpleRateThrottle):
    """Per API key (or per user) request rate; 429 with Retry-After beyond it."""

    scope = "api"

    def get_rate(self) -> str | None:
        # Read at request time, not import time, so the limit follows the settings in force.
        return settings.API_RATE_LIMIT or None

    def allow_request(self, request: Request, view: Any) -> bool:
        self.rate = self.get_rate()
        if self.rate is None:
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)

    def wait(self) -> float | None:
        # DRF names no wait once the history holds more requests than the limit (the limit was
        # lowered, or processes answering at once overshot it), and a 429 without Retry-After sends
        # clients to their own guess. The wait then is until enough of the history has expired.
        if len(self.history) >= self.num_requests + 1:
            return max(0.0, self.duration - (self.now - self.history[self.num_requests - 1]))
        return super().wait()  # type: ignore[no-any-return]

    def get_cache_key(self, request: Request, view: Any) -> str:
        if isinstance(request.auth, ApiKey):
            ident = f"key:{request.auth.pk}"
        elif getattr(request.user, "is_authenticated", False):
            ident = f"user:{request.user.pk}"
        else:
            ident = f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}

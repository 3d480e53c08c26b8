"""Typed errors for every failure the API reports (RFC 9457 problem details with a stable `code`)."""

from __future__ import annotations

import functools
from typing import Any


class SessionRewindError(Exception):
    """Base of every error this client raises.

    `status` is the HTTP status (None when no response arrived), `code` the server's stable,
    machine-readable code (e.g. ``version_conflict``), `detail` the human explanation and
    `problem` the whole problem document, `retry_after` the seconds the server's ``Retry-After`` asked
    for (a 429, or a 503 of a server in maintenance, raised at once when that is beyond the retry
    policy's `max_wait`), else None.
    """

    default_code = "error"

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        # (No status: no answer came, or the client refused the call before sending it.)
        super().__init__(f"{f'{status} ' if status else ''}{code or self.default_code}: {detail}")
        self.detail = detail
        self.status = status
        self.code = code or self.default_code
        self.problem = problem or {}
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a process pool, a task queue) as what it was made of: Exception's own pickling
        rebuilt it from its message, taken for the detail ("- throttled: 429 throttled: slow down")."""
        return (functools.partial(type(self), self.detail, status=self.status, code=self.code, problem=self.problem),
                (), self.__dict__)

    @property
    def details(self) -> dict[str, Any]:
        """Facts the server attached (e.g. ``{"expected": 3, "head": 5}`` for a conflict)."""
        return self.problem.get("details") or {}

    @property
    def errors(self) -> dict[str, Any]:
        """Per-field messages of a validation failure."""
        return self.problem.get("errors") or {}


class TransportError(SessionRewindError):
    """No usable response: connection refused, timeout, TLS failure."""

    default_code = "transport_error"


class ValidationError(SessionRewindError):
    """400/413/422: the request was refused as invalid and nothing was stored."""

    default_code = "invalid_request"


class AuthenticationError(SessionRewindError):
    """401: missing, unknown, revoked or expired API key (`code` api_key_expired for the last)."""

    default_code = "not_authenticated"


class PermissionDenied(SessionRewindError):
    """403: the key or user may see the project but lacks the role/scope for this action."""

    default_code = "permission_denied"


class NotFound(SessionRewindError):
    """404: no such session/version, or not visible to this key."""

    default_code = "not_found"


class ConflictError(SessionRewindError):
    """409: a stale ``expected_version`` (or an existing external id); nothing was written."""

    default_code = "version_conflict"


class PreconditionFailed(ConflictError):
    """412: a stale ``If-Match``; nothing was written."""

    default_code = "precondition_failed"


class RateLimited(SessionRewindError):
    """429 after the retries ran out. `retry_after` is the server's hint in seconds."""

    default_code = "throttled"


class ServerError(SessionRewindError):
    """5xx: the server failed (503 is retried first)."""

    default_code = "server_error"


_BY_STATUS: dict[int, type[SessionRewindError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: ConflictError,
    412: PreconditionFailed,
    413: ValidationError,
    422: ValidationError,
    429: RateLimited,
}


def error_for(status: int, problem: dict[str, Any], *, retry_after: float | None = None) -> SessionRewindError:
    """The typed error for a failed response's status and problem document."""
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else SessionRewindError)
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    return cls(detail, status=status, code=problem.get("code"), problem=problem, retry_after=retry_after)

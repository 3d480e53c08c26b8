"""One error shape for every API failure: RFC 9457 problem details with a stable `code`.

Domain errors (sessions_app.errors) carry their own code and status; DRF's errors and Django's
request-size error are mapped here too, so clients only ever parse one shape.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError as DatabaseInterfaceError
from django.db import OperationalError as DatabaseOperationalError
from django.http import Http404
from psycopg_pool import PoolTimeout
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from sessions_app.errors import StateStoreError

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
DATABASE_RETRY_AFTER = 5  # seconds
TYPE_PREFIX = "urn:session-rewind:problem:"

# DRF's default codes, renamed where theirs are vague; anything unlisted keeps DRF's default_code.
DRF_CODES = {
    exceptions.ValidationError: "invalid_request",
    exceptions.ParseError: "malformed_request",
}


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is larger than the server accepts."
    default_code = "request_too_large"


class PreconditionFailed(exceptions.APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_detail = "If-Match does not match the session's current head; nothing was written."
    default_code = "precondition_failed"


class PreconditionsDisagree(exceptions.APIException):
    """If-Match and expected_version both given, naming different heads: which one the caller meant
    cannot be known, and taking either writes on a head the caller may never have read."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "preconditions_disagree"

    def __init__(self, *, if_match: str, if_match_version: int | None, expected_version: int) -> None:
        shown = if_match if len(if_match) <= 200 else if_match[:200] + "…"
        named = f"version {if_match_version}" if if_match_version is not None else "no version of this session's"
        super().__init__(
            f"If-Match ({shown}) names {named} but expected_version is {expected_version}: send one of them, or both "
            "naming the same head. Nothing was written."
        )
        self.problem_details = {"if_match": shown, "if_match_version": if_match_version,
                                "expected_version": expected_version}


class IfMatchNotTaken(exceptions.APIException):
    """If-Match on a write that checks no head: ignoring it would skip the check the caller asked for."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "if_match_not_taken"

    def __init__(self, method: str) -> None:
        super().__init__(
            f"A {method} here takes no If-Match (only snapshot, batch, rewind and trim writes check the head "
            "with it); nothing was done. Send the request without it."
        )


class RequestInProgress(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "A request with this Idempotency-Key is still in progress; retry it when that one has finished."
    default_code = "request_in_progress"


class LengthRequired(exceptions.APIException):
    status_code = status.HTTP_411_LENGTH_REQUIRED
    default_detail = "Send the body with a Content-Length header; chunked request bodies are not read."
    default_code = "length_required"


class ContentEncodingUnsupported(exceptions.UnsupportedMediaType):
    """A body with a Content-Encoding (gzip, br, ...): 415, as RFC 9110 15.5.16 asks."""

    def __init__(self, detail: str) -> None:
        super().__init__(media_type="", detail=detail)


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem details (application/problem+json)."""

    type = serializers.CharField(help_text="URI naming the problem type: urn:session-rewind:problem:<code>.")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()
    instance = serializers.CharField(help_text="The request path.")
    code = serializers.CharField(help_text="Stable machine-readable code, e.g. version_conflict.")
    errors = serializers.DictField(
        required=False, help_text="Per-field messages, for code invalid_request.", child=serializers.JSONField()
    )
    details = serializers.DictField(
        required=False, help_text="Facts about the failure (e.g. expected and actual head).", child=serializers.JSONField()
    )


def problem_response(
    request: Any, *, status_code: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": code.replace("_", " ").capitalize().replace("Api key", "API key"),
        "status": status_code,
        "detail": detail,
        "instance": request.path if request is not None else "",
        "code": code,
    }
    body.update({key: value for key, value in extra.items() if value})
    return Response(body, status=status_code, headers=headers, content_type=PROBLEM_CONTENT_TYPE)


def _flatten(detail: Any) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{key}: {_flatten(value)}" for key, value in detail.items())
    if isinstance(detail, list):
        return " ".join(_flatten(item) for item in detail)
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    request = context.get("request")
    set_rollback()
    if isinstance(exc, StateStoreError):
        if exc.status >= 500:
            logger.error("%s: %s %s", exc.code, exc.message, exc.details)
        return problem_response(request, status_code=exc.status, code=exc.code, detail=exc.message, details=exc.details)
    if isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if isinstance(exc, (DatabaseOperationalError, DatabaseInterfaceError)):
        # The database is unreachable, restarting or refused the work for now (pool timeout, lost
        # connection, serialization failure): nothing was written, and a retry may well succeed.
        logger.warning("database unavailable in %s: %s", request.path if request is not None else "the API", exc)
        # The pool's wait ends the same way whether the database is away or every connection is busy
        # (a burst of requests): "unavailable" alone sent operators to a database that was fine.
        pooled = isinstance(exc.__cause__, PoolTimeout) or isinstance(exc, PoolTimeout)
        return problem_response(
            request, status_code=503, code="database_unavailable", headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
            detail=("No database connection came free in time (the database is unreachable, or every connection of "
                    "this server is in use: DB_POOL_SIZE); nothing was written. Retry shortly." if pooled
                    else "The database is unavailable at the moment; nothing was written. Retry shortly."),
        )
    if not isinstance(exc, exceptions.APIException):
        logger.exception("unhandled error in %s", request.path if request is not None else "the API", exc_info=exc)
        return problem_response(
            request, status_code=500, code="server_error", detail="An unexpected error occurred; it has been logged."
        )
    headers: dict[str, str] = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header  # type: ignore[attr-defined]
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        headers["Retry-After"] = str(max(1, int(exc.wait + 0.999)))
    code = next((name for cls, name in DRF_CODES.items() if isinstance(exc, cls)), exc.default_code)
    if isinstance(exc, exceptions.ValidationError):
        errors = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return problem_response(
            request, status_code=exc.status_code, code=code, detail=_flatten(errors), headers=headers, errors=errors
        )
    detail = exc.detail
    scheme = (request.META.get("HTTP_AUTHORIZATION", "") if request is not None else "").partition(" ")[0]
    if isinstance(exc, exceptions.NotAuthenticated) and scheme and scheme.lower() != "bearer":
        # Credentials were sent, in a scheme the API does not take: "not provided" sent callers looking elsewhere.
        detail = (f"The API takes an API key (Authorization: Bearer sr_...) or a signed-in dashboard session, not "
                  f"{scheme[:20]} credentials.")
    return problem_response(request, status_code=exc.status_code, code=code, detail=_flatten(detail), headers=headers,
                            details=getattr(exc, "problem_details", None))


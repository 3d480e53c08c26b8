"""The base of every API view: one place for auth, throttling, body limits and the role check."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from django.conf import settings
from django.core.cache import cache
from rest_framework import generics
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response

from sessions_app.api.auth import Principal, principal
from sessions_app.api.filters import LIST_QUERY_PARAMS, ParamFilter, refuse_unknown_query_params
from sessions_app.api.problems import (
    ContentEncodingUnsupported,
    IfMatchNotTaken,
    LengthRequired,
    RequestInProgress,
    RequestTooLarge,
)
from sessions_app.errors import IdempotencyKeyReused
from sessions_app.models import Role
from sessions_app.services import RequestKey

IDEMPOTENCY_KEY_MAX = 200
IDEMPOTENCY_SECONDS = 24 * 3600
REPLAYED_HEADERS = ("Location", "ETag")  # what a replayed answer carries besides its body
IN_PROGRESS_SECONDS = 600  # a call still running after this is taken for dead: a retry may run it again


class ApiView(generics.GenericAPIView):
    # Authentication, permissions, parsers, renderers and throttles come from REST_FRAMEWORK settings.
    # (A comment, not a docstring: the schema would show a docstring as every operation's description.)
    __doc__ = ""
    # The least role a call of this view needs, per method: operator for a write, viewer for a read,
    # unless named here. HoldsLeastRole checks it before anything of the request is read; the role in
    # the project acted on is checked again once the view knows that project.
    least_roles: Mapping[str, str] = {}

    # The query parameters a read (GET, HEAD) of this view takes besides ?format= (a list's filters and
    # page need not be named): any other is a 400 naming it, before the read is done.
    query_params: tuple[str, ...] = ()
    # Those a write takes, per method (a session delete's ?reason=): any other is a 400 naming it too.
    # Ignored, ?expected_version=3 on a snapshot skipped the check the caller asked for.
    write_query_params: Mapping[str, tuple[str, ...]] = {}
    # The writes that check If-Match against the session's head. On any other write the header is a
    # 400: ignored, a stale tag on a trim removed versions the caller had not seen.
    takes_if_match: frozenset[str] = frozenset()

    def least_role(self, method: str) -> str:
        return self.least_roles.get(method, Role.VIEWER if method in SAFE_METHODS else Role.OPERATOR)

    def lists(self) -> bool:
        return ParamFilter in self.filter_backends

    def query_params_taken(self) -> frozenset[str]:
        taken = set(self.query_params)
        if self.lists():
            taken |= {param.name for param in getattr(self, "filter_params", [])} | LIST_QUERY_PARAMS
        return frozenset(taken)

    def body_limit(self) -> int | None:
        """The largest request body this view takes (413 beyond it, before it is read)."""
        return settings.DATA_UPLOAD_MAX_MEMORY_SIZE  # type: ignore[no-any-return]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        method = request.method or ""
        if method in ("GET", "HEAD") and hasattr(self, method.lower()):  # (else 405)
            refuse_unknown_query_params(request, self.query_params_taken(),
                                        what="this list" if self.lists() else "this endpoint")
        elif method != "OPTIONS" and hasattr(self, method.lower()):
            refuse_unknown_query_params(request, self.write_query_params.get(method, ()),
                                        what=f"a {method} here", write=True)
            if "If-Match" in request.headers and method not in self.takes_if_match:
                raise IfMatchNotTaken(method)
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower() and not request.META.get("CONTENT_LENGTH"):
            # DRF reads a body without a Content-Length as empty: a write would be judged on no input.
            raise LengthRequired()
        length = request.META.get("CONTENT_LENGTH") or "0"
        encoding = request.META.get("HTTP_CONTENT_ENCODING", "").strip().lower()
        if encoding not in ("", "identity") and length != "0":
            # Bodies are parsed as sent: a compressed one would be judged on its compressed bytes,
            # and a plain one labelled as compressed taken as if the label were not there.
            raise ContentEncodingUnsupported(f"Content-Encoding {encoding[:40]} is not supported; send the body uncompressed.")
        limit = self.body_limit()
        # isascii(): str.isdigit() alone also accepts "²", which int() refuses (Django reads such a length as 0).
        if limit is not None and length.isascii() and length.isdigit() and int(length) > limit:
            raise RequestTooLarge(f"The request body is {length} bytes; the limit is {limit}.")
        # Checked before anything else so a bad key is always a 400, whatever the write would do.
        self.idempotency_key()

    def refuse_body(self, hint: str = "") -> None:
        """A DELETE reads no body: what one carries is a 400 naming it, as an unknown field is anywhere
        else, not dropped (a delete's `reason` sent there was ignored, beside a ?reason= or not)."""
        data = self.request.data
        if data:
            names = sorted(str(name) for name in data)[:20] if isinstance(data, Mapping) else ["non_field_errors"]
            raise ValidationError({name[:100]: [f"A DELETE takes no body.{hint}"] for name in names})

    @property
    def principal(self) -> Principal:
        return principal(self.request)

    def idempotency_key(self) -> str | None:
        key = self.request.headers.get("Idempotency-Key") or None
        if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
            raise ValidationError({"Idempotency-Key": [f"At most {IDEMPOTENCY_KEY_MAX} characters."]})
        return key

    def request_key(self, fingerprint: Any) -> RequestKey | None:
        """The request's Idempotency-Key (None without one), for a service that keeps it on what it
        writes: the key is scoped to the caller and the path (one caller's key never meets
        another's), and `fingerprint` (the input) is what a retry must repeat."""
        key = self.idempotency_key()
        if key is None:
            return None
        who = f"key:{self.principal.api_key.pk}" if self.principal.api_key else f"user:{self.request.user.pk}"
        scope = hashlib.sha256(f"{who}|{self.request.path}|{key}".encode()).hexdigest()
        digest = hashlib.sha256(
            orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
        ).hexdigest()
        return RequestKey(scope, digest)

    def replayable(
        self, fingerprint: Any, call: Callable[[], Response], *, still_there: Callable[[Any], bool] | None = None
    ) -> Response:
        """Run a write whose service keeps no idempotency key, remembering its answer for retries.

        A retry with the same Idempotency-Key (same caller, same path, same input) gets the first
        answer again; the same key with different input is 422. The answer is kept in the cache
        for a day, so this is best effort across cache loss, unlike the keys services keep (see
        request_key). A retry that arrives while the first call still runs gets 409 request_in_progress.

        `still_there(body)` says whether what the first answer's body describes still exists, for a
        write whose path does not name it (a session create): once it is gone (deleted, by any
        route), the remembered answer is forgotten and the retry runs as a new request, instead of
        answering again with the id of something that no longer exists.
        """
        request = self.request_key(fingerprint)
        if request is None:
            return call()
        cache_key = "api-idem:" + request.key

        def remembered() -> Any:
            first = cache.get(cache_key)
            if first is not None and still_there is not None and not still_there(first["body"]):
                cache.delete(cache_key)
                return None
            return first

        first = remembered()
        if first is None:
            # One attempt at a time: a retry that arrives while the first call still runs (a client
            # that timed out) must not run the write a second time.
            running = cache_key + ":running"
            if not cache.add(running, 1, IN_PROGRESS_SECONDS):
                raise RequestInProgress()
            try:
                first = remembered()  # the first call may have finished just before
                if first is None:
                    response = call()
                    # Errors are raised, not returned: only successful answers are remembered.
                    headers = {name: response[name] for name in REPLAYED_HEADERS if response.has_header(name)}
                    cache.set(cache_key, {"fingerprint": request.digest, "body": response.data,
                                          "status": response.status_code, "headers": headers}, IDEMPOTENCY_SECONDS)
                    return response
            finally:
                cache.delete(running)
        if first["fingerprint"] != request.digest:
            raise IdempotencyKeyReused(f"Idempotency-Key {self.idempotency_key()!r} was used before with a different request")
        return Response(first["body"], status=first["status"], headers=first.get("headers"))

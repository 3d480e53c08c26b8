"""The base of every API view: one place for auth, throttling, body limits and the role check."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import orjson
from django.conf import settings
from django.core.cache import cache
from rest_framework import generics
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from sessions_app.api.auth import Principal, principal
from sessions_app.api.problems import LengthRequired, RequestInProgress, RequestTooLarge, SecretShownOnce
from sessions_app.errors import IdempotencyKeyReused

IDEMPOTENCY_KEY_MAX = 200
IDEMPOTENCY_SECONDS = 24 * 3600
REPLAYED_HEADERS = ("Location", "ETag")  # what a replayed answer carries besides its body
IN_PROGRESS_SECONDS = 600  # a call still running after this is taken for dead: a retry may run it again


class ApiView(generics.GenericAPIView):
    # Authentication, permissions, parsers, renderers and throttles come from REST_FRAMEWORK settings.
    # (A comment, not a docstring: the schema would show a docstring as every operation's description.)
    __doc__ = ""

    def body_limit(self) -> int | None:
        """The largest request body this view takes (413 beyond it, before it is read)."""
        return settings.DATA_UPLOAD_MAX_MEMORY_SIZE  # type: ignore[no-any-return]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower() and not request.META.get("CONTENT_LENGTH"):
            # DRF reads a body without a Content-Length as empty: a write would be judged on no input.
            raise LengthRequired()
        length = request.META.get("CONTENT_LENGTH") or "0"
        limit = self.body_limit()
        # isascii(): str.isdigit() alone also accepts "²", which int() refuses (Django reads such a length as 0).
        if limit is not None and length.isascii() and length.isdigit() and int(length) > limit:
            raise RequestTooLarge(f"The request body is {length} bytes; the limit is {limit}.")
        # Checked before anything else so a bad key is always a 400, whatever the write would do.
        self.idempotency_key()

    @property
    def principal(self) -> Principal:
        return principal(self.request)

    def idempotency_key(self) -> str | None:
        key = self.request.headers.get("Idempotency-Key") or None
        if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
            raise ValidationError({"Idempotency-Key": [f"At most {IDEMPOTENCY_KEY_MAX} characters."]})
        return key

    def scoped_idempotency_key(self, fingerprint: Any) -> tuple[str, str] | None:
        """(scope, digest) of the request's Idempotency-Key, or None without one: `scope` hashes the
        caller, the path and the key (one caller's key never meets another's), `digest` the input."""
        key = self.idempotency_key()
        if key is None:
            return None
        who = f"key:{self.principal.api_key.pk}" if self.principal.api_key else f"user:{self.request.user.pk}"
        scope = hashlib.sha256(f"{who}|{self.request.path}|{key}".encode()).hexdigest()
        digest = hashlib.sha256(
            orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
        ).hexdigest()
        return scope, digest

    def replayable(self, fingerprint: Any, call: Callable[[], Response], *, secret: str | None = None) -> Response:
        """Run a write whose service takes no idempotency key, remembering its answer for retries.

        A retry with the same Idempotency-Key (same caller, same path, same input) gets the first
        answer again; the same key with different input is 422. The answer is kept in the cache
        for a day, so this is best effort across cache loss, unlike the versions' own keys. A retry
        that arrives while the first call still runs gets 409 request_in_progress.

        An answer's `secret` field (a new API key) is never kept: a retry of that call gets 409
        secret_shown_once naming what the first call made, instead of making a second one.
        """
        key = self.idempotency_key()
        scoped = self.scoped_idempotency_key(fingerprint)
        if key is None or scoped is None:
            return call()
        scope, digest = scoped
        cache_key = "api-idem:" + scope
        first = cache.get(cache_key)
        if first is None:
            # One attempt at a time: a retry that arrives while the first call still runs (a client
            # that timed out) must not run the write a second time.
            running = cache_key + ":running"
            if not cache.add(running, 1, IN_PROGRESS_SECONDS):
                raise RequestInProgress()
            try:
                first = cache.get(cache_key)  # the first call may have finished just before
                if first is None:
                    response = call()
                    # Errors are raised, not returned: only successful answers are remembered.
                    body = response.data
                    if secret is not None:
                        body = {name: value for name, value in body.items() if name != secret}
                    headers = {name: response[name] for name in REPLAYED_HEADERS if response.has_header(name)}
                    cache.set(cache_key, {"fingerprint": digest, "body": body, "status": response.status_code,
                                          "headers": headers, "secret": secret}, IDEMPOTENCY_SECONDS)
                    return response
            finally:
                cache.delete(running)
        if first["fingerprint"] != digest:
            raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was used before with a different request")
        if first.get("secret"):
            made = ", ".join(f"{name} {first['body'][name]}" for name in ("id", "prefix") if name in first["body"])
            raise SecretShownOnce(
                f"The first request with Idempotency-Key {key!r} already made this ({made}); its {first['secret']} "
                "was shown only in that answer. Revoke it if the answer was lost, and make another."
            )
        return Response(first["body"], status=first["status"], headers=first.get("headers"))

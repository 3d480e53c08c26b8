"""The base of every API view: one place for auth, throttling, body limits and the role check."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import generics
from rest_framework.request import Request

from sessions_app.api.auth import Principal, principal
from sessions_app.api.problems import RequestTooLarge


class ApiView(generics.GenericAPIView):
    # Authentication, permissions, parsers, renderers and throttles come from REST_FRAMEWORK settings.
    # (A comment, not a docstring: the schema would show a docstring as every operation's description.)
    __doc__ = ""

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        length = request.META.get("CONTENT_LENGTH") or "0"
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and length.isdigit() and int(length) > limit:
            raise RequestTooLarge(f"The request body is {length} bytes; the limit is {limit}.")

    @property
    def principal(self) -> Principal:
        return principal(self.request)

    def idempotency_key(self) -> str | None:
        return self.request.headers.get("Idempotency-Key") or None

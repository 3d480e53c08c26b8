"""OpenAPI generation that matches what the API really answers: every operation documents its
problem responses (application/problem+json), and API keys appear as bearer auth."""

from __future__ import annotations

from typing import Any, Literal

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema

from sessions_app.api.problems import PROBLEM_CONTENT_TYPE, ProblemSerializer

READ_ERRORS = {400: "Bad query parameters", 401: "Missing, unknown or revoked credentials", 403: "Role or scope too low",
               404: "Not found in the caller's projects", 406: "Unsupported Accept", 429: "Rate limit; see Retry-After"}
WRITE_ERRORS = {**READ_ERRORS, 400: "Invalid input; nothing stored", 409: "Conflict (stale expected_version, archived session)",
                412: "Stale If-Match", 413: "Body too large", 415: "Body is not application/json",
                422: "Idempotency-Key reused with a different request"}


class ProblemAutoSchema(AutoSchema):
    def _get_response_bodies(self, direction: Literal["request", "response"] = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        errors = READ_ERRORS if self.method in ("GET", "HEAD") else WRITE_ERRORS
        ref = self.resolve_serializer(ProblemSerializer, "response").ref
        for status, description in errors.items():
            responses.setdefault(
                str(status), {"description": description, "content": {PROBLEM_CONTENT_TYPE: {"schema": ref}}}
            )
        return responses


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "sessions_app.api.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {"type": "http", "scheme": "bearer", "description": "A project API key: `Authorization: Bearer sr_...`."}

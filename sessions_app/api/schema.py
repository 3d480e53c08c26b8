"""OpenAPI generation that matches what the API really answers: every operation documents its
problem responses (application/problem+json), and API keys appear as bearer auth."""

from __future__ import annotations

from typing import Any, Literal

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from rest_framework import serializers

from sessions_app.api.problems import PROBLEM_CONTENT_TYPE, ProblemSerializer
from sessions_app.api.serializers import InputSerializer, RequiredReasonField

READ_ERRORS = {400: "Bad query parameters", 401: "Missing, unknown or revoked credentials", 403: "Role or scope too low",
               404: "Not found in the caller's projects", 405: "method_not_allowed: see the Allow header",
               406: "Unsupported Accept", 429: "Rate limit; see Retry-After",
               500: "integrity_error: a stored version failed its checksum and is not served (names it); or server_error",
               503: "database_unavailable: the database is unreachable for now; nothing was written, retry after Retry-After"}
WRITE_ERRORS = {**READ_ERRORS, 400: "Invalid input; nothing stored", 409: "Conflict (stale expected_version, archived session)",
                411: "A chunked body without Content-Length", 412: "Stale If-Match", 413: "Body too large",
                415: "Body is not application/json", 422: "Idempotency-Key reused with a different request"}
# Answers that say when to come back: a client generated from the schema reads the header it lists.
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


class ProblemAutoSchema(AutoSchema):
    def _get_response_bodies(self, direction: Literal["request", "response"] = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        # (a view's own `problems`: answers only it gives, such as an upload's 507)
        errors = {**(READ_ERRORS if self.method in ("GET", "HEAD") else WRITE_ERRORS), **getattr(self.view, "problems", {})}
        ref = self.resolve_serializer(ProblemSerializer, "response").ref
        for status, description in errors.items():
            response: dict[str, Any] = {"description": description, "content": {PROBLEM_CONTENT_TYPE: {"schema": ref}}}
            if status in (429, 503):
                response["headers"] = RETRY_AFTER
            responses.setdefault(str(status), response)
        return responses

    def _map_basic_serializer(self, serializer: Any, direction: Literal["request", "response"]) -> dict[str, Any]:
        schema: dict[str, Any] = super()._map_basic_serializer(serializer, direction)
        if direction == "request" and isinstance(serializer, InputSerializer):
            # A field the body may not carry is a 400 (InputSerializer): say so, or every client
            # generated from the schema takes extra fields for harmless. Read-only fields are taken
            # and ignored (a GET answer sent back), but request components leave them out, so a
            # serializer that has any cannot close its object.
            if not any(field.read_only for field in serializer.fields.values()):
                schema["additionalProperties"] = False
            if "__doc__" not in vars(type(serializer)) or not type(serializer).__doc__:
                schema.pop("description", None)  # InputSerializer's own docstring is about the code
            for name, field in serializer.fields.items():
                if isinstance(field, RequiredReasonField) and name in schema.get("properties", {}):
                    # Optional to the serializer only so that the service can answer reason_required.
                    schema["properties"][name]["minLength"] = 1
                    schema["required"] = sorted({*schema.get("required", []), name})
                # A nested list of objects (a batch's versions) keeps its bounds, as a ListField does.
                if isinstance(field, serializers.ListSerializer) and name in schema.get("properties", {}):
                    if field.min_length is not None:
                        schema["properties"][name]["minItems"] = field.min_length
                    if field.max_length is not None:
                        schema["properties"][name]["maxItems"] = field.max_length
        return schema


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "sessions_app.api.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {"type": "http", "scheme": "bearer", "description": "A project API key: `Authorization: Bearer sr_...`."}

"""Request and response shapes. Input serializers check types and limits so the schema states them;
the services stay the authority on what may be stored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from sessions_app.errors import InvalidState
from sessions_app.models import ApiKey, AuditEvent, Project, SessionStatus, WorkflowSession
from sessions_app.selectors import CreatorStatus
from sessions_app.services import MAX_TAGS, api_key_clean_expiry, clean_metadata, require_reason

TAG_PATTERN = r"^[\w.:\-/ ]{1,64}$"


def _storable_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """The service's own check, at the edge: a 400 naming the field, before the value is hashed for
    an Idempotency-Key or reaches the database (U+0000 in jsonb, nesting orjson cannot write)."""
    try:
        return clean_metadata(value)
    except InvalidState as exc:
        # The service names the field ("metadata/a holds …"); the answer names it too, once: "metadata:
        # metadata: a key holds …" read twice. Its path inside stays ("/a holds …").
        message = exc.message.removeprefix("metadata").removeprefix(":").lstrip()
        raise serializers.ValidationError(message[:1].upper() + message[1:] if message[:1] != "/" else message) from None


@extend_schema_field({"type": "object", "additionalProperties": True})
class JsonObjectField(serializers.Field):
    """Any JSON object, passed through as parsed (no copy, no re-serialisation)."""

    default_error_messages = {"not_object": "Must be a JSON object."}

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.fail("not_object")
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class StrictCharField(serializers.CharField):
    """A string and only a string: DRF's CharField would quietly turn 42 or true into text."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictRegexField(StrictCharField, serializers.RegexField):
    pass


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class TagListField(serializers.ListField):
    child = StrictRegexField(TAG_PATTERN, max_length=64)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", MAX_TAGS)
        super().__init__(**kwargs)


class InputSerializer(serializers.Serializer):
    """A request body: a field the serializer does not know is a 400 naming it. Ignoring it would let
    a typo ("expected_verison") silently switch off the check the caller asked for. Read-only fields
    are known (a body read, changed and sent back carries them) and ignored, as DRF does."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(str(name) for name in data if name not in self.fields)
            if unknown:
                raise serializers.ValidationError(
                    {name[:100]: [f"Unknown field; this accepts {', '.join(sorted(writable))}."] for name in unknown[:20]}
                )
        value = super().to_internal_value(data)
        for field in self.fields.values():
            if isinstance(field, RequiredReasonField):  # once the rest is valid, before anything is acted on
                require_reason(value.get(field.source, ""), name=field.field_name or "reason")
        return value


def plain_text(**kwargs: Any) -> serializers.CharField:
    return StrictCharField(trim_whitespace=False, **kwargs)


class RequiredReasonField(StrictCharField):
    """The `reason` of an audited action that must say why (rewind, fork, resolve). Missing or blank, it
    is 400 reason_required, the services' answer (not the serializer's invalid_request), so the field
    is optional here; InputSerializer raises it once the body is otherwise valid, before the request is
    judged further (a stale If-Match was 412 for a rewind that had no reason). The schema marks it
    required, non-empty (see ProblemAutoSchema)."""


def required_reason(*, max_length: int, help_text: str) -> serializers.CharField:
    return RequiredReasonField(trim_whitespace=False, max_length=max_length, required=False, allow_blank=True,
                               help_text=help_text)


class ProjectSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField()

    class Meta:
        model = Project
        fields = ["slug", "name", "created_at", "role"]

    def get_role(self, project: Project) -> str | None:
        return self.context["roles"].get(project.pk)


class SessionSerializer(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    head = serializers.IntegerField(source="head_number", read_only=True, help_text="Head version number; 0 = none yet.")
    metadata = JsonObjectField()
    tags = serializers.ListField(child=serializers.CharField())
    has_error = serializers.BooleanField(read_only=True)

    class Meta:
        model = WorkflowSession
        fields = [
            "id", "project", "external_id", "workflow", "status", "metadata", "tags", "head", "version_count",
            "logical_bytes", "stored_bytes", "last_step", "last_error", "has_error", "created_at", "updated_at",
            "archived_at",
        ]
        read_only_fields = fields


class SessionCreateSerializer(InputSerializer):
    external_id = plain_text(max_length=255, help_text="The engine's own session / thread id; creating it twice is safe.")
    workflow = plain_text(max_length=200, required=False, allow_blank=True)
    metadata = JsonObjectField(required=False)
    tags = TagListField(required=False)
    project = serializers.SlugField(
        required=False, help_text="Project slug; only for browser sessions of members of several projects."
    )

    def validate_external_id(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("must not be blank")
        return value

    def validate_metadata(self, value: dict[str, Any]) -> dict[str, Any]:
        return _storable_metadata(value)


class SessionUpdateSerializer(InputSerializer):
    status = serializers.ChoiceField(choices=SessionStatus.choices, required=False)
    workflow = plain_text(max_length=200, required=False, allow_blank=True)
    metadata = JsonObjectField(required=False)
    tags = TagListField(required=False)

    def validate_metadata(self, value: dict[str, Any]) -> dict[str, Any]:
        return _storable_metadata(value)


class ReasonSerializer(InputSerializer):
    reason = plain_text(max_length=2000, required=False, allow_blank=True)


class ApiKeySerializer(serializers.ModelSerializer):
    """A key as selectors.api_keys_listed reads it (creator_status is annotated there)."""

    status = serializers.ChoiceField(choices=ApiKey.Status.choices, read_only=True,
                                     help_text="active, expired (see expires_at) or revoked (see revoked_at).")
    expires_at = serializers.DateTimeField(read_only=True, allow_null=True, help_text="When the key stops working; null: never.")
    created_by = serializers.CharField(source="created_by_label", read_only=True,
                                       help_text="Who made it: a username, an API key or a command.")
    creator_status = serializers.ChoiceField(
        choices=CreatorStatus.choices, read_only=True,
        help_text="Whether the account that made the key still stands behind it: admin (still an admin of the "
                  "project), not_admin, deactivated, or no_account. The key works regardless: review, and revoke it "
                  "if nobody answers for it.",
    )

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "scopes", "status", "created_at", "created_by", "creator_status",
                  "last_used_at", "expires_at", "revoked_at"]
        read_only_fields = fields


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The secret key. Shown only in this response.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class ApiKeyCreateSerializer(InputSerializer):
    name = plain_text(max_length=100)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=ApiKey.Scope.choices), min_length=1, max_length=3
    )
    project = serializers.SlugField(required=False, help_text="Project slug; only needed for members of several projects.")
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True,
        help_text="When the key stops working (in the future); null: never. Left out: after the server's "
                  "API_KEY_DEFAULT_LIFETIME_DAYS (if set; else never).",
    )

    def validate_expires_at(self, value: Any) -> Any:
        return _future_expiry(value)

    def validate_name(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("must not be blank")
        return value


class ApiKeyUpdateSerializer(InputSerializer):
    expires_at = serializers.DateTimeField(allow_null=True, help_text="The new expiry (in the future); null: never.")

    def validate_expires_at(self, value: Any) -> Any:
        return _future_expiry(value)


def _future_expiry(value: Any) -> Any:
    """The service's own check, at the edge: a 400 naming the field (and stored nothing)."""
    try:
        return api_key_clean_expiry(value)
    except InvalidState as exc:
        raise serializers.ValidationError(exc.message) from None


class AuditEventSerializer(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    actor = serializers.CharField(source="actor_label", read_only=True)
    details = JsonObjectField()

    class Meta:
        model = AuditEvent
        fields = ["id", "project", "actor", "action", "target_type", "target_id", "session_id", "reason", "details",
                  "created_at"]
        read_only_fields = fields


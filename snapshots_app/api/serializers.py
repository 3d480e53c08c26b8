"""Version shapes. Hot paths build plain dicts (`version_data`); the serializers below describe the
same shapes for the OpenAPI schema and validate input."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from sessions_app.api.serializers import (
    InputSerializer,
    JsonObjectField,
    StrictBooleanField,
    StrictIntegerField,
    TagListField,
    plain_text,
    required_reason,
)
from sessions_app.models import SessionStatus
from sessions_app.services import REASON_MAX
from snapshots_app.models import Version, VersionKind
from snapshots_app.services import ERROR_MAX, MAX_TRIM_KEEP, METADATA_LIMITS


def version_data(version: Version) -> dict[str, Any]:
    try:
        parent = version.parent if version.parent_id is not None else None
    except Version.DoesNotExist:
        # Retention or a trim removed the parent after the version was read (a 500, 1 read in ~700
        # under back-to-back compactions): it relinked the version to its nearest kept ancestor.
        parent = Version.objects.filter(children=version.pk).first()
    return {
        "session": version.session_id,
        "number": version.number,
        "parent": parent.number if parent is not None else None,
        "parent_session": parent.session_id if parent is not None else None,
        "kind": version.kind,
        "checksum": version.checksum,
        "logical_size": version.logical_size,
        "stored_size": version.stored_size,
        "step": version.step,
        "status": version.status,
        "error": version.error,
        "label": version.label,
        "pinned": version.pinned,
        "engine": version.engine,
        "engine_version": version.engine_version,
        "tags": version.tags,
        "reason": version.reason,
        "created_by": version.created_by_label,
        "created_at": version.created_at,
        "summary": version.summary,
    }


class VersionSerializer(serializers.Serializer):
    """A version's metadata (no state)."""

    session = serializers.UUIDField()
    number = serializers.IntegerField(min_value=1)
    parent = serializers.IntegerField(allow_null=True, help_text="Number of the version this one derives from.")
    parent_session = serializers.UUIDField(allow_null=True, help_text="Session of the parent (another one for a fork).")
    kind = serializers.ChoiceField(choices=VersionKind.choices)
    checksum = serializers.CharField(help_text="SHA-256 (hex) of the state's canonical JSON.")
    logical_size = serializers.IntegerField(help_text="Bytes of the state's canonical JSON.")
    stored_size = serializers.IntegerField(help_text="Compressed bytes this version added to storage.")
    step = serializers.CharField(allow_blank=True)
    status = serializers.ChoiceField(choices=[("", "none"), *SessionStatus.choices], allow_blank=True)
    error = serializers.CharField(allow_blank=True)
    label = serializers.CharField(allow_blank=True)
    pinned = serializers.BooleanField()
    engine = serializers.CharField(allow_blank=True)
    engine_version = serializers.CharField(allow_blank=True)
    tags = serializers.ListField(child=serializers.CharField())
    reason = serializers.CharField(allow_blank=True)
    created_by = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    summary = JsonObjectField(allow_null=True, help_text="Change summary, filled in shortly after the write.")


class VersionListedSerializer(VersionSerializer):
    """A version in the versions list: its metadata, and its state only when asked for (with_state=true)."""

    state = JsonObjectField(required=False, help_text="Only with with_state=true: the state, as stored.")


class VersionWithStateSerializer(VersionSerializer):
    state = JsonObjectField(help_text="The state, byte-for-byte the canonical JSON that was stored.")


class SnapshotSerializer(InputSerializer):
    state = JsonObjectField(help_text="The session's state: a JSON object.")
    step = plain_text(max_length=METADATA_LIMITS["step"], required=False, allow_blank=True, allow_null=True)
    status = serializers.ChoiceField(choices=SessionStatus.choices, required=False, allow_null=True)
    error = plain_text(max_length=ERROR_MAX, required=False, allow_blank=True, allow_null=True)
    label = plain_text(max_length=METADATA_LIMITS["label"], required=False, allow_blank=True, allow_null=True)
    engine = plain_text(max_length=METADATA_LIMITS["engine"], required=False, allow_blank=True, allow_null=True)
    engine_version = plain_text(
        max_length=METADATA_LIMITS["engine_version"], required=False, allow_blank=True, allow_null=True
    )
    tags = TagListField(required=False)


class SnapshotCreateSerializer(SnapshotSerializer):
    expected_version = StrictIntegerField(
        min_value=0, required=False, allow_null=True,
        help_text="The head the caller believes is current (0 = no versions yet); stale -> 409, nothing written.",
    )


class BatchSerializer(InputSerializer):
    versions = SnapshotSerializer(many=True, min_length=1, max_length=500, help_text="Recorded in order, all or nothing.")
    expected_version = StrictIntegerField(min_value=0, required=False, allow_null=True)


class BatchResultSerializer(serializers.Serializer):
    versions = VersionSerializer(many=True)


class VersionUpdateSerializer(InputSerializer):
    pinned = StrictBooleanField(required=False, help_text="Pinned versions survive retention.")
    label = plain_text(max_length=METADATA_LIMITS["label"], required=False, allow_blank=True)


class RewindSerializer(InputSerializer):
    to_version = StrictIntegerField(min_value=1, max_value=2**31 - 1)
    reason = required_reason(max_length=REASON_MAX,
                             help_text="Why (it goes into the audit log; missing or blank is 400 reason_required).")
    expected_version = StrictIntegerField(min_value=0, required=False, allow_null=True)


class ForkSerializer(InputSerializer):
    from_version = StrictIntegerField(min_value=1, max_value=2**31 - 1)
    external_id = plain_text(max_length=255, required=False, allow_null=True,
                             help_text="External id of the new session; generated when omitted.")
    reason = required_reason(max_length=REASON_MAX,
                             help_text="Why (it goes into the audit log; missing or blank is 400 reason_required).")

    def validate_external_id(self, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise serializers.ValidationError("must not be blank")
        return value


class TrimSerializer(InputSerializer):
    keep = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=2**31 - 1), min_length=1, max_length=MAX_TRIM_KEEP,
        help_text="The version numbers to keep; must name the head (else 400 head_not_kept). Every other "
                  "version is removed, except pinned and labelled ones, those another session was forked from "
                  "and those kept rewinds restored.",
    )
    reason = required_reason(max_length=REASON_MAX,
                             help_text="Why (it goes into the audit log; missing or blank is 400 reason_required).")
    expected_version = StrictIntegerField(
        min_value=0, required=False, allow_null=True,
        help_text="The head the caller believes is current; stale -> 409 version_conflict, nothing removed.",
    )


class TrimResultSerializer(serializers.Serializer):
    removed = serializers.ListField(child=StrictIntegerField(), help_text="The numbers removed (none: already trimmed).")
    kept = serializers.ListField(child=StrictIntegerField(), help_text="Every version still there, oldest first.")
    protected = serializers.ListField(
        child=StrictIntegerField(),
        help_text="Kept though not asked for: pinned or labelled, or the source of another session's fork or of "
                  "a kept rewind.",
    )


class VersionRefSerializer(serializers.Serializer):
    session = serializers.UUIDField()
    number = StrictIntegerField()


class ChangeSerializer(serializers.Serializer):
    path = serializers.CharField(allow_blank=True, help_text="JSON Pointer of the change (inside the string, see string_path).")
    op = serializers.ChoiceField(choices=["add", "remove", "replace"])
    kind = serializers.ChoiceField(choices=["added", "removed", "changed"])
    old = serializers.JSONField(required=False, allow_null=True, help_text="Absent for additions.")
    new = serializers.JSONField(required=False, allow_null=True, help_text="Absent for removals.")
    string_path = serializers.CharField(
        required=False, allow_blank=True, help_text="Set when the change is inside a string holding JSON."
    )


class PatchOperationSerializer(serializers.Serializer):
    op = serializers.ChoiceField(choices=["add", "remove", "replace"])
    path = serializers.CharField(allow_blank=True)
    value = serializers.JSONField(required=False, allow_null=True)


class DiffSerializer(serializers.Serializer):
    changes = ChangeSerializer(many=True)
    patch = PatchOperationSerializer(
        many=True, allow_null=True,
        help_text="RFC 6902 JSON Patch turning `from` into `to`; null when `limit`/`offset` left changes out.",
    )
    counts = serializers.DictField(child=StrictIntegerField())
    total = StrictIntegerField(help_text="How many changes the whole diff has.")
    next_offset = StrictIntegerField(allow_null=True, help_text="`offset` of the next page (with `limit`), or null.")
    from_ = VersionRefSerializer()
    to = VersionRefSerializer()

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        fields["from"] = fields.pop("from_")
        return fields

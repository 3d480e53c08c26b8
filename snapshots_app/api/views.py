"""Versions of a session: record (one or a batch), list, read, head, diff, rewind, fork, trim, pin/label.

States are never re-serialised on the way out: the verified canonical bytes from the store are
spliced into the response body next to the metadata.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from sessions_app.api import filters
from sessions_app.api.auth import session_for
from sessions_app.api.base import ApiView
from sessions_app.api.filters import ParamFilter
from sessions_app.api.problems import PreconditionFailed, PreconditionsDisagree
from sessions_app.api.serializers import SessionSerializer
from sessions_app.api.views import IDEMPOTENCY_KEY, SESSION_ID
from sessions_app.errors import SessionNotFound, VersionConflict, VersionNotFound
from sessions_app.models import Role, WorkflowSession
from sessions_app.strict_json import ascii_int
from snapshots_app import selectors, services
from snapshots_app.api.serializers import (
    BatchResultSerializer,
    BatchSerializer,
    DiffSerializer,
    ForkSerializer,
    RewindSerializer,
    SnapshotCreateSerializer,
    TrimResultSerializer,
    TrimSerializer,
    VersionListedSerializer,
    VersionSerializer,
    VersionUpdateSerializer,
    VersionWithStateSerializer,
    version_data,
)
from snapshots_app.models import Version, VersionKind

NUMBER_MAX = 2**31 - 1  # PostgreSQL integer: a larger number cannot name a version
VERSION_NUMBER = OpenApiParameter("number", {"type": "integer", "minimum": 1, "maximum": NUMBER_MAX},
                                  OpenApiParameter.PATH, description="Version number (1, 2, ...).")
IF_MATCH = OpenApiParameter(
    "If-Match", str, OpenApiParameter.HEADER, required=False,
    description="The head's ETag as last read; a stale one gets 412 and nothing is written. With expected_version "
                "too, both must name the same version (else 400 preconditions_disagree).",
)
IF_NONE_MATCH = OpenApiParameter(
    "If-None-Match", str, OpenApiParameter.HEADER, required=False,
    description="ETags already seen (or *): 304 with no body while the head is one of them.",
)
VERSION_IF_NONE_MATCH = OpenApiParameter(
    "If-None-Match", str, OpenApiParameter.HEADER, required=False,
    description="ETags already seen (or *): 304 with no body while the version (its metadata too) is one of them.",
)
VERSION_ETAG = OpenApiParameter(
    "ETag", str, OpenApiParameter.HEADER, response=True,
    description="The version's entity tag: its checksum and a digest of its metadata (a pin or label changes it).",
)
ETAG = OpenApiParameter(
    "ETag", str, OpenApiParameter.HEADER, response=True, description='The head\'s entity tag: "<checksum>-<number>".'
)


STATES_LIMIT_MAX = 50
WITH_STATE = OpenApiParameter(
    "with_state", bool, OpenApiParameter.QUERY, required=False,
    description=f"true: each version with its `state` (`limit` 1-{STATES_LIMIT_MAX}, default 50; a page whose states "
                "add up past 8 MB ends early, `next` goes on from there).",
)


def etag_of(version: Version) -> str:
    return f'"{version.checksum}-{version.number}"'


def _spliced(version: Version, state: bytes) -> bytes:
    """A version's metadata and its state as one JSON object, the state as stored (canonical, verified)."""
    meta = orjson.dumps(version_data(version), option=orjson.OPT_UTC_Z)
    return b"".join((meta[:-1], b',"state":', state, b"}"))


def with_state(version: Version, *, status_code: int = 200, state: bytes | None = None) -> HttpResponse:
    """Metadata and state in one body, the state spliced in as stored (already canonical, verified)."""
    if state is None:
        state = selectors.version_state_bytes(version)
    return HttpResponse(_spliced(version, state), status=status_code, content_type="application/json")


def head_response(version: Version, *, status_code: int = 200, state: bytes | None = None) -> HttpResponse:
    response = with_state(version, status_code=status_code, state=state)
    response["ETag"] = etag_of(version)
    return response


def _version_tag(version: Version) -> str:
    """The entity tag of GET /versions/{n}/: the state's checksum and a digest of the metadata shown."""
    shown = orjson.dumps(version_data(version), option=orjson.OPT_UTC_Z)
    return f'"{version.checksum[:32]}-{hashlib.blake2b(shown, digest_size=8).hexdigest()}"'


def _not_modified(tag: str) -> HttpResponse:
    response = HttpResponse(status=304)
    del response["Content-Type"]  # (no body: Django's default said text/html)
    response["ETag"] = tag
    return response


def _etags(header: str) -> set[str]:
    """The entity tags an If-Match / If-None-Match header lists (weak ones compared as strong)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


def _if_match_number(
    request: Request, session: WorkflowSession, *, idempotency_key: str | None, expected_version: int | None
) -> int | None:
    """The head number an If-Match header pins the write to, or None without the header; 412 if stale.

    400 first if the body's `expected_version` names another version than every tag of the header
    (`*` names any): expected_version used to win silently, writing on a head the header said the
    caller had not read.

    With an Idempotency-Key, a stale tag that names a real version of the session is passed on as
    that number: a retry of a write that did happen carries the tag of the head before it, and the
    service replays it (the key is known) or refuses it as stale, which _guarded makes a 412."""
    header = request.headers.get("If-Match")
    if header is None:
        return None
    tags = _etags(header)
    if expected_version is not None and "*" not in tags:
        numbers = [_number_in(tag.strip('"').rpartition("-")[2]) for tag in tags]
        if expected_version not in numbers:
            raise PreconditionsDisagree(if_match=header, expected_version=expected_version,
                                        if_match_version=next((n for n in numbers if n is not None), None))
    head = selectors.head_version(session)
    if head is not None and "*" in tags:
        # Any head: pinning the one read here refused writes whose head moved meanwhile (412s under
        # concurrent writers), which `*` never asked for.
        return None
    if head is not None and etag_of(head) in tags:
        return head.number
    if idempotency_key is not None:
        for tag in tags:
            number = _number_in(tag.strip('"').rpartition("-")[2])
            if number is not None:
                try:
                    named = selectors.version_get(session=session, number=number)
                except VersionNotFound:
                    if selectors.key_known(session, idempotency_key):
                        # A head trimmed since the write it guarded: passed on as that (stale) number, which
                        # the service replays the key against, or refuses (as removed, reused or stale: 412).
                        return number
                    continue
                if etag_of(named) == tag:
                    return named.number
    if head is None:
        raise PreconditionFailed("If-Match names a head, and this session has no version yet; nothing was written. "
                                 "Write its first version without If-Match.")
    raise PreconditionFailed()


def _number_in(raw: str) -> int | None:
    """The version number `raw` writes (ASCII digits, 1..NUMBER_MAX), else None."""
    number = ascii_int(raw)
    return number if number is not None and 1 <= number <= NUMBER_MAX else None


def _query_int(params: Any, name: str) -> int:
    raw = params.get(name, "")
    number = _number_in(raw)
    if number is None:
        raise ValidationError({name: ["Required: a version number." if raw == "" else
                                      f"Not a version number: use a whole number from 1 to {NUMBER_MAX}."]})
    return number


DIFF_LIMIT_MAX = 10_000


def _bounded_int(params: Any, name: str, low: int, high: int | None) -> int | None:
    """The optional query integer `name` (None if absent), 400 outside low..high."""
    raw = params.get(name)
    if raw in (None, ""):
        return None
    number = ascii_int(raw)
    if number is None or number < low or (high is not None and number > high):
        raise ValidationError({name: [f"Use a whole number from {low}" + (f" to {high}." if high else " up.")]})
    return number


def _path_number(raw: str) -> int:
    """A version number from the URL; anything else names no version (404)."""
    number = _number_in(raw)
    if number is None:
        # `details.version` an integer whenever the address gave one (0, -1, past the numbers kept), as
        # for a number that is just not there; the text otherwise.
        literal = raw.removeprefix("-")
        named: int | str = int(raw) if literal.isascii() and literal.isdigit() and len(literal) <= 30 else raw
        raise VersionNotFound(f"{raw!r} is not a version number", version=named)
    return number


def _guarded(if_match: int | None, call: Any) -> Any:
    """A head that moved between the If-Match check and the write is a failed precondition too."""
    try:
        return call()
    except VersionConflict:
        if if_match is not None:
            raise PreconditionFailed() from None
        raise


class VersionList(mixins.ListModelMixin, ApiView):
    serializer_class = VersionListedSerializer
    takes_if_match = frozenset({"POST"})
    filter_backends = [ParamFilter]
    filter_params = [
        filters.text_param("label", "Only versions with this label.", lambda qs, raw: qs.filter(label=raw)),
        filters.bool_param("labelled", "Only labelled (true) or unlabelled (false) versions.",
                           lambda yes: ~Q(label="") if yes else Q(label="")),
        filters.bool_param("pinned", "Only pinned (true) or unpinned (false) versions.", lambda yes: Q(pinned=yes)),
        filters.bool_param("has_error", "Only versions that reported an error (or none).",
                           lambda yes: ~Q(error="") if yes else Q(error="")),
        filters.choice_param("kind", "Only this kind.", list(VersionKind.values), "kind"),
        filters.choice_param("status", "Only this status.", filters.SESSION_STATUSES, "status"),
        filters.text_param("step", "Only this step.", lambda qs, raw: qs.filter(step=raw)),
        filters.text_param("tag", "Only versions carrying this tag.", lambda qs, raw: qs.filter(filters.tag_q("tags", raw))),
        *filters.range_params("created_at", "created"),
        filters.ordering_param(["-number", "number"]),
    ]
    query_params = ("with_state",)

    def get_queryset(self) -> QuerySet[Version]:
        return selectors.session_versions(self.session)

    def paginate_queryset(self, queryset: QuerySet) -> Any:
        assert self.paginator is not None
        self.paginator.ordering = self.request.query_params.get("ordering") or "-number"  # type: ignore[attr-defined]
        return super().paginate_queryset(queryset)

    @extend_schema(operation_id="versions_list", parameters=[SESSION_ID, WITH_STATE],
                   summary="Version metadata, newest first, without states unless with_state=true (cursor-paginated).")
    def get(self, request: Request, id: str) -> Response | HttpResponse:
        with_states = filters.parse_bool("with_state", request.query_params.get("with_state") or "false")
        if with_states:
            _bounded_int(request.query_params, "limit", 1, STATES_LIMIT_MAX)  # states are large: 400 past 50
        self.session = session_for(request, id)
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        if not with_states:
            return self.get_paginated_response([version_data(version) for version in page])
        return self._page_with_states(list(page or []))

    def _page_with_states(self, page: list[Version]) -> HttpResponse:
        """The page with each version's state spliced in as stored. A page whose states pass the
        selector's byte budget ends early; `next` then continues after its last version."""
        states = selectors.version_states_bytes(self.session, page)
        paginator: Any = self.paginator
        if len(states) < len(page):
            # Numbers are unique, so the cursor after the last version kept is exact.
            paginator.page, paginator.has_next = page[:len(states)], True
        following = paginator.get_next_link()
        body = b"".join((b'{"results":[', b",".join(_spliced(v, state) for v, state in zip(page, states, strict=False)),
                         b'],"next":', orjson.dumps(following), b"}"))
        return HttpResponse(body, content_type="application/json")

    @extend_schema(
        operation_id="versions_create",
        summary="Record a snapshot as the new head.",
        parameters=[SESSION_ID, IDEMPOTENCY_KEY, IF_MATCH, ETAG],
        request=SnapshotCreateSerializer,
        responses={201: OpenApiResponse(VersionSerializer, "Recorded (or replayed for a repeated Idempotency-Key)")},
    )
    def post(self, request: Request, id: str) -> Response:
        session = session_for(request, id, role=Role.OPERATOR)
        incoming = SnapshotCreateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = dict(incoming.validated_data)
        expected = data.pop("expected_version", None)
        if_match = _if_match_number(request, session, idempotency_key=self.idempotency_key(), expected_version=expected)
        version = _guarded(if_match if expected is None else None, lambda: services.snapshot_record(
            session=session, expected_version=expected if expected is not None else if_match,
            idempotency_key=self.idempotency_key(), **data, **self.principal.actor,
        ))
        response = Response(version_data(version), status=status.HTTP_201_CREATED)
        response["ETag"] = etag_of(version)
        response["Location"] = f"/api/v1/sessions/{session.pk}/versions/{version.number}/"
        return response


class VersionBatch(ApiView):
    serializer_class = BatchSerializer
    takes_if_match = frozenset({"POST"})

    @extend_schema(
        operation_id="versions_batch_create",
        summary="Record many snapshots in one request, in order, all or nothing (backfills).",
        parameters=[SESSION_ID, IDEMPOTENCY_KEY, IF_MATCH, ETAG],
        request=BatchSerializer,
        responses={201: BatchResultSerializer},
    )
    def post(self, request: Request, id: str) -> Response:
        session = session_for(request, id, role=Role.OPERATOR)
        incoming = BatchSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        expected = incoming.validated_data.get("expected_version")
        if_match = _if_match_number(request, session, idempotency_key=self.idempotency_key(), expected_version=expected)
        recorded = _guarded(if_match if expected is None else None, lambda: services.snapshot_record_batch(
            session=session, snapshots=incoming.validated_data["versions"],
            expected_version=expected if expected is not None else if_match, idempotency_key=self.idempotency_key(),
            **self.principal.actor,
        ))
        response = Response({"versions": [version_data(v) for v in recorded]}, status=status.HTTP_201_CREATED)
        # The new head's tag and place, as a single snapshot's answer gives them: the next batch's If-Match.
        response["ETag"] = etag_of(recorded[-1])
        response["Location"] = f"/api/v1/sessions/{session.pk}/versions/{recorded[-1].number}/"
        return response


class VersionDetail(ApiView):
    serializer_class = VersionWithStateSerializer

    @extend_schema(operation_id="versions_retrieve", parameters=[SESSION_ID, VERSION_NUMBER, VERSION_IF_NONE_MATCH, VERSION_ETAG],
                   responses={200: VersionWithStateSerializer,
                              304: OpenApiResponse(description="If-None-Match matched: the version is as you have it")},
                   summary="One version: metadata and state. Carries an ETag (If-None-Match: 304).")
    def get(self, request: Request, id: str, number: str) -> HttpResponse:
        session, number_asked = session_for(request, id), _path_number(number)
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None:
            # A version's state never changes, so its row alone says whether a client's copy is current
            # (its metadata may: a pin, a label, a parent relinked by retention change the tag).
            version = selectors.version_get(session=session, number=number_asked)
            tag, seen = _version_tag(version), _etags(if_none_match)
            if tag in seen or "*" in seen:
                return _not_modified(tag)
            response = with_state(version)
        else:
            version, state = selectors.version_with_state_bytes(session=session, number=number_asked)
            response, tag = with_state(version, state=state), _version_tag(version)
        response["ETag"] = tag
        return response

    @extend_schema(operation_id="versions_partial_update", parameters=[SESSION_ID, VERSION_NUMBER, IDEMPOTENCY_KEY],
                   request=VersionUpdateSerializer, responses={200: VersionSerializer},
                   summary="Pin / unpin or label a version (operator). Audited.")
    def patch(self, request: Request, id: str, number: str) -> Response:
        session = session_for(request, id, role=Role.OPERATOR)
        incoming = VersionUpdateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        version = selectors.version_get(session=session, number=_path_number(number))
        data = incoming.validated_data

        def update() -> Response:
            nonlocal version
            with transaction.atomic():
                # (The services leave a version that has the value already as it is, unaudited.)
                if "pinned" in data:
                    version = services.version_pin(version=version, pinned=data["pinned"], **self.principal.actor)
                if "label" in data:
                    version = services.version_label(version=version, label=data["label"], **self.principal.actor)
            return Response(version_data(version))

        return self.replayable(data, update)


class Head(ApiView):
    serializer_class = VersionWithStateSerializer

    @extend_schema(
        operation_id="sessions_head",
        summary="The head version with its state: what an engine resumes from. Carries an ETag.",
        parameters=[SESSION_ID, IF_NONE_MATCH, ETAG],
        responses={200: OpenApiResponse(VersionWithStateSerializer, "The head"),
                   304: OpenApiResponse(description="If-None-Match matched: the head has not moved")},
    )
    def get(self, request: Request, id: str) -> HttpResponse:
        session = session_for(request, id)
        if session.head_number == 0:
            raise VersionNotFound(f"session {session.external_id} has no versions yet", version=0)
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None:
            # Polling: the version row alone says whether the head has moved.
            head = selectors.version_get(session=session, number=session.head_number)
            tags = _etags(if_none_match)
            # "*" matches any current representation (RFC 9110 13.1.2): the head exists, so 304.
            if "*" in tags or etag_of(head) in tags:
                return _not_modified(etag_of(head))
            return head_response(head)
        head, state = selectors.version_with_state_bytes(session=session, number=session.head_number)
        return head_response(head, state=state)


class Diff(ApiView):
    serializer_class = DiffSerializer
    query_params = ("from", "to", "to_session", "structural_strings", "limit", "offset")

    @extend_schema(
        operation_id="sessions_diff",
        summary="What changed between two versions (also of two sessions of one project).",
        parameters=[
            SESSION_ID,
            OpenApiParameter("from", VERSION_NUMBER.type, OpenApiParameter.QUERY, required=True,
                             description="Version number of this session."),
            OpenApiParameter("to", VERSION_NUMBER.type, OpenApiParameter.QUERY, required=True,
                             description="Version number of this session, or of `to_session`."),
            OpenApiParameter("to_session", OpenApiTypes.UUID, OpenApiParameter.QUERY, description="UUID of another session to compare with."),
            OpenApiParameter("structural_strings", bool, OpenApiParameter.QUERY,
                             description="Compare strings holding JSON as structure (default true)."),
            OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": DIFF_LIMIT_MAX}, OpenApiParameter.QUERY,
                             description=f"At most this many changes (1..{DIFF_LIMIT_MAX}; default: all). "
                                         "`patch` is null unless every change is in the answer."),
            OpenApiParameter("offset", {"type": "integer", "minimum": 0}, OpenApiParameter.QUERY,
                             description="Skip this many changes (with `limit`; `next_offset` is the next page's)."),
        ],
    )
    def get(self, request: Request, id: str) -> Response:
        session = session_for(request, id)
        params = request.query_params
        numbers = {name: _query_int(params, name) for name in ("from", "to")}
        other = session
        if "to_session" in params and not params["to_session"].strip():
            # (an empty one compared within this session, as if it had not been sent)
            raise ValidationError({"to_session": ["Empty: give the other session's id, or leave it out to compare "
                                                  "two versions of this session."]})
        if params.get("to_session"):
            try:
                other = session_for(request, params["to_session"])
            except SessionNotFound as exc:
                exc.message = f"no session {params['to_session']} to compare with"
                raise
        structural = filters.parse_bool("structural_strings", params.get("structural_strings", "true"))
        limit = _bounded_int(params, "limit", 1, DIFF_LIMIT_MAX)
        offset = _bounded_int(params, "offset", 0, None) or 0
        a, b, result = selectors.version_pair_diff(
            session=session, number=numbers["from"], other_session=other, other_number=numbers["to"],
            structural_strings=structural,
        )
        total = len(result.changes)
        end = total if limit is None else min(total, offset + limit)
        return Response({
            "from": {"session": a.session_id, "number": a.number},
            "to": {"session": b.session_id, "number": b.number},
            "counts": result.counts,
            "total": total,
            "changes": result.changes[offset:end],
            "next_offset": end if end < total else None,
            # A cut patch is not a patch: only whole.
            "patch": result.patch if offset == 0 and end == total else None,
        })


class Rewind(ApiView):
    serializer_class = RewindSerializer
    takes_if_match = frozenset({"POST"})

    @extend_schema(
        operation_id="sessions_rewind",
        summary="Append a new head equal to an older version (operator). Audited; history is kept.",
        parameters=[SESSION_ID, IDEMPOTENCY_KEY, IF_MATCH, ETAG],
        request=RewindSerializer,
        responses={201: OpenApiResponse(VersionWithStateSerializer, "The new head")},
    )
    def post(self, request: Request, id: str) -> HttpResponse:
        session = session_for(request, id, role=Role.OPERATOR)
        incoming = RewindSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        expected = data.get("expected_version")
        if_match = _if_match_number(request, session, idempotency_key=self.idempotency_key(), expected_version=expected)
        version = _guarded(if_match if expected is None else None, lambda: services.snapshot_rewind(
            session=session, to_version=data["to_version"], reason=data.get("reason", ""),
            expected_version=expected if expected is not None else if_match,
            idempotency_key=self.idempotency_key(), **self.principal.actor,
        ))
        return head_response(version, status_code=status.HTTP_201_CREATED)


class Fork(ApiView):
    serializer_class = ForkSerializer

    @extend_schema(
        operation_id="sessions_fork",
        summary="Start a new session from a version of this one (operator). Audited.",
        parameters=[SESSION_ID, IDEMPOTENCY_KEY],
        request=ForkSerializer,
        responses={201: OpenApiResponse(SessionSerializer, "The new session")},
    )
    def post(self, request: Request, id: str) -> Response:
        session = session_for(request, id, role=Role.OPERATOR)
        incoming = ForkSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        fork = services.snapshot_fork(
            session=session, from_version=data["from_version"], external_id=data.get("external_id"),
            reason=data.get("reason", ""), idempotency_key=self.idempotency_key(), **self.principal.actor,
        )
        return Response(SessionSerializer(fork).data, status=status.HTTP_201_CREATED)


class Trim(ApiView):
    serializer_class = TrimSerializer
    least_roles = {"POST": Role.ADMIN}
    takes_if_match = frozenset({"POST"})

    @extend_schema(
        operation_id="sessions_trim",
        summary="Remove every version except those named (admin): history made shorter in one step. Audited.",
        description="The head must be kept, so the session reads and resumes as before; kept versions keep their "
                    "numbers. Pinned and labelled versions, versions another session was forked from and those a "
                    "kept rewind restored stay (`protected`). A trim of what is already trimmed removes nothing and "
                    "records nothing. The removed states are gone for good; the space they alone used is freed by "
                    "the next compaction.",
        parameters=[SESSION_ID, IDEMPOTENCY_KEY, IF_MATCH],
        request=TrimSerializer,
        responses={200: OpenApiResponse(TrimResultSerializer, "What was removed and what is left")},
    )
    def post(self, request: Request, id: str) -> Response:
        session = session_for(request, id, role=Role.ADMIN)
        incoming = TrimSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        expected = data.get("expected_version")

        def trim() -> Response:
            if_match = _if_match_number(request, session, idempotency_key=None, expected_version=expected)
            result = _guarded(if_match if expected is None else None, lambda: services.session_trim(
                session=session, keep=data["keep"], reason=data["reason"],
                expected_version=expected if expected is not None else if_match, **self.principal.actor,
            ))
            return Response(TrimResultSerializer(result).data)

        # A retry replays the first answer before its (now stale) If-Match is judged.
        return self.replayable({**data, "if_match": request.headers.get("If-Match")}, trim)

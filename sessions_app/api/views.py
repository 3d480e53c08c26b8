"""Projects (read), sessions (create, list, get, update, archive, delete), API keys and the audit log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.models import Q, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, status
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from sessions_app import selectors, services
from sessions_app.api import filters
from sessions_app.api.auth import SLUG_RE, project_for, require_role, session_for, visible_project_ids
from sessions_app.api.base import ApiView
from sessions_app.api.filters import Param, ParamFilter
from sessions_app.api.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
    AuditEventSerializer,
    ProjectSerializer,
    ReasonSerializer,
    SessionCreateSerializer,
    SessionSerializer,
    SessionUpdateSerializer,
)
from sessions_app.errors import NotFound
from sessions_app.models import ApiKey, AuditAction, AuditEvent, Project, Role, WorkflowSession
from sessions_app.strict_json import ascii_int

SESSION_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The session's UUID.")
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key", {"type": "string", "maxLength": 200}, OpenApiParameter.HEADER, required=False,
    description="Retries with the same key get the first answer again (at most 200 characters).",
)


def _in_project(queryset: QuerySet, slug: str, request: Request, view: Any) -> QuerySet:
    """A list's ?project=: 404 for a slug the caller cannot see, unknown or another project's, as every
    other ?project= or body `project` answers (lists answered an empty page, which also told a slug
    that exists from one that does not); 403 where the caller lacks the role the list asks for (the
    keys of a project one only views answered an empty page).

    By the project's id, looked up first: through a join on the slug, PostgreSQL could not tell that one
    project remains, so a list's (project, time) index could not give the order, and each page of a member
    of several projects sorted all their audit events (or jobs, or sessions). The id is given as a value,
    not a subquery, so the planner weighs that project's own share of the rows when it picks an index."""
    if not slug:
        raise exceptions.ValidationError({"project": ["Must not be empty; leave it out for every project you can see."]})
    return queryset.filter(project_id=project_for(request, slug, role=view.least_role(request.method)).pk)


PROJECT_FILTER = Param(
    "project", {"type": "string"}, "Only this project (slug); 404 if you cannot see it.", _in_project, with_request=True,
)


class ProjectList(mixins.ListModelMixin, ApiView):
    serializer_class = ProjectSerializer
    filter_backends = [ParamFilter]  # no filters, but a list: it takes ?cursor= and ?limit=

    def get_queryset(self) -> QuerySet[Project]:
        return Project.objects.filter(pk__in=visible_project_ids(self.request)).order_by("slug")

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "roles": self.principal.roles}

    @extend_schema(operation_id="projects_list", summary="Projects the caller can see (an API key sees its own).")
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(self.get_serializer(page, many=True).data)


class ProjectDetail(ApiView):
    serializer_class = ProjectSerializer

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "roles": self.principal.roles}

    @extend_schema(operation_id="projects_retrieve", parameters=[OpenApiParameter("slug", str, OpenApiParameter.PATH)])
    def get(self, request: Request, slug: str) -> Response:
        # A slug is [-a-zA-Z0-9_]: anything else (a NUL byte the database cannot even compare) names no project.
        project = (
            Project.objects.filter(pk__in=visible_project_ids(request), slug=slug).first() if SLUG_RE.fullmatch(slug) else None
        )
        if project is None:
            raise NotFound(f"no project {slug!r}", project=slug)
        return Response(self.get_serializer(project).data)


class SessionList(mixins.ListModelMixin, ApiView):
    serializer_class = SessionSerializer
    filter_backends = [ParamFilter]
    filter_params = [
        PROJECT_FILTER,
        filters.choice_param("status", "Only sessions in this status.", filters.SESSION_STATUSES, "status"),
        filters.text_param("workflow", "Only this workflow.", lambda qs, raw: qs.filter(workflow=raw)),
        filters.text_param("tag", "Only sessions carrying this tag.", lambda qs, raw: qs.filter(filters.tag_q("tags", raw))),
        filters.text_param("q", "Search in external ids (substring, case-insensitive).",
                           lambda qs, raw: qs.filter(external_id__icontains=raw)),
        filters.text_param("external_id", "Exactly this external id.", lambda qs, raw: qs.filter(external_id=raw)),
        filters.bool_param("has_error", "Only sessions with a last error (or none): set by a snapshot that reports "
                           "one, kept by those that report none until one reports status running or completed, or a "
                           "rewind or data fix from a version without one.",
                           lambda yes: ~Q(last_error="") if yes else Q(last_error="")),
        filters.bool_param("archived", "Archived sessions only (true) or live ones only (false); default both.",
                           lambda yes: Q(archived_at__isnull=not yes)),
        *filters.range_params("created_at", "created"),
        *filters.range_params("updated_at", "updated"),
        filters.ordering_param(["-updated_at", "updated_at", "-created_at", "created_at"]),
    ]

    def get_queryset(self) -> QuerySet[WorkflowSession]:
        return WorkflowSession.objects.filter(project_id__in=visible_project_ids(self.request)).select_related("project")

    def paginate_queryset(self, queryset: QuerySet) -> Any:
        assert self.paginator is not None
        self.paginator.ordering = self.request.query_params.get("ordering") or "-updated_at"  # type: ignore[attr-defined]
        return super().paginate_queryset(queryset)

    @extend_schema(operation_id="sessions_list", summary="Sessions, newest activity first (cursor-paginated).")
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(
        operation_id="sessions_create",
        summary="Create a session, or get the existing one with this external_id.",
        request=SessionCreateSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={201: OpenApiResponse(SessionSerializer, "Created"), 200: OpenApiResponse(SessionSerializer, "Existed")},
    )
    def post(self, request: Request) -> Response:
        incoming = SessionCreateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = dict(incoming.validated_data)
        project = project_for(request, data.pop("project", None), role=Role.OPERATOR)

        def create() -> Response:
            session, created = services.session_get_or_create(project=project, actor=self.principal.actor["actor"], **data)
            return Response(
                SessionSerializer(session).data,
                status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
                headers={"Location": f"/api/v1/sessions/{session.pk}/"},
            )

        # A retry after the session was deleted creates it again, as a create without a key would.
        return self.replayable({"project": project.pk, **data}, create, still_there=lambda body: selectors.session_exists(
            project_id=project.pk, session_id=body["id"]))


class SessionDetail(ApiView):
    serializer_class = SessionSerializer
    least_roles = {"DELETE": Role.ADMIN}
    write_query_params = {"DELETE": ("reason",)}

    @extend_schema(operation_id="sessions_retrieve", parameters=[SESSION_ID])
    def get(self, request: Request, id: str) -> Response:
        return Response(SessionSerializer(session_for(request, id)).data)

    @extend_schema(operation_id="sessions_partial_update", parameters=[SESSION_ID, IDEMPOTENCY_KEY],
                   request=SessionUpdateSerializer, summary="Change status, workflow, metadata or tags.")
    def patch(self, request: Request, id: str) -> Response:
        session = session_for(request, id, role=Role.OPERATOR)
        incoming = SessionUpdateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        return self.replayable(incoming.validated_data, lambda: Response(SessionSerializer(
            services.session_update(session=session, **self.principal.actor, **incoming.validated_data)
        ).data))

    @extend_schema(
        operation_id="sessions_destroy",
        summary="Delete the session and all its versions (admin). Recorded in the audit log.",
        parameters=[SESSION_ID, OpenApiParameter("reason", {"type": "string", "minLength": 1, "maxLength": 2000},
                                                 OpenApiParameter.QUERY, required=True,
                                                 description="Why (required: it goes into the audit log).")],
        request=None,
        responses={204: OpenApiResponse(description="Deleted")},
    )
    def delete(self, request: Request, id: str) -> Response:
        session = session_for(request, id, role=Role.ADMIN)
        self.refuse_body(" Send the reason as ?reason=.")
        incoming = ReasonSerializer(data={"reason": request.query_params.get("reason", "")})
        incoming.is_valid(raise_exception=True)
        services.session_delete(session=session, reason=incoming.validated_data["reason"], **self.principal.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class _ArchiveSwitch(ApiView):
    """Archive or unarchive a session (operator; audited), with an optional reason."""

    serializer_class = SessionSerializer
    service: Callable[..., WorkflowSession]

    def switch(self, request: Request, id: str) -> Response:
        session = session_for(request, id, role=Role.OPERATOR)
        incoming = ReasonSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        return self.replayable(incoming.validated_data, lambda: Response(SessionSerializer(type(self).service(
            session=session, reason=incoming.validated_data.get("reason", ""), **self.principal.actor
        )).data))


class SessionArchive(_ArchiveSwitch):
    service = staticmethod(services.session_archive)

    @extend_schema(operation_id="sessions_archive", parameters=[SESSION_ID, IDEMPOTENCY_KEY], request=ReasonSerializer,
                   responses={200: SessionSerializer}, summary="Archive: keep the history, refuse new writes.")
    def post(self, request: Request, id: str) -> Response:
        return self.switch(request, id)


class SessionUnarchive(_ArchiveSwitch):
    service = staticmethod(services.session_unarchive)

    @extend_schema(operation_id="sessions_unarchive", parameters=[SESSION_ID, IDEMPOTENCY_KEY], request=ReasonSerializer,
                   responses={200: SessionSerializer}, summary="Unarchive: accept writes again. Audited.")
    def post(self, request: Request, id: str) -> Response:
        return self.switch(request, id)


class ApiKeyList(mixins.ListModelMixin, ApiView):
    serializer_class = ApiKeySerializer
    least_roles = {"GET": Role.ADMIN, "POST": Role.ADMIN}
    filter_backends = [ParamFilter]
    filter_params = [
        PROJECT_FILTER,
        Param("status", {"type": "string", "enum": selectors.API_KEY_STATUSES},
              f"Only keys in this state: active (works now), expiring (active, expiring within "
              f"{selectors.API_KEY_EXPIRING_DAYS} days), expired, revoked.",
              lambda qs, raw: qs.filter(selectors.api_key_status_q(filters.parse_choice("status", raw, selectors.API_KEY_STATUSES)))),
        filters.choice_param("creator_status", "Only keys whose creator's account is in this standing (e.g. "
                             "deactivated, not_admin: keys nobody still answers for).",
                             list(selectors.CreatorStatus.values), "creator_status"),
    ]

    def get_queryset(self) -> QuerySet[ApiKey]:
        admin_of = [pk for pk, role in self.principal.roles.items() if role == Role.ADMIN]
        return selectors.api_keys_listed(ApiKey.objects.filter(project_id__in=admin_of))

    @extend_schema(operation_id="keys_list", summary="API keys of the projects the caller administers.")
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(operation_id="keys_create", request=ApiKeyCreateSerializer, parameters=[IDEMPOTENCY_KEY],
                   responses={201: ApiKeyCreatedSerializer},
                   summary="Create a key (admin). The secret is in this response only: a retry with the same "
                           "Idempotency-Key gets 409 secret_shown_once instead of a second key.")
    def post(self, request: Request) -> Response:
        incoming = ApiKeyCreateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        project = project_for(request, data.get("project"), role=Role.ADMIN)
        request_key = self.request_key({**data, "project": project.pk})
        api_key, token = services.api_key_create(
            project=project, name=data["name"], scopes=data["scopes"], request=request_key,
            expires_at=data.get("expires_at", services.DEFAULT_EXPIRY), **self.principal.actor,
        )
        body = ApiKeyCreatedSerializer(_listed(api_key.pk)).data
        body["key"] = token
        return Response(body, status=status.HTTP_201_CREATED)


def _listed(pk: int) -> ApiKey:
    return selectors.api_keys_listed(ApiKey.objects.filter(pk=pk)).get()


class ApiKeyDetail(ApiView):
    serializer_class = ApiKeySerializer
    least_roles = {"GET": Role.ADMIN, "PATCH": Role.ADMIN, "DELETE": Role.ADMIN}

    def _key(self, request: Request, key_id: Any) -> ApiKey:
        api_key = None
        pk = ascii_int(str(key_id))
        if pk is not None:
            api_key = selectors.api_keys_listed(
                ApiKey.objects.filter(pk=pk, project_id__in=visible_project_ids(request))
            ).first()
        if api_key is None:
            raise NotFound(f"no API key {key_id}", key=str(key_id))
        require_role(request, api_key.project_id, Role.ADMIN)
        return api_key

    @extend_schema(operation_id="keys_retrieve", parameters=[OpenApiParameter("key_id", int, OpenApiParameter.PATH)])
    def get(self, request: Request, key_id: str) -> Response:
        return Response(ApiKeySerializer(self._key(request, key_id)).data)

    @extend_schema(operation_id="keys_update",
                   parameters=[OpenApiParameter("key_id", int, OpenApiParameter.PATH), IDEMPOTENCY_KEY],
                   request=ApiKeyUpdateSerializer, responses={200: ApiKeySerializer},
                   summary="Change the key's expiry (admin): extend it, give it one, or null for never. An expired key "
                           "extended works again; a revoked one cannot be. Audited.")
    def patch(self, request: Request, key_id: str) -> Response:
        api_key = self._key(request, key_id)
        incoming = ApiKeyUpdateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)

        def update() -> Response:
            services.api_key_set_expiry(api_key=api_key, expires_at=incoming.validated_data["expires_at"],
                                        **self.principal.actor)
            return Response(ApiKeySerializer(_listed(api_key.pk)).data)

        return self.replayable(incoming.validated_data, update)

    @extend_schema(operation_id="keys_revoke", parameters=[OpenApiParameter("key_id", int, OpenApiParameter.PATH)],
                   request=None, responses={200: ApiKeySerializer}, summary="Revoke the key (admin); it stops working at once.")
    def delete(self, request: Request, key_id: str) -> Response:
        api_key = self._key(request, key_id)
        self.refuse_body()
        api_key = services.api_key_revoke(api_key=api_key, **self.principal.actor)
        return Response(ApiKeySerializer(_listed(api_key.pk)).data)


class AuditEventList(mixins.ListModelMixin, ApiView):
    serializer_class = AuditEventSerializer
    filter_backends = [ParamFilter]
    filter_params = [
        PROJECT_FILTER,
        # A choice, as every other list's kind and status: a misspelt action answered an empty list.
        filters.choice_param("action", "Only this action, e.g. session.rewind.", list(AuditAction.values), "action"),
        Param("session", {"type": "string", "format": "uuid"},
              "Only events about this session (UUID); a fork's include the fork that made it.",
              lambda qs, raw: qs.filter(selectors.about_session(filters.parse_uuid("session", raw)))),
        *filters.range_params("created_at", "created"),
    ]

    def get_queryset(self) -> QuerySet[AuditEvent]:
        return AuditEvent.objects.filter(project_id__in=visible_project_ids(self.request)).select_related("project")

    @extend_schema(operation_id="audit_events_list", summary="Who rewound, forked, fixed, deleted what, and why.")
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(self.get_serializer(page, many=True).data)


@extend_schema(exclude=True)
@api_view(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
@authentication_classes([])
@permission_classes([AllowAny])
def unknown_route(request: Any, *args: Any, **kwargs: Any) -> Response:
    """Any other path under /api/v1/: a 404 in the API's own error shape, not Django's HTML page."""
    raise exceptions.NotFound(f"No API route {request.path}; see /api/v1/schema/.")

"""Operations: retention policy, compaction (dry run / run), export and import jobs with their
progress, integrity problems and scrubs. The work is done by Celery jobs; these edges queue and read."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from django.conf import settings
from django.db.models import Model, Q, QuerySet
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import mixins, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response

from config.files import file_download
from sessions_app.api import filters
from sessions_app.api.auth import project_for, require_role, session_for, visible_project_ids
from sessions_app.api.base import ApiView
from sessions_app.api.filters import ParamFilter
from sessions_app.api.http import OrjsonRenderer
from sessions_app.api.problems import RequestTooLarge
from sessions_app.api.serializers import (
    InputSerializer,
    JsonObjectField,
    StrictBooleanField,
    StrictIntegerField,
    required_reason,
)
from sessions_app.api.views import IDEMPOTENCY_KEY, PROJECT_FILTER
from sessions_app.errors import JobNotFound, NotFound
from sessions_app.models import Project, Role
from sessions_app.services import REASON_MAX
from sessions_app.strict_json import ascii_int
from snapshots_app import compaction, integrity, jobs, transfer
from snapshots_app.models import IntegrityProblem, Job, JobKind, JobStatus, RetentionPolicy, Thinning

PROJECT_QUERY = OpenApiParameter(
    "project", str, OpenApiParameter.QUERY, description="Project slug; only for members of several projects."
)
SKIP_EXISTING_QUERY = OpenApiParameter(
    "skip_existing", bool, OpenApiParameter.QUERY,
    description="Leave out the file's sessions whose external id the project has already (the job's result lists "
                "them under `skipped`), instead of refusing the import: how a project's export brings back the "
                "sessions deleted since into the project it came from.",
)
PROJECT_BODY_HELP = "Project slug; only for browser sessions of members of several projects."


def _project(request: Request, role: str, *, body: dict[str, Any] | None = None) -> Project:
    slug = (body or {}).get("project") if body is not None else request.query_params.get("project")
    return project_for(request, slug, role=role)


class RetentionPolicySerializer(serializers.Serializer):
    project = serializers.CharField(read_only=True, source="project.slug")
    enabled = StrictBooleanField()
    keep_last = StrictIntegerField(min_value=0, max_value=compaction.RETENTION_KEEP_MAX, help_text="Always keep each session's newest N.")
    keep_days = StrictIntegerField(min_value=0, max_value=compaction.RETENTION_KEEP_MAX, help_text="Always keep versions younger than this.")
    thin_to = serializers.ChoiceField(choices=Thinning.choices, help_text="Beyond keep_days, one version per hour/day.")
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)


class RetentionPolicyInputSerializer(InputSerializer, RetentionPolicySerializer):
    project = serializers.SlugField(required=False, help_text=PROJECT_BODY_HELP)


class JobSerializer(serializers.ModelSerializer):
    project = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    created_by = serializers.CharField(source="created_by_label", read_only=True)
    percent = serializers.IntegerField(read_only=True)
    params = JsonObjectField(source="public_params")
    result = serializers.SerializerMethodField(
        help_text="What the job found or made; a finished export names its `file` and the `download` URL. A job "
                  "failed by a domain error has {\"code\": ...}, its machine-readable code (such as import_rejected), "
                  "and the message as `error`."
    )
    stalled = serializers.SerializerMethodField(
        help_text="Running, but its worker has been silent for JOB_STALE_SECONDS (killed, or cut off from the "
                  "database): taken for dead and sent again, it resumes from what was committed."
    )
    condition = serializers.SerializerMethodField(
        help_text="Where an unfinished job stands, in words (null once finished): waiting for a worker, running "
                  "(when its worker last reported), or stalled and what happens next."
    )

    class Meta:
        model = Job
        fields = ["id", "project", "session", "kind", "status", "done", "total", "percent", "params", "result",
                  "error", "attempts", "condition", "stalled", "heartbeat_at", "resent_at", "send_failed_at", "created_by",
                  "created_at", "started_at", "finished_at"]
        read_only_fields = fields

    def get_stalled(self, job: Job) -> bool:
        return jobs.job_is_stalled(job)

    @extend_schema_field({"type": "string", "nullable": True})
    def get_condition(self, job: Job) -> str | None:
        return jobs.job_condition(job)

    @extend_schema_field({"type": "object", "additionalProperties": True, "nullable": True})
    def get_result(self, job: Job) -> dict[str, Any] | None:
        result = job.public_result
        if not isinstance(result, dict):
            return result
        # Callers get the file's name and its URL.
        if job.kind == JobKind.EXPORT and "file" in result:
            result["download"] = f"/api/v1/jobs/{job.pk}/file/"
        return result


class CompactionSerializer(InputSerializer):
    dry_run = StrictBooleanField(default=True, help_text="Only predict (default); false queues the compaction job.")
    apply_retention = StrictBooleanField(default=True, help_text="Thin versions per the retention policy first.")
    project = serializers.SlugField(required=False, help_text=PROJECT_BODY_HELP)


class CompactionPreviewSerializer(serializers.Serializer):
    versions_total = serializers.IntegerField()
    versions_removed = serializers.IntegerField()
    removed_numbers = serializers.DictField(
        child=serializers.ListField(child=serializers.IntegerField()), help_text="session id -> version numbers"
    )
    nodes_total = serializers.IntegerField()
    nodes_freed = serializers.IntegerField()
    bytes_total = serializers.IntegerField()
    bytes_freed = serializers.IntegerField()
    policy_enabled = serializers.BooleanField()


class _UUIDText(serializers.UUIDField):
    """A UUID written as text. DRF's also takes a JSON number as the UUID of that integer: a session
    sent as 123 was looked for as 00000000-…-00000000007b and answered 404, not 400."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class ExportSerializer(InputSerializer):
    session = _UUIDText(required=False, allow_null=True, help_text="One session; omit for the project.")
    project = serializers.SlugField(required=False, help_text=PROJECT_BODY_HELP)
    skip_damaged = serializers.BooleanField(
        default=False, help_text="A project's export: leave out the sessions with an open integrity problem (the job's "
        "result names them under `skipped`) instead of failing on the first.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("session") and attrs["skip_damaged"]:
            raise serializers.ValidationError({"skip_damaged": ["Only for a project's export: omit `session`, or this."]})
        return attrs


class IntegrityProblemSerializer(serializers.ModelSerializer):
    class Meta:
        model = IntegrityProblem
        fields = ["id", "session", "version_number", "detail", "first_seen_at", "last_seen_at", "resolved_at",
                  "resolution"]
        read_only_fields = fields


@dataclass
class Upload:
    """An uploaded export file, spooled to disk past a few MB, with its size and SHA-256."""

    file: IO[bytes]
    size: int
    sha256: str


class NdjsonParser(BaseParser):
    """An export file as uploaded, read in chunks (up to IMPORT_MAX_BYTES) for the import job to verify."""

    media_type = "application/x-ndjson"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Upload:
        limit = settings.IMPORT_MAX_BYTES
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # closed by the view (ImportCreate)
        digest, size = hashlib.sha256(), 0
        while stream is not None and (chunk := stream.read(1024 * 1024)):
            size += len(chunk)
            if size > limit:
                spool.close()
                raise RequestTooLarge(f"The export file is over {limit} bytes (IMPORT_MAX_BYTES).")
            digest.update(chunk)
            spool.write(chunk)
        spool.seek(0)
        return Upload(spool, size, digest.hexdigest())


class NdjsonRenderer(OrjsonRenderer):
    """Lets a download ask for what it gets (Accept: application/x-ndjson: it was 406). The file is
    streamed as stored, not rendered; a problem is rendered as JSON, as everywhere."""

    media_type = "application/x-ndjson"
    format = "ndjson"


class RetentionPolicyView(ApiView):
    serializer_class = RetentionPolicySerializer
    least_roles = {"PUT": Role.ADMIN}
    query_params = ("project",)

    @extend_schema(operation_id="retention_policy_retrieve", parameters=[PROJECT_QUERY],
                   summary="The project's retention policy (disabled = keep everything).")
    def get(self, request: Request) -> Response:
        policy = compaction.retention_policy_get(project=_project(request, Role.VIEWER))
        return Response(RetentionPolicySerializer(policy).data)

    @extend_schema(operation_id="retention_policy_update", request=RetentionPolicyInputSerializer,
                   parameters=[IDEMPOTENCY_KEY], responses={200: RetentionPolicySerializer},
                   summary="Set the retention policy (admin). Audited when it changes something.")
    def put(self, request: Request) -> Response:
        incoming = RetentionPolicyInputSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = dict(incoming.validated_data)
        project = project_for(request, data.pop("project", None), role=Role.ADMIN)

        def put() -> Response:
            policy: RetentionPolicy = compaction.retention_policy_set(project=project, **data, **self.principal.actor)
            return Response(RetentionPolicySerializer(policy).data)

        return self.replayable({"project": project.pk, **data}, put)


def queued(job: Job) -> Response:
    """The answer of a job start (also a retry's: the job the first request started, as it is now)."""
    return Response(JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class Compaction(ApiView):
    serializer_class = CompactionSerializer

    @extend_schema(
        operation_id="compaction_create",
        parameters=[IDEMPOTENCY_KEY],
        summary="Predict (dry_run, operator) or queue (admin) a compaction: retention, then garbage collection.",
        request=CompactionSerializer,
        responses={200: OpenApiResponse(CompactionPreviewSerializer, "Dry run: what would be removed and freed"),
                   202: OpenApiResponse(JobSerializer, "Queued; follow the job")},
    )
    def post(self, request: Request) -> Response:
        incoming = CompactionSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        if data["dry_run"]:
            project = project_for(request, data.get("project"), role=Role.OPERATOR)
            preview = compaction.compaction_dry_run(project=project, apply_retention=data["apply_retention"])
            return Response(preview.as_dict())
        project = project_for(request, data.get("project"), role=Role.ADMIN)
        request_key = self.request_key({**data, "project": project.pk})
        return queued(compaction.compaction_start(
            project=project, apply_retention=data["apply_retention"], request=request_key, **self.principal.actor
        ))


class ExportCreate(ApiView):
    serializer_class = ExportSerializer

    @extend_schema(operation_id="exports_create", request=ExportSerializer, parameters=[IDEMPOTENCY_KEY], responses={202: JobSerializer},
                   summary="Queue an export (NDJSON with checksums) of one session or the whole project (operator).")
    def post(self, request: Request) -> Response:
        incoming = ExportSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        if data.get("session"):
            session = session_for(request, data["session"], role=Role.OPERATOR)
            project = session.project
        else:
            session = None
            project = project_for(request, data.get("project"), role=Role.OPERATOR)
        request_key = self.request_key({**data, "project": project.pk})
        return queued(transfer.transfer_export_start(
            project=project, session=session, skip_damaged=data["skip_damaged"], request=request_key,
            **self.principal.actor,
        ))


class ImportCreate(ApiView):
    serializer_class = JobSerializer
    write_query_params = {"POST": ("project", "skip_existing")}  # (the body is the file)
    parser_classes = [NdjsonParser]
    problems = {  # (schema)
        422: "import_rejected: the body is not an export (its first line is no export header, or it is gzip-compressed: "
             "decompress it); nothing was kept and no job queued. Or idempotency_key_reused",
        507: "storage_full: the upload met a full disk under VAR_DIR (named); nothing was kept",
    }

    def body_limit(self) -> int | None:
        return settings.IMPORT_MAX_BYTES  # type: ignore[no-any-return]

    @extend_schema(
        operation_id="imports_create",
        summary="Upload an export file (application/x-ndjson) and queue its verified, all-or-nothing import (operator).",
        parameters=[PROJECT_QUERY, SKIP_EXISTING_QUERY, IDEMPOTENCY_KEY],
        request={"application/x-ndjson": {"type": "string", "format": "binary"}},
        responses={202: JobSerializer},
    )
    def post(self, request: Request) -> Response:
        project = _project(request, Role.OPERATOR)
        upload = request.data
        if not isinstance(upload, Upload) or not upload.size:
            raise ValidationError({"file": ["Send the export file as the body, Content-Type: application/x-ndjson."]})
        raw = request.query_params.get("skip_existing")
        skip_existing = False if raw is None else filters.parse_bool("skip_existing", raw)
        with upload.file:
            asked = {"project": project.pk, "sha256": upload.sha256, **({"skip_existing": True} if skip_existing else {})}
            request_key = self.request_key(asked)
            return queued(transfer.transfer_import_start(
                project=project, source=upload.file, skip_existing=skip_existing, request=request_key,
                **self.principal.actor,
            ))


Row = TypeVar("Row", bound=Model)


def _visible(request: Request, rows: QuerySet[Row], raw_id: str) -> Row | None:
    """The row with id `raw_id` in a project the caller sees (None otherwise: another project's row
    answers as a missing one does)."""
    pk = ascii_int(raw_id)
    return None if pk is None else rows.filter(pk=pk, project_id__in=visible_project_ids(request)).first()


def _job(request: Request, job_id: str) -> Job:
    job = _visible(request, Job.objects.all(), job_id)
    if job is None or job.project_id is None:
        raise JobNotFound(f"job {job_id} not found", job=job_id)
    return job


JOB_ID = OpenApiParameter("job_id", int, OpenApiParameter.PATH, description="The job's id.")


class JobList(mixins.ListModelMixin, ApiView):
    serializer_class = JobSerializer
    filter_backends = [ParamFilter]
    filter_params = [
        PROJECT_FILTER,
        filters.choice_param("kind", "Only this kind of job.", list(JobKind.values), "kind"),
        filters.choice_param("status", "Only jobs in this state.", list(JobStatus.values), "status"),
    ]

    def get_queryset(self) -> QuerySet[Job]:
        return Job.objects.filter(project_id__in=visible_project_ids(self.request)).select_related("project")

    @extend_schema(operation_id="jobs_list", summary="Background jobs (compaction, export, import, scrub), newest first.")
    def get(self, request: Request) -> Response:
        return self.list(request)


class JobDetail(ApiView):
    serializer_class = JobSerializer

    @extend_schema(operation_id="jobs_retrieve", parameters=[JOB_ID], summary="A job and its progress (done/total).")
    def get(self, request: Request, job_id: str) -> Response:
        return Response(JobSerializer(_job(request, job_id)).data)


class JobFile(ApiView):
    serializer_class = JobSerializer
    least_roles = {"GET": Role.OPERATOR}
    renderer_classes = [OrjsonRenderer, NdjsonRenderer]

    @extend_schema(
        operation_id="jobs_file",
        parameters=[JOB_ID],
        summary="Download a finished export (operator); 400 while it is not finished or once the file is gone.",
        responses={(200, "application/x-ndjson"): OpenApiResponse(OpenApiTypes.BINARY, "The NDJSON export file")},
    )
    def get(self, request: Request, job_id: str) -> StreamingHttpResponse:
        job = _job(request, job_id)
        require_role(request, job.project_id, Role.OPERATOR)  # type: ignore[arg-type]  # _job excludes None
        return file_download(request._request, transfer.export_file(job=job), "application/x-ndjson")


class IntegrityProblemList(mixins.ListModelMixin, ApiView):
    serializer_class = IntegrityProblemSerializer
    filter_backends = [ParamFilter]
    filter_params = [
        PROJECT_FILTER,
        filters.bool_param("open", "Only unresolved problems (default: all).", lambda yes: Q(resolved_at__isnull=yes)),
    ]

    def get_queryset(self) -> QuerySet[IntegrityProblem]:
        return IntegrityProblem.objects.filter(project_id__in=visible_project_ids(self.request))

    def paginate_queryset(self, queryset: QuerySet) -> Any:
        assert self.paginator is not None
        self.paginator.ordering = "-first_seen_at"  # type: ignore[attr-defined]
        return super().paginate_queryset(queryset)

    @extend_schema(operation_id="integrity_problems_list", summary="Versions whose stored data failed verification.")
    def get(self, request: Request) -> Response:
        return self.list(request)


class ResolutionSerializer(InputSerializer):
    resolution = required_reason(max_length=REASON_MAX,
                                 help_text="How it was dealt with, e.g. rows restored from a backup (missing or blank "
                                           "is 400 reason_required).")


class IntegrityProblemResolve(ApiView):
    serializer_class = IntegrityProblemSerializer

    @extend_schema(
        operation_id="integrity_problems_resolve",
        parameters=[OpenApiParameter("problem_id", int, OpenApiParameter.PATH, description="The problem's id."),
                    IDEMPOTENCY_KEY],
        request=ResolutionSerializer,
        responses={200: IntegrityProblemSerializer},
        summary="Close a problem once the version verifies again (operator; audited). 409 still_damaged while "
                "it still fails verification.",
    )
    def post(self, request: Request, problem_id: str) -> Response:
        problem = _visible(request, IntegrityProblem.objects.all(), problem_id)
        if problem is None:
            raise NotFound(f"integrity problem {problem_id} not found")
        require_role(request, problem.project_id, Role.OPERATOR)
        incoming = ResolutionSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        return self.replayable(incoming.validated_data, lambda: Response(IntegrityProblemSerializer(
            integrity.integrity_problem_resolve(
                problem=problem, resolution=incoming.validated_data.get("resolution", ""), **self.principal.actor
            )
        ).data))


class ScrubSerializer(InputSerializer):
    project = serializers.SlugField(required=False, help_text=PROJECT_BODY_HELP)


class IntegrityScrub(ApiView):
    serializer_class = JobSerializer
    write_query_params = {"POST": ("project",)}  # (it needs no body)

    @extend_schema(operation_id="integrity_scrub_create", parameters=[PROJECT_QUERY, IDEMPOTENCY_KEY],
                   request=ScrubSerializer, responses={202: JobSerializer},
                   summary="Queue a verification of every version (operator). No body needed.")
    def post(self, request: Request) -> Response:
        incoming = ScrubSerializer(data=request.data)  # (no body: {}) a field it does not take is 400, as everywhere
        incoming.is_valid(raise_exception=True)
        if "project" in incoming.validated_data:
            project = _project(request, Role.OPERATOR, body=incoming.validated_data)
        else:
            project = _project(request, Role.OPERATOR)
        return queued(integrity.integrity_scrub_start(
            project=project, budget=0, request=self.request_key({"project": project.pk}), **self.principal.actor
        ))

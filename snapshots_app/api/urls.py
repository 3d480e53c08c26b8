"""/api/v1/: every API route, the OpenAPI schema and its Swagger UI (served from static files).

No ReDoc: its page loads Google Fonts and a logo from cdn.redoc.ly, and the UI must work offline."""

from django.urls import path, re_path

from sessions_app.api import views as session_views
from sessions_app.api.docs import DocsView, SchemaView
from snapshots_app.api import ops, views

urlpatterns = [
    path("projects/", session_views.ProjectList.as_view(), name="api-projects"),
    path("projects/<str:slug>/", session_views.ProjectDetail.as_view(), name="api-project"),
    path("sessions/", session_views.SessionList.as_view(), name="api-sessions"),
    path("sessions/<str:id>/", session_views.SessionDetail.as_view(), name="api-session"),
    path("sessions/<str:id>/archive/", session_views.SessionArchive.as_view(), name="api-session-archive"),
    path("sessions/<str:id>/unarchive/", session_views.SessionUnarchive.as_view(), name="api-session-unarchive"),
    path("sessions/<str:id>/versions/", views.VersionList.as_view(), name="api-versions"),
    path("sessions/<str:id>/versions/batch/", views.VersionBatch.as_view(), name="api-versions-batch"),
    path("sessions/<str:id>/versions/<str:number>/", views.VersionDetail.as_view(), name="api-version"),
    path("sessions/<str:id>/head/", views.Head.as_view(), name="api-head"),
    path("sessions/<str:id>/diff/", views.Diff.as_view(), name="api-diff"),
    path("sessions/<str:id>/rewind/", views.Rewind.as_view(), name="api-rewind"),
    path("sessions/<str:id>/fork/", views.Fork.as_view(), name="api-fork"),
    path("sessions/<str:id>/trim/", views.Trim.as_view(), name="api-trim"),
    path("keys/", session_views.ApiKeyList.as_view(), name="api-keys"),
    path("keys/<str:key_id>/", session_views.ApiKeyDetail.as_view(), name="api-key"),
    path("audit-events/", session_views.AuditEventList.as_view(), name="api-audit-events"),
    path("retention-policy/", ops.RetentionPolicyView.as_view(), name="api-retention-policy"),
    path("compaction/", ops.Compaction.as_view(), name="api-compaction"),
    path("exports/", ops.ExportCreate.as_view(), name="api-exports"),
    path("imports/", ops.ImportCreate.as_view(), name="api-imports"),
    path("jobs/", ops.JobList.as_view(), name="api-jobs"),
    path("jobs/<str:job_id>/", ops.JobDetail.as_view(), name="api-job"),
    path("jobs/<str:job_id>/file/", ops.JobFile.as_view(), name="api-job-file"),
    path("integrity-problems/", ops.IntegrityProblemList.as_view(), name="api-integrity-problems"),
    path("integrity-problems/<str:problem_id>/resolve/", ops.IntegrityProblemResolve.as_view(),
         name="api-integrity-problem-resolve"),
    path("integrity-scrub/", ops.IntegrityScrub.as_view(), name="api-integrity-scrub"),
    path("schema/", SchemaView.as_view(), name="api-schema"),
    # Its script as a file of its own (?script), not inline: the Content-Security-Policy allows no inline script.
    path("docs/", DocsView.as_view(url_name="api-schema"), name="api-docs"),
    # Only paths ending in "/" (and /api/v1/ itself): a missing slash still gets Django's APPEND_SLASH redirect.
    re_path(r"^(?:.*/)?$", session_views.unknown_route),
]

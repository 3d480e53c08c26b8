from django.urls import path

from snapshots_app import views

app_name = "snapshots"

urlpatterns = [
    path("sessions/<uuid:session_id>/", views.session_detail, name="session"),
    path("sessions/<uuid:session_id>/diff/", views.version_diff, name="diff"),
    path("sessions/<uuid:session_id>/archive/", views.archive_confirm, name="archive"),
    path("sessions/<uuid:session_id>/unarchive/", views.session_unarchive, name="unarchive"),
    path("sessions/<uuid:session_id>/trim/", views.trim_confirm, name="trim"),
    path("sessions/<uuid:session_id>/history/", views.path_history, name="history"),
    path("sessions/<uuid:session_id>/goto/", views.timeline_goto, name="goto"),
    path("sessions/<uuid:session_id>/audit/", views.session_audit, name="audit"),
    path("sessions/<uuid:session_id>/export/", views.session_export, name="export"),
    path("sessions/<uuid:session_id>/export/<int:job_id>/file/", views.export_download, name="export-file"),
    path("sessions/<uuid:session_id>/v/<int:number>/", views.version_detail, name="version"),
    path("sessions/<uuid:session_id>/v/<int:number>/raw.json", views.version_raw, name="raw"),
    path("sessions/<uuid:session_id>/v/<int:number>/rewind/", views.rewind_confirm, name="rewind"),
    path("sessions/<uuid:session_id>/v/<int:number>/fork/", views.fork_confirm, name="fork"),
    path("sessions/<uuid:session_id>/v/<int:number>/mark/", views.version_mark, name="mark"),
]

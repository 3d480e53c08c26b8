"""Operations over the API: retention policy, compaction dry run / run, export and import jobs with
their progress, integrity problems, audit events."""

from __future__ import annotations

import pytest

from config.celery import app as celery_app
from sessions_app.models import AuditEvent, WorkflowSession
from snapshots_app.models import Job, Version
from snapshots_app.services import snapshot_record
from tests.api.conftest import key_client


@pytest.fixture
def run_jobs(settings, tmp_path, django_capture_on_commit_callbacks):
    """Jobs run in-process when their request's transaction commits; files go to a temporary VAR_DIR."""
    settings.VAR_DIR = tmp_path
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True

    def run(call):
        with django_capture_on_commit_callbacks(execute=True):
            return call()

    yield run
    celery_app.conf.task_always_eager = previous


def test_retention_policy_read_by_anyone_set_by_admins(project, reader, admin_key):
    policy = reader.get("/api/v1/retention-policy/").json()
    assert policy["enabled"] is False and policy["project"] == project.slug
    body = {"enabled": True, "keep_last": 10, "keep_days": 3, "thin_to": "day"}
    assert reader.put("/api/v1/retention-policy/", body, format="json").status_code == 403
    assert admin_key.put("/api/v1/retention-policy/", {**body, "thin_to": "week"}, format="json").status_code == 400
    saved = admin_key.put("/api/v1/retention-policy/", body, format="json")
    assert saved.status_code == 200 and saved.json()["keep_last"] == 10
    assert reader.get("/api/v1/retention-policy/").json()["thin_to"] == "day"
    assert AuditEvent.objects.filter(action="retention.policy").count() == 1


def test_putting_the_policy_it_has_changes_nothing_and_records_nothing(project, admin_key):
    """A deployment that puts its retention policy on every start: the same policy again is answered
    as it is, with no audit event saying it changed from X to X (one was recorded per PUT)."""
    body = {"enabled": True, "keep_last": 10, "keep_days": 3, "thin_to": "day"}
    first = admin_key.put("/api/v1/retention-policy/", body, format="json").json()
    for again in (body, admin_key.get("/api/v1/retention-policy/").json()):  # its own GET answer too
        same = admin_key.put("/api/v1/retention-policy/", again, format="json")
        assert same.status_code == 200 and same.json() == first
    assert AuditEvent.objects.filter(action="retention.policy").count() == 1
    changed = admin_key.put("/api/v1/retention-policy/", {**body, "keep_last": 20}, format="json")
    assert changed.status_code == 200 and changed.json()["keep_last"] == 20
    assert AuditEvent.objects.filter(action="retention.policy").count() == 2


def test_the_remaining_writes_refuse_an_idempotency_key_reused_for_another_request(
    project, session, writer, admin_key
):
    """Retention policy PUT, key PATCH and integrity-problem resolve took an Idempotency-Key and
    ignored it: the same key with another body was applied, where every other write answers 422."""
    from datetime import timedelta

    from django.utils import timezone

    from sessions_app.models import ApiKey
    from snapshots_app.integrity import integrity_problem_record
    from snapshots_app.models import IntegrityProblem, RetentionPolicy

    policy = {"enabled": True, "keep_last": 10, "keep_days": 3, "thin_to": "day"}
    put = admin_key.put("/api/v1/retention-policy/", policy, format="json", HTTP_IDEMPOTENCY_KEY="policy-1")
    again = admin_key.put("/api/v1/retention-policy/", policy, format="json", HTTP_IDEMPOTENCY_KEY="policy-1")
    assert put.status_code == again.status_code == 200 and again.json() == put.json()
    other = admin_key.put("/api/v1/retention-policy/", {**policy, "keep_last": 1}, format="json",
                          HTTP_IDEMPOTENCY_KEY="policy-1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert RetentionPolicy.objects.get(project=project).keep_last == 10

    api_key = ApiKey.objects.get(name="read,write key")
    url = f"/api/v1/keys/{api_key.pk}/"
    soon, later = (timezone.now() + timedelta(days=days) for days in (30, 60))
    extended = admin_key.patch(url, {"expires_at": soon.isoformat()}, format="json", HTTP_IDEMPOTENCY_KEY="key-1")
    again = admin_key.patch(url, {"expires_at": soon.isoformat()}, format="json", HTTP_IDEMPOTENCY_KEY="key-1")
    assert extended.status_code == again.status_code == 200 and again.json() == extended.json()
    other = admin_key.patch(url, {"expires_at": later.isoformat()}, format="json", HTTP_IDEMPOTENCY_KEY="key-1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    api_key.refresh_from_db()
    assert api_key.expires_at == soon

    problem = integrity_problem_record(version=snapshot_record(session=session, state={"n": 1}), detail="was damaged")
    url = f"/api/v1/integrity-problems/{problem.pk}/resolve/"
    resolved = writer.post(url, {"resolution": "restored"}, format="json", HTTP_IDEMPOTENCY_KEY="fix-1")
    again = writer.post(url, {"resolution": "restored"}, format="json", HTTP_IDEMPOTENCY_KEY="fix-1")
    assert resolved.status_code == again.status_code == 200 and again.json() == resolved.json()
    other = writer.post(url, {"resolution": "something else"}, format="json", HTTP_IDEMPOTENCY_KEY="fix-1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert IntegrityProblem.objects.get(pk=problem.pk).resolution == "restored"


def test_compaction_dry_run_changes_nothing_and_runs_need_admin(project, session, writer, admin_key):
    for i in range(3):
        snapshot_record(session=session, state={"i": i})
    preview = writer.post("/api/v1/compaction/", {"dry_run": True}, format="json")
    assert preview.status_code == 200 and preview.json()["versions_total"] == 3
    assert Version.objects.count() == 3
    assert writer.post("/api/v1/compaction/", {"dry_run": False}, format="json").status_code == 403
    queued = admin_key.post("/api/v1/compaction/", {"dry_run": False}, format="json")
    assert queued.status_code == 202 and queued.json()["kind"] == "compaction" and queued.json()["status"] == "queued"
    assert writer.get(f"/api/v1/jobs/{queued.json()['id']}/").json()["id"] == queued.json()["id"]


def test_export_then_import_into_another_project_with_progress(project, session, writer, other_project, run_jobs):
    snapshot_record(session=session, state={"a": 1})
    snapshot_record(session=session, state={"a": 2, "b": [1, 2]})
    job = run_jobs(lambda: writer.post("/api/v1/exports/", {"session": str(session.pk)}, format="json"))
    assert job.status_code == 202
    done = writer.get(f"/api/v1/jobs/{job.json()['id']}/").json()
    assert done["status"] == "done" and done["percent"] == 100 and done["result"]["versions"] == 2
    # No server path: the file's name and where to download it.
    assert "path" not in done["result"] and done["result"]["file"].endswith(".ndjson")
    assert done["result"]["download"] == f"/api/v1/jobs/{done['id']}/file/"
    assert "/exports/" not in str(writer.get("/api/v1/jobs/").json())
    download = writer.get(done["result"]["download"])
    assert download.status_code == 200 and download["Content-Type"] == "application/x-ndjson"
    export = b"".join(download.streaming_content)
    asked = writer.get(done["result"]["download"], HTTP_ACCEPT="application/x-ndjson")  # what it is: not a 406
    assert asked.status_code == 200 and b"".join(asked.streaming_content) == export

    theirs = key_client(other_project, "read,write")
    imported = run_jobs(lambda: theirs.generic("POST", "/api/v1/imports/", export, content_type="application/x-ndjson"))
    assert imported.status_code == 202
    missing = theirs.get(f"/api/v1/jobs/{job.json()['id']}/file/", HTTP_ACCEPT="application/x-ndjson")
    assert missing.status_code == 404 and missing.json()["code"] == "job_not_found"
    result = theirs.get(f"/api/v1/jobs/{imported.json()['id']}/").json()
    assert result["status"] == "done", result
    copy = WorkflowSession.objects.get(project=other_project)
    assert theirs.get(f"/api/v1/sessions/{copy.pk}/head/").json()["state"] == {"a": 2, "b": [1, 2]}
    # The exporting project's jobs stay invisible to the other project.
    assert theirs.get(f"/api/v1/jobs/{job.json()['id']}/").status_code == 404
    assert theirs.get(f"/api/v1/jobs/{job.json()['id']}/file/").status_code == 404


def test_a_project_export_can_leave_out_damaged_sessions_and_says_which(project, session, writer, run_jobs):
    from snapshots_app.integrity import integrity_problem_record

    snapshot_record(session=session, state={"a": 1})
    healthy = WorkflowSession.objects.create(project=project, external_id="healthy")
    snapshot_record(session=healthy, state={"ok": True})
    integrity_problem_record(version=Version.objects.get(session=session, number=1), detail="checksum mismatch")

    refused = writer.post("/api/v1/exports/", {"session": str(session.pk), "skip_damaged": True}, format="json")
    assert refused.status_code == 400 and "skip_damaged" in refused.json()["errors"]
    assert not Job.objects.exists()
    failed = run_jobs(lambda: writer.post("/api/v1/exports/", {}, format="json")).json()
    failed = writer.get(f"/api/v1/jobs/{failed['id']}/").json()
    assert failed["status"] == "failed" and "skip_damaged" in failed["error"]

    job = run_jobs(lambda: writer.post("/api/v1/exports/", {"skip_damaged": True}, format="json"))
    assert job.status_code == 202
    done = writer.get(f"/api/v1/jobs/{job.json()['id']}/").json()
    assert done["status"] == "done" and done["result"]["sessions"] == 1 and done["result"]["versions"] == 1
    assert done["result"]["skipped"] == [{"session": str(session.pk), "external_id": session.external_id,
                                          "version": 1, "detail": "checksum mismatch"}]
    export = b"".join(writer.get(done["result"]["download"]).streaming_content)
    assert b'"healthy"' in export and session.external_id.encode() not in export


def test_an_import_asked_to_skip_existing_sessions_brings_back_only_the_missing_ones(
    project, session, writer, admin_key, run_jobs
):
    snapshot_record(session=session, state={"a": 1})
    other = WorkflowSession.objects.create(project=project, external_id="other")
    snapshot_record(session=other, state={"b": 1})
    job = run_jobs(lambda: writer.post("/api/v1/exports/", {}, format="json")).json()
    export = b"".join(writer.get(f"/api/v1/jobs/{job['id']}/file/").streaming_content)
    assert admin_key.delete(f"/api/v1/sessions/{other.pk}/?reason=by mistake").status_code == 204

    def upload(query: str):
        return writer.generic("POST", f"/api/v1/imports/{query}", export, content_type="application/x-ndjson")

    assert upload("?skip_existing=maybe").status_code == 400
    refused = writer.get(f"/api/v1/jobs/{run_jobs(lambda: upload('')).json()['id']}/").json()
    assert refused["status"] == "failed" and "(import with skip_existing to leave them out)" in refused["error"]
    done = writer.get(f"/api/v1/jobs/{run_jobs(lambda: upload('?skip_existing=true')).json()['id']}/").json()
    assert done["status"] == "done", done
    assert done["result"]["skipped"] == [{"external_id": session.external_id, "versions": 1}]
    back = WorkflowSession.objects.get(project=project, external_id="other")
    assert writer.get(f"/api/v1/sessions/{back.pk}/head/").json()["state"] == {"b": 1}


def test_an_export_larger_than_any_request_imports_and_imports_have_their_own_limit(
    project, session, writer, other_project, run_jobs, settings
):
    for step in range(6):
        snapshot_record(session=session, state={"step": step, "notes": [f"note {step} {i} " * 40 for i in range(8)]})
    job = run_jobs(lambda: writer.post("/api/v1/exports/", {"session": str(session.pk)}, format="json"))
    export = b"".join(writer.get(f"/api/v1/jobs/{job.json()['id']}/file/").streaming_content)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = len(export) // 4  # every other request body must be smaller
    theirs = key_client(other_project, "read,write")
    imported = run_jobs(lambda: theirs.generic("POST", "/api/v1/imports/", export, content_type="application/x-ndjson"))
    assert imported.status_code == 202
    assert theirs.get(f"/api/v1/jobs/{imported.json()['id']}/").json()["status"] == "done"
    assert WorkflowSession.objects.get(project=other_project).version_count == 6

    settings.IMPORT_MAX_BYTES = len(export) - 1
    too_big = theirs.generic("POST", "/api/v1/imports/", export, content_type="application/x-ndjson")
    assert too_big.status_code == 413 and too_big.json()["code"] == "request_too_large"


def _header() -> bytes:
    """An export's header line (checksummed), as the first line of an upload that is checked as it arrives."""
    from snapshots_app import transfer

    return transfer._line({"type": "header", "format": transfer.FORMAT, "format_version": transfer.FORMAT_VERSION,
                           "scope": "project", "sessions": 0, "versions": 0, "nodes": 0})


def test_a_tampered_import_fails_its_job_with_its_code_and_stores_nothing(other_project, run_jobs):
    theirs = key_client(other_project, "read,write")
    imported = run_jobs(lambda: theirs.generic("POST", "/api/v1/imports/", _header() + b'{"type": "session"}\n',
                                               content_type="application/x-ndjson"))
    assert imported.status_code == 202
    job = theirs.get(f"/api/v1/jobs/{imported.json()['id']}/").json()
    assert job["status"] == "failed" and job["error"] == "line 2 is not a checksummed export record"
    assert job["result"] == {"code": "import_rejected"}  # the machine-readable reason, as a 4xx's `code`
    assert not WorkflowSession.objects.filter(project=other_project).exists()


@pytest.mark.parametrize(("body", "said"), [
    pytest.param(b'{"a":1}', "not a Session Rewind export: line 1 is not an export header", id="json-no-newline"),
    pytest.param(b'{"type": "header"}\n', "not a Session Rewind export: line 1 is not an export header",
                 id="unsigned-header"),
    pytest.param(b"x" * 200_000, "not a Session Rewind export: line 1 is not an export header", id="one-long-line"),
    pytest.param("gzip", "the file is gzip-compressed: decompress it (gunzip), then import the .ndjson", id="gzip"),
    pytest.param(b"\x1f\x8b\x08" + b"\x00" * 100_000, "the file is gzip-compressed: decompress it (gunzip), then "
                 "import the .ndjson", id="gzip-no-newline-early"),
    pytest.param("other-format", "not a Session Rewind export (no header)", id="signed-but-not-a-header"),
])
def test_an_upload_that_is_no_export_is_refused_at_once_and_nothing_is_kept(
    project, writer, settings, tmp_path, run_jobs, body, said
):
    """It was 202 for any body, and the job failed later; README listed import_rejected, which no
    endpoint answered."""
    import gzip

    from snapshots_app import transfer

    settings.VAR_DIR = tmp_path
    if body == "gzip":
        body = gzip.compress(_header() + b'{"type": "session"}\n' * 1000)
    elif body == "other-format":
        body = transfer._line({"type": "session", "id": "s"}) + _header()
    sessions_before = WorkflowSession.objects.count()

    response = run_jobs(lambda: writer.generic("POST", "/api/v1/imports/", body, content_type="application/x-ndjson"))

    assert response.status_code == 422, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert (problem["code"], problem["status"], problem["detail"]) == ("import_rejected", 422, said)
    assert problem["type"] == "urn:session-rewind:problem:import_rejected" and problem["instance"] == "/api/v1/imports/"
    assert not Job.objects.exists()
    assert not (tmp_path / "imports").exists() or not list((tmp_path / "imports").iterdir())
    assert WorkflowSession.objects.count() == sessions_before


def test_jobs_and_integrity_lists(project, writer, reader):
    writer.post("/api/v1/integrity-scrub/")
    listed = reader.get("/api/v1/jobs/?kind=scrub").json()["results"]
    assert [j["kind"] for j in listed] == ["scrub"]
    assert reader.get("/api/v1/jobs/?kind=nope").status_code == 400
    assert reader.get("/api/v1/integrity-problems/?open=true").json() == {"results": [], "next": None}
    assert reader.post("/api/v1/integrity-scrub/").status_code == 403
    assert Job.objects.count() == 1


def test_audit_events_filter_by_action_and_session(project, session, writer):
    snapshot_record(session=session, state={"a": 1})
    writer.post(f"/api/v1/sessions/{session.pk}/rewind/", {"to_version": 1, "reason": "why not"}, format="json")
    events = writer.get(f"/api/v1/audit-events/?action=session.rewind&session={session.pk}").json()["results"]
    assert len(events) == 1 and events[0]["reason"] == "why not" and events[0]["actor"].startswith("api key")
    bad = writer.get("/api/v1/audit-events/?session=not-a-uuid")
    assert bad.status_code == 400 and bad.json()["errors"] == {"session": ["Must be a valid UUID."]}
    # A fork's events start with the fork that made it (recorded on its source), as its dashboard trail does.
    fork = writer.post(f"/api/v1/sessions/{session.pk}/fork/", {"from_version": 1, "reason": "what if"}, format="json")
    fork_events = writer.get(f"/api/v1/audit-events/?session={fork.json()['id']}").json()["results"]
    assert [(e["action"], e["reason"]) for e in fork_events] == [("session.fork", "what if")]


def test_browser_members_of_several_projects_name_the_project(project, other_project, user):
    from rest_framework.test import APIClient

    from sessions_app.models import Role
    from sessions_app.services import membership_set

    membership_set(project=other_project, user=user, role=Role.VIEWER)
    client = APIClient()
    client.force_login(user)
    assert client.get("/api/v1/retention-policy/").status_code == 400
    assert client.get(f"/api/v1/retention-policy/?project={other_project.slug}").json()["project"] == other_project.slug
    assert client.post("/api/v1/sessions/", {"external_id": "x", "project": other_project.slug},
                       format="json").status_code == 403
    assert client.post("/api/v1/sessions/", {"external_id": "x", "project": project.slug}, format="json").status_code == 201


def test_job_starts_replay_for_a_repeated_idempotency_key_even_after_the_cache_is_lost(
    project, session, writer, settings, tmp_path
):
    """Job starts keep their key on the job's row: a retry after a Redis outage (here: the cache
    emptied) gets the job the first request started, not a second export."""
    from django.core.cache import cache

    settings.VAR_DIR = tmp_path
    first = writer.post("/api/v1/exports/", {"session": str(session.pk)}, format="json", HTTP_IDEMPOTENCY_KEY="e-1")
    cache.clear()
    again = writer.post("/api/v1/exports/", {"session": str(session.pk)}, format="json", HTTP_IDEMPOTENCY_KEY="e-1")
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    other = writer.post("/api/v1/exports/", {}, format="json", HTTP_IDEMPOTENCY_KEY="e-1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    # Another caller's key of the same name is its own.
    mine = writer.post("/api/v1/exports/", {"session": str(session.pk)}, format="json", HTTP_IDEMPOTENCY_KEY="e-2")
    assert mine.status_code == 202 and mine.json()["id"] != first.json()["id"]
    assert Job.objects.count() == 2


def test_an_idempotency_key_reused_for_another_project_is_refused(project, other_project, user, settings, tmp_path):
    from rest_framework.test import APIClient

    from sessions_app.models import Role
    from sessions_app.services import membership_set

    settings.VAR_DIR = tmp_path
    for each in (project, other_project):
        membership_set(project=each, user=user, role=Role.ADMIN)
    client = APIClient()
    client.force_login(user)
    first = client.post(f"/api/v1/integrity-scrub/?project={project.slug}", HTTP_IDEMPOTENCY_KEY="nightly")
    again = client.post(f"/api/v1/integrity-scrub/?project={project.slug}", HTTP_IDEMPOTENCY_KEY="nightly")
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    elsewhere = client.post(f"/api/v1/integrity-scrub/?project={other_project.slug}", HTTP_IDEMPOTENCY_KEY="nightly")
    assert elsewhere.status_code == 422 and elsewhere.json()["code"] == "idempotency_key_reused"
    key = client.post("/api/v1/keys/", {"project": project.slug, "name": "k", "scopes": ["read"]}, format="json",
                      HTTP_IDEMPOTENCY_KEY="make-k")
    other_key = client.post("/api/v1/keys/", {"project": other_project.slug, "name": "k", "scopes": ["read"]},
                            format="json", HTTP_IDEMPOTENCY_KEY="make-k")
    assert key.status_code == 201 and other_key.status_code == 422
    assert Job.objects.count() == 1


class _FillingFile:
    """A file on a disk that fills up once `room` bytes are written (the outside world: a full disk
    is not something a test can make here without root)."""

    def __init__(self, out, room):
        self.out, self.room, self.written = out, room, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.out.close()

    def write(self, data):
        import errno

        self.written += len(data)
        if self.written > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.out.write(data)

    def __getattr__(self, name):
        return getattr(self.out, name)


def _disk_fills_after(monkeypatch, room: int) -> None:
    from snapshots_app import transfer

    private_file = transfer._private_file
    monkeypatch.setattr(transfer, "_private_file", lambda path: _FillingFile(private_file(path), room))


def test_an_upload_onto_a_full_disk_is_507_naming_where_and_keeps_nothing(project, writer, settings, tmp_path, monkeypatch):
    """It was a 500 "An unexpected error occurred", and the part written stayed for an hour: a full
    disk stayed full."""
    settings.VAR_DIR = tmp_path
    _disk_fills_after(monkeypatch, 10_000)
    upload = _header() + b'{"type": "header"}\n' * 2_000
    response = writer.generic("POST", "/api/v1/imports/", upload, content_type="application/x-ndjson")
    assert response.status_code == 507 and response.json()["code"] == "storage_full", response.content
    assert response.json()["detail"] == (f"no space left on the disk of {tmp_path / 'imports'} (VAR_DIR): free space "
                                         "there, then upload the file again; nothing was kept")
    assert list((tmp_path / "imports").iterdir()) == [] and not Job.objects.exists()


def test_an_export_onto_a_full_disk_fails_its_job_naming_where_and_keeps_nothing(
    project, session, writer, settings, tmp_path, monkeypatch, run_jobs
):
    settings.VAR_DIR = tmp_path
    snapshot_record(session=session, state={"a": "x" * 50_000})
    _disk_fills_after(monkeypatch, 10_000)
    job = run_jobs(lambda: writer.post("/api/v1/exports/", {"session": str(session.pk)}, format="json"))
    failed = writer.get(f"/api/v1/jobs/{job.json()['id']}/").json()
    assert failed["status"] == "failed"
    assert failed["error"] == (f"no space left on the disk of {tmp_path / 'exports'} (VAR_DIR): free space there, "
                               "then export again; nothing was kept")
    assert list((tmp_path / "exports").iterdir()) == []


def test_a_retried_import_keeps_one_copy_of_the_upload(project, writer, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    upload = _header()

    def post(body):
        return writer.generic("POST", "/api/v1/imports/", body, content_type="application/x-ndjson",
                              HTTP_IDEMPOTENCY_KEY="i-1")

    first, again = post(upload), post(upload)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = post(upload + b"\n")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert Job.objects.count() == 1
    assert len(list((tmp_path / "imports").iterdir())) == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_retries_of_a_job_start_make_one_job(project, session, writer, settings, tmp_path, monkeypatch):
    """A client that timed out retries while its first request is still being served, just before
    that request commits its job: the retry waits for it and answers the same job."""
    import threading
    import time

    from django.db import connection

    from snapshots_app import jobs

    settings.VAR_DIR = tmp_path
    created, release = threading.Event(), threading.Event()
    publish = jobs._publish
    first_thread = []

    def publish_then_wait(job, event):
        publish(job, event)
        if threading.current_thread() in first_thread:
            created.set()
            release.wait(30)  # the first request holds its new job, uncommitted

    monkeypatch.setattr(jobs, "_publish", publish_then_wait)
    body = {"session": str(session.pk)}
    answers: dict[str, object] = {}

    def call(name):
        try:
            answers[name] = writer.post("/api/v1/exports/", body, format="json", HTTP_IDEMPOTENCY_KEY="e-3")
        finally:
            connection.close()

    first = threading.Thread(target=call, args=("first",))
    first_thread.append(first)
    first.start()
    assert created.wait(30)
    retry = threading.Thread(target=call, args=("retry",))
    retry.start()
    with connection.cursor() as cursor:  # the retry's insert waits on the first one's uncommitted row
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            if cursor.fetchone()[0]:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the retry never waited for the first request")
    release.set()
    first.join(30)
    retry.join(30)
    assert answers["first"].status_code == answers["retry"].status_code == 202, answers["retry"].content
    assert answers["first"].json()["id"] == answers["retry"].json()["id"]
    assert Job.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_retry_while_the_first_call_runs_is_told_to_wait(project, session, writer, monkeypatch):
    """Writes that replay through the cache (here a session PATCH): a retry that arrives while the
    first call is still being served must not run the write a second time."""
    import threading

    from django.db import connection

    from sessions_app import services

    started, release = threading.Event(), threading.Event()
    session_update = services.session_update

    def slow_update(**kwargs):
        started.set()
        release.wait(30)
        return session_update(**kwargs)

    monkeypatch.setattr(services, "session_update", slow_update)
    path, body = f"/api/v1/sessions/{session.pk}/", {"tags": ["slow"]}
    answers = []

    def first_call():
        try:
            answers.append(writer.patch(path, body, format="json", HTTP_IDEMPOTENCY_KEY="p-2"))
        finally:
            connection.close()

    thread = threading.Thread(target=first_call)
    thread.start()
    assert started.wait(30)
    retry = writer.patch(path, body, format="json", HTTP_IDEMPOTENCY_KEY="p-2")
    assert retry.status_code == 409 and retry.json()["code"] == "request_in_progress"
    release.set()
    thread.join(30)
    assert answers[0].status_code == 200
    again = writer.patch(path, body, format="json", HTTP_IDEMPOTENCY_KEY="p-2")
    assert again.status_code == 200 and again.json() == answers[0].json()


def test_an_integrity_problem_is_resolved_only_once_its_version_verifies_again(
    project, session, writer, reader, other_project
):
    from snapshots_app.integrity import integrity_problem_record
    from snapshots_app.models import IntegrityProblem, StateNode

    version = snapshot_record(session=session, state={"n": 1})
    node = StateNode.objects.filter(project=project, digest=bytes(version.root))
    original = bytes(node.get().data)
    node.update(data=b"\x00garbage")
    problem = integrity_problem_record(version=version, detail="checksum mismatch")
    url = f"/api/v1/integrity-problems/{problem.pk}/resolve/"

    assert reader.post(url, {"resolution": "restored"}, format="json").status_code == 403
    assert key_client(other_project).post(url, {"resolution": "restored"}, format="json").status_code == 404
    for blank in ({}, {"resolution": " "}):
        refused = writer.post(url, blank, format="json")
        assert refused.status_code == 400 and refused.json()["code"] == "reason_required"
        assert refused.json()["detail"].startswith("a resolution is required")  # (the field is not "reason")
    still = writer.post(url, {"resolution": "restored"}, format="json")
    assert still.status_code == 409 and still.json()["code"] == "still_damaged"
    assert "restore its data first" in still.json()["detail"]

    node.update(data=original)  # a DBA restored the row from a backup
    response = writer.post(url, {"resolution": "restored statenode from the 03:00 backup"}, format="json")
    assert response.status_code == 200 and response.json()["resolved_at"] is not None
    closed = IntegrityProblem.objects.get(pk=problem.pk)
    assert closed.resolution == "restored statenode from the 03:00 backup" and closed.last_seen_at < closed.resolved_at
    event = AuditEvent.objects.get(action="integrity.resolve")
    assert event.reason == "restored statenode from the 03:00 backup" and event.details["version"] == 1
    assert reader.get("/api/v1/integrity-problems/?open=true").json()["results"] == []


def test_a_projects_jobs_are_paged_newest_first_by_their_index(project, other_project, reader):
    """GET /jobs/ reads a page of the project's newest jobs from job_project_created (with only the
    (project, kind, created) index, every one of the project's jobs was sorted for each page: 103 ms
    at 50,000) and pages on through it."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.conftest import query_plan

    for owner in (project, other_project, project, project):
        Job.objects.create(project=owner, kind="scrub", status="done")
    mine = list(Job.objects.filter(project=project).order_by("-created_at").values_list("pk", flat=True))
    with CaptureQueriesContext(connection) as queries:
        first = reader.get("/api/v1/jobs/", {"limit": 2}).json()
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "snapshots_app_job"' in q["sql"]]
    assert [job["id"] for job in first["results"]] == mine[:2]
    assert [job["id"] for job in reader.get("/api/v1/jobs/", {"limit": 2, "cursor": first["next"]}).json()["results"]] == mine[2:]
    assert len(listing) == 1
    plan = query_plan(listing[0])
    assert "job_project_created" in plan and "Sort" not in plan, plan


@pytest.mark.django_db(transaction=True)
def test_an_export_downloads_from_disk_as_it_is_sent_not_read_whole_first(project, writer, settings, tmp_path):
    """Served by the ASGI server the web process runs, a download read the whole export file into memory
    before its first byte went out (Django buffers a file response's iterator under ASGI): a 1 GB export
    cost the web process 1 GB, and the client waited for all of it to be read. It is now read a chunk
    at a time as the client takes it."""
    import tracemalloc

    from asgiref.sync import async_to_sync
    from asgiref.testing import ApplicationCommunicator

    from config.asgi import application
    from snapshots_app.models import JobKind, JobStatus
    from snapshots_app.transfer import exports_dir

    settings.VAR_DIR = tmp_path
    exports_dir().mkdir(parents=True)
    size = 24 * 1024 * 1024
    (exports_dir() / "big.ndjson").write_bytes(b'{"line": "' + b"x" * (size - 13) + b'"}\n')
    job = Job.objects.create(project=project, kind=JobKind.EXPORT, status=JobStatus.DONE, result={"file": "big.ndjson"})

    async def download() -> tuple[dict, int, int]:
        scope = {"type": "http", "method": "GET", "path": f"/api/v1/jobs/{job.pk}/file/", "raw_path": b"",
                 "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
                 "headers": [(b"host", b"localhost"), (b"authorization", f"Bearer {writer.token}".encode())],
                 "client": ("127.0.0.1", 50000), "server": ("localhost", 80)}
        app = ApplicationCommunicator(application, scope)
        await app.send_input({"type": "http.request", "body": b"", "more_body": False})
        tracemalloc.start()
        try:
            start = await app.receive_output(10)
            first = await app.receive_output(10)
            assert first["type"] == "http.response.body", (start, first)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        received = len(first.get("body", b""))
        while first.get("more_body"):
            first = await app.receive_output(10)
            assert first["type"] == "http.response.body", first
            received += len(first.get("body", b""))
        await app.wait(5)  # the handler's end of the request (it closes its database connection)
        return start, received, peak

    start, received, peak = async_to_sync(download)()
    headers = {name.lower(): value for name, value in start["headers"]}
    assert start["status"] == 200 and headers[b"content-length"] == str(size).encode()
    assert headers[b"content-disposition"] == b'attachment; filename="big.ndjson"'
    assert headers[b"content-type"] == b"application/x-ndjson"
    assert received == size  # every byte, once
    assert peak < size // 4, f"{peak / 2**20:.0f} MiB held before the first byte of a {size / 2**20:.0f} MiB file"

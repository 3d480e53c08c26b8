"""Who owns a running job: duplicate deliveries, a dead worker's job taken over, outcomes never
overwritten (in-process; tests/workers/test_worker_jobs.py kills real workers)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from django.db import connection
from django.utils import timezone

from snapshots_app import jobs, tasks
from snapshots_app.models import Job, JobKind, JobStatus, Version
from snapshots_app.services import snapshot_record
from snapshots_app.transfer import transfer_export_run, transfer_import_run
from tests.factories import make_project, make_session


def _queued(project) -> Job:
    return jobs.job_create(kind=JobKind.SCRUB, project=project, enqueue=lambda job_id: None)


@pytest.mark.django_db
def test_a_second_delivery_of_a_running_job_does_nothing_until_its_heartbeat_goes_stale(project, settings):
    job = _queued(project)
    first = jobs.job_start(job_id=job.pk)
    assert first is not None and first.attempts == 1
    assert jobs.job_start(job_id=job.pk) is None  # a duplicate while the first one beats
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS + 1))
    second = jobs.job_start(job_id=job.pk)
    assert second is not None and second.attempts == 2  # the worker died: this delivery takes over

    # The superseded attempt can no longer decide the outcome; the owner can, once.
    jobs.job_fail(job=first, error="IntegrityError: duplicate key (the other attempt got there first)")
    jobs.job_finish(job=second, result={"verified": 3})
    jobs.job_fail(job=second, error="too late")
    job.refresh_from_db()
    assert (job.status, job.result, job.error) == (JobStatus.DONE, {"verified": 3}, "")


@pytest.mark.django_db
def test_the_sweep_sends_again_queued_jobs_lost_and_running_jobs_gone_silent(project, settings, eager):
    fresh, lost, alive, silent, done = (_queued(project) for _ in range(5))
    Job.objects.filter(pk=lost.pk).update(created_at=timezone.now() - jobs.STALE_QUEUED - timedelta(seconds=1))
    for job in (alive, silent, done):
        jobs.job_start(job_id=job.pk)
    Job.objects.filter(pk=silent.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS + 1))
    jobs.job_finish(job=Job.objects.get(pk=done.pk), result={"verified": 0})

    assert tasks.jobs_requeue_stale() == 2
    status = dict(Job.objects.values_list("pk", "status"))
    assert (status[lost.pk], status[silent.pk]) == (JobStatus.DONE, JobStatus.DONE)  # sent again, and run
    assert (status[fresh.pk], status[alive.pk], status[done.pk]) == (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE)
    assert Job.objects.get(pk=silent.pk).attempts == 2


@pytest.mark.django_db
def test_a_superseded_import_attempt_imports_nothing_and_the_owner_imports_once(project, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    snapshot_record(session=make_session(project, "to-move"), state={"n": 1})
    path = Path(transfer_export_run(project=project)["path"])
    target = make_project("target")
    job = jobs.job_create(kind=JobKind.IMPORT, project=target, enqueue=lambda job_id: None)
    first = jobs.job_start(job_id=job.pk)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS + 1))
    second = jobs.job_start(job_id=job.pk)  # the first looked dead, but was only slow

    with pytest.raises(jobs.JobSuperseded):
        transfer_import_run(project=target, path=path, job=first)
    assert not Version.objects.filter(session__project=target).exists()
    transfer_import_run(project=target, path=path, job=second)
    job.refresh_from_db()
    assert job.status == JobStatus.DONE and job.result["versions"] == 1
    assert Version.objects.filter(session__project=target).count() == 1


@pytest.mark.django_db
def test_a_superseded_export_attempt_leaves_the_owners_finished_file_as_it_wrote_it(project, settings, tmp_path):
    """Both attempts wrote one `.partial`: the first (a worker paused past JOB_STALE_SECONDS) went on
    writing into the file the second had renamed into place, and the finished export's file no longer
    matched its end record, nor imported."""
    import hashlib

    settings.VAR_DIR = tmp_path
    for number in range(3):
        snapshot_record(session=make_session(project, f"run-{number}"), state={"n": number, "pad": "x" * 2000})
    job = jobs.job_create(kind=JobKind.EXPORT, project=project, enqueue=lambda job_id: None)
    first = jobs.job_start(job_id=job.pk)
    finished: dict = {}

    def second_takes_over(done: int, total: int | None = None, *, force: bool = False) -> None:
        if finished or done == 0:  # (0: before the first attempt opened its file; this is mid-write)
            return
        Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS + 1))
        second = jobs.job_start(job_id=job.pk)  # the first looked dead, but was only paused
        finished.update(transfer_export_run(project=project, job=second))
        jobs.job_finish(job=second, result=finished)

    with pytest.raises(jobs.JobSuperseded):
        transfer_export_run(project=project, job=first, progress=second_takes_over)
    final = Path(finished["path"])
    assert [path.name for path in final.parent.iterdir()] == [final.name]  # the first's file went
    lines = final.read_bytes().splitlines(keepends=True)
    end = orjson.loads(lines[-1])
    assert end["type"] == "end" and end["sha256"] == hashlib.sha256(b"".join(lines[:-1])).hexdigest()
    target = make_project("restored")
    assert transfer_import_run(project=target, path=final)["versions"] == 3


@pytest.mark.django_db
def test_a_superseded_export_attempt_leaves_the_file_the_owner_is_writing(project, settings, tmp_path):
    """An attempt that went on after being taken over removed every attempt's file as it began writing:
    the owner's too, whose export then failed on its rename."""
    settings.VAR_DIR = tmp_path
    snapshot_record(session=make_session(project, "run"), state={"n": 1})
    job = jobs.job_create(kind=JobKind.EXPORT, project=project, enqueue=lambda job_id: None)
    first = jobs.job_start(job_id=job.pk)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS + 1))
    second = jobs.job_start(job_id=job.pk)
    (tmp_path / "exports").mkdir()
    owners = tmp_path / "exports" / f"{project.slug}-project-{job.pk}.ndjson.partial-{second.attempts}"
    owners.write_bytes(b"being written")
    with pytest.raises(jobs.JobSuperseded):
        transfer_export_run(project=project, job=first)
    assert [path.name for path in (tmp_path / "exports").iterdir()] == [owners.name]
    finished = transfer_export_run(project=project, job=second)
    assert [path.name for path in (tmp_path / "exports").iterdir()] == [finished["file"]]


@pytest.mark.django_db
def test_a_job_still_waiting_is_sent_again_once_per_wait_not_every_minute(project):
    lost = _queued(project)
    Job.objects.filter(pk=lost.pk).update(created_at=timezone.now() - jobs.STALE_QUEUED - timedelta(seconds=1))
    assert tasks.jobs_requeue_stale() == 1  # to the broker: it may be waiting behind a long job
    assert tasks.jobs_requeue_stale() == 0
    Job.objects.filter(pk=lost.pk).update(resent_at=timezone.now() - jobs.STALE_QUEUED - timedelta(seconds=1))
    assert tasks.jobs_requeue_stale() == 1


@pytest.mark.django_db(transaction=True)
def test_an_import_shows_its_progress_while_it_stores_and_a_duplicate_delivery_does_not_wait(
    project, settings, tmp_path, monkeypatch
):
    """Storing an import is one long transaction. Its progress and heartbeat still reach the job's
    row (an operator polling the API sees it move, not sit at the end of verifying), and a second
    delivery of the job does nothing at once instead of parking a worker until that commit."""
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL", 0)
    settings.VAR_DIR = tmp_path
    session = make_session(project, "to-move")
    for step in range(30):
        snapshot_record(session=session, state={"step": step, "notes": [f"note {k} of {step}" for k in range(step)]})
    path = Path(transfer_export_run(project=project)["path"])
    job = jobs.job_create(kind=JobKind.IMPORT, project=make_project("target"), enqueue=lambda job_id: None)
    job = jobs.job_start(job_id=job.pk)
    assert job is not None
    seen: list[tuple[int, int, object, object]] = []
    besides: list[threading.Thread] = []

    def from_beside(done: int) -> None:
        # Another connection, as the API (or a duplicate delivery) would be.
        try:
            deadline = time.monotonic() + 10
            row = Job.objects.get(pk=job.pk)
            while row.done < done and time.monotonic() < deadline:
                time.sleep(0.02)
                row = Job.objects.get(pk=job.pk)
            seen.append((row.done, row.total, row.heartbeat_at, jobs.job_start(job_id=job.pk)))
        finally:
            connection.close()

    with jobs.Heartbeat(job) as heartbeat:
        progress = jobs.Progress(job, heartbeat)

        def watching(done: int, total: int | None = None, *, force: bool = False) -> None:
            progress(done, total, force=force)
            if connection.in_atomic_block and not besides:  # storing: the import's transaction is open
                besides.append(threading.Thread(target=from_beside, args=(done,)))
                besides[0].start()
                besides[0].join(timeout=15)
                assert seen, "the job's row could not be read or started from beside the import's transaction"

        try:
            transfer_import_run(project=job.project, path=path, job=job, progress=watching)
        finally:
            for beside in besides:
                beside.join()

    [(done, total, heartbeat_at, duplicate)] = seen
    verified = total // 2  # read and verified, then stored: every node and version counts twice
    assert verified < done < total
    assert heartbeat_at > Job.objects.get(pk=job.pk).started_at
    assert duplicate is None  # the delivery that runs it is about to commit
    job.refresh_from_db()
    assert (job.status, job.done, job.result["versions"]) == (JobStatus.DONE, job.total, 30)


@pytest.mark.parametrize("raised_by", ["django", "driver"])
@pytest.mark.django_db(transaction=True)
def test_a_job_that_loses_its_database_says_so_in_the_log_by_its_id(project, caplog, raised_by):
    """Celery logs the error under the task's id only: at 3 a.m. the log must name the job, and what
    happens to it next (it stays running, and is sent again once its heartbeat is stale). Django lets
    psycopg's own error through where it closes a server-side cursor (.iterator()): a compaction whose
    connection was cut just then failed "AdminShutdown" instead."""
    import psycopg

    from tests.liveserver import database_url

    job = _queued(project)

    port = connection.settings_dict["PORT"]

    def work(job: Job, progress: jobs.Progress) -> dict:
        with psycopg.connect(database_url(), autocommit=True) as admin:  # what a failover does to us
            admin.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])
        connection.settings_dict["PORT"] = "1"  # and the database stays away: nothing listens there
        if raised_by == "driver":
            raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")
        Version.objects.count()
        return {}

    try:
        # Said once, by the job's id: no exception left for Celery to log again as a traceback.
        assert tasks._run_job(job.pk, work) is None
    finally:
        connection.close()
        connection.settings_dict["PORT"] = port

    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING  # not the job's fault: it is resumed, not failed
    assert timezone.now() - job.heartbeat_at < jobs.stale_after()  # left to go stale: nobody could date it back
    assert any(f"job {job.pk} (scrub, attempt 1) lost the database" in message
               and "it stays running and is sent again once its heartbeat is" in message for message in caplog.messages)


@pytest.mark.django_db(transaction=True)
def test_the_minutely_requeue_says_in_one_line_that_the_database_is_away(caplog):
    """Beat sends jobs_requeue_stale every minute: while the database was down each run was a
    traceback in the worker's log."""
    port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = "1"  # nothing listens there
    try:
        assert tasks.jobs_requeue_stale() == 0
    finally:
        connection.close()
        connection.settings_dict["PORT"] = port
    lines = [record for record in caplog.records if record.name.startswith("snapshots_app")]
    assert len(lines) == 1 and lines[0].getMessage().startswith(
        "jobs_requeue_stale: the database does not answer (") and lines[0].exc_info is None

"""Background work on versions. Tasks take ids, are idempotent and safe to retry or kill.

Late ack is on (CELERY_TASK_ACKS_LATE, reject on worker lost): a task whose worker dies is delivered
again, so each task may run twice or resume after a kill; the services they call are written for it.
Long work runs as a Job (snapshots_app.jobs) whose progress the UI shows live.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
from celery import current_task, shared_task
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from sessions_app import events
from sessions_app.errors import IntegrityProblem, InvalidState, StateStoreError, first_line
from sessions_app.models import Project
from snapshots_app import jobs
from snapshots_app.models import IntegrityProblem as IntegrityProblemRow
from snapshots_app.models import Job, JobKind, JobStatus, Version

logger = logging.getLogger(__name__)

SUMMARY_PATHS = 20
FINALIZE_GRACE = timedelta(minutes=2)  # versions older than this without a summary were missed
FINALIZE_PENDING_MAX = 10_000  # per catch-up run (every 5 min): an outage's backlog clears in a run or two
FINALIZE_BATCH = 100


# Retried on a lost broker or database (a restart), 4, 8, 16, 32 and 64 s later: ~2 minutes, where the
# default full jitter spent all five retries within seconds of an outage's start, each message then
# failing with a traceback. Beat's finalize_pending catches up on the rest.
@shared_task(acks_late=True, autoretry_for=(ConnectionError, OperationalError, InterfaceError), retry_backoff=4,
             retry_backoff_max=64, retry_jitter=False, max_retries=5)
def finalize_versions(version_ids: list[int]) -> int:
    """Compute the change summary (against its parent, for the timeline) of each of these versions
    of one session, written in a burst (one message for all of them, see
    snapshots_app.services._after_commit), announced as one event. Idempotent; returns how many
    summaries it wrote."""
    written = []
    for version_id in version_ids:
        finalized = _finalize(version_id)
        if finalized is not None and finalized[2]:
            written.append(finalized)
    if written:
        _announce_finalized(written[0][0], written[-1][0], written[-1][1])
    return len(written)


def _finalize(version_id: int) -> tuple[Version, dict[str, Any], bool] | None:
    """The version, its summary and whether this call wrote it; None if the version is gone or
    failed verification (recorded as integrity problems)."""
    from snapshots_app.selectors import version_diff

    version = Version.objects.select_related("session", "parent__session").filter(pk=version_id).first()
    if version is None:
        return None  # deleted meanwhile: nothing to do
    if version.summary is not None:
        return version, version.summary, False
    parent = version.parent
    if parent is None:
        summary = {"added": 0, "removed": 0, "changed": 0, "paths": [], "bytes_added": version.logical_size,
                   "initial": True}
    elif parent.checksum == version.checksum:
        summary = {"added": 0, "removed": 0, "changed": 0, "paths": [], "bytes_added": 0}
    else:
        try:
            result = version_diff(parent, version)
        except IntegrityProblem:
            _record_integrity_problems(parent, version)
            return None
        counts = result.counts
        # One entry per path: two changes inside one JSON string share its string_path.
        paths = list(dict.fromkeys(change.get("string_path", change["path"]) for change in result.changes))
        summary = {
            **counts,
            # jsonb cannot hold NUL, which a state's keys may (the state itself is stored as bytes).
            "paths": [path.replace("\x00", "\\u0000") for path in paths[:SUMMARY_PATHS]],
            "total_paths": len(paths),
            "bytes_added": version.logical_size - parent.logical_size,
        }
    summary["stored_bytes"] = version.stored_size
    summary["finalized_at"] = timezone.now().isoformat()
    with transaction.atomic():
        updated = Version.objects.filter(pk=version_id, summary__isnull=True).update(summary=summary)
    return version, summary, bool(updated)


def _announce_finalized(first: Version, last: Version, summary: dict[str, Any]) -> None:
    """Summaries of versions `first`..`last` of one session are in (counts: `last`'s)."""
    events.publish(
        last.session.project_id,
        "version.finalized",
        {"session": str(last.session_id), "version": last.number, "first": first.number,
         **{key: summary[key] for key in ("added", "removed", "changed", "bytes_added")}},
        session_id=last.session_id,
    )


def _record_integrity_problems(*versions: Version) -> None:
    from snapshots_app.integrity import _verify, integrity_problem_record

    for version in versions:
        problem = _verify(version)
        if problem is not None:
            integrity_problem_record(version=version, detail=problem)


@shared_task(acks_late=True)
def finalize_pending() -> int:
    """Catch up on versions whose finalize task was lost (e.g. the broker was down at commit).

    Not those whose diff failed verification (an open integrity problem of the version or of its
    parent): they were diffed again every run, reading both states to fail the same way, and enough
    of them (a restore gone wrong) filled every run's FINALIZE_PENDING_MAX, so no missed version
    after them was ever summarised. Once the problem is resolved (the version verifies again) the
    next run summarises it."""
    cutoff = timezone.now() - FINALIZE_GRACE
    damaged = IntegrityProblemRow.objects.filter(resolved_at__isnull=True)
    pending = (
        Version.objects.filter(summary__isnull=True, created_at__lt=cutoff)
        .exclude(Exists(damaged.filter(version_id=OuterRef("pk"))))
        .exclude(Exists(damaged.filter(version_id=OuterRef("parent_id"))))
        .order_by("id")
    )
    missed = list(pending.values_list("id", "session_id")[:FINALIZE_PENDING_MAX])
    by_session: dict[Any, list[int]] = {}
    for version_id, session_id in missed:
        by_session.setdefault(session_id, []).append(version_id)
    for ids in by_session.values():
        finalize_in_batches(ids)
    return len(missed)


def finalize_in_batches(version_ids: list[int]) -> None:
    """Queue the summaries of these versions of one session: one message per FINALIZE_BATCH of them."""
    for start in range(0, len(version_ids), FINALIZE_BATCH):
        finalize_versions.delay(version_ids[start:start + FINALIZE_BATCH])


# --------------------------------------------------------------------------------------------------
# Jobs


# A lost connection as Django raises it, and as psycopg does where Django lets the driver's error through
# (closing a server-side cursor, .iterator(): a connection cut just then failed the job "AdminShutdown").
DATABASE_AWAY = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)


def _again_once_stale(job_id: int) -> None:
    """A delivery sent again at once because the worker process running the job was killed (Celery's
    WorkerLostError requeues it) finds that attempt's heartbeat still fresh, and does nothing: the job
    then waited for beat's requeue, up to a minute past JOB_STALE_SECONDS. Such a redelivery is sent
    again for when that heartbeat goes stale (a live attempt's is fresh again by then: nothing happens)."""
    request = getattr(current_task, "request", None)  # (None outside a task)
    if request is None or not (request.delivery_info or {}).get("redelivered"):
        return
    wait = jobs.seconds_until_stale(job_id)
    if wait is not None:
        current_task.apply_async((job_id,), countdown=wait + 1)
        logger.info("job %s: this redelivery is sent again in %.0f s, when the attempt's heartbeat is stale if its "
                    "worker died", job_id, wait + 1)


def _run_job(job_id: int, work: Callable[[Job, jobs.Progress], dict[str, Any] | None]) -> dict[str, Any] | None:
    job = jobs.job_start(job_id=job_id)
    if job is None:
        _again_once_stale(job_id)
        return None  # gone, finished, or running elsewhere: nothing to do
    try:
        with jobs.Heartbeat(job) as heartbeat:
            result = work(job, jobs.Progress(job, heartbeat))
    except StateStoreError as exc:
        jobs.job_fail(job=job, error=exc.message, code=exc.code)
        return None
    except jobs.JobSuperseded as exc:
        logger.warning("%s; this attempt stops", exc)
        return None
    except DATABASE_AWAY as exc:
        # The database went away (restart, failover, a cut connection): not the job's fault. If it
        # answers again the job is sent again now; if not, it stays running, its heartbeat stops, and
        # jobs_requeue_stale sends it once the database is back (a cut connection used to wait for
        # that too: ~2.5 min showing "running"). Celery's own log of the error names the task, not
        # the job: say which one, and what happens next.
        reason = first_line(exc)
        if jobs.job_release(job=job) and _send_job(job):
            logger.warning("job %s (%s, attempt %s) lost the database (%s); the database answers again: it is sent "
                           "again now and resumes from what was committed", job.pk, job.kind, job.attempts, reason)
        else:
            logger.warning("job %s (%s, attempt %s) lost the database (%s); it stays running and is sent again "
                           "once its heartbeat is %s s old", job.pk, job.kind, job.attempts, reason,
                           int(jobs.stale_after().total_seconds()))
        connection.close()
        return None  # (raised, Celery followed that line with the same error's 120-line traceback)
    except Exception as exc:
        # Unexpected: fail the job visibly (its progress would otherwise spin forever), then let
        # Celery log the traceback (which names the task, not the job).
        logger.error("job %s (%s, attempt %s) failed: %s: %s", job.pk, job.kind, job.attempts, type(exc).__name__, exc)
        jobs.job_fail(job=job, error=f"{type(exc).__name__}: {exc}")
        raise
    job.refresh_from_db(fields=["status"])
    if result is not None and not job.is_finished:
        jobs.job_finish(job=job, result=result)
    return result


@shared_task(acks_late=True)
def compaction_job(job_id: int) -> dict | None:
    """Retention (unless the job says not to) and garbage collection of one project."""
    from snapshots_app.compaction import compaction_run

    def work(job: Job, progress: jobs.Progress) -> dict[str, Any]:
        assert job.project is not None
        result = compaction_run(
            project=job.project, apply_retention=bool(job.params.get("apply_retention", True)), progress=progress,
            actor=job.created_by, actor_label=job.created_by_label, job_id=job.pk,
        )
        if job.attempts > 1:
            # What the dead attempts freed and how long they took is not known here: the figures that
            # read as the whole job's said less than it did, with nothing to tell.
            result["figures_of_last_attempt_only"] = [
                "nodes_freed", "bytes_freed", "bytes_before", "nodes_recompressed", "bytes_saved_by_recompression",
                "retention_seconds", "gc_seconds", "seconds", "seconds_per_1000_versions",
            ]
        return result

    return _run_job(job_id, work)


@shared_task(acks_late=True)
def integrity_scrub_job(job_id: int) -> dict | None:
    from snapshots_app.integrity import ids_of_runs, integrity_scrub_run

    def work(job: Job, progress: jobs.Progress) -> dict[str, Any]:
        chosen = job.params.get("versions")  # the versions an operator selected in the admin
        return integrity_scrub_run(project=job.project, budget=job.params.get("budget") or None,
                                   versions=None if chosen is None else ids_of_runs(chosen), job=job, progress=progress)

    return _run_job(job_id, work)


@shared_task(acks_late=True)
def export_job(job_id: int) -> dict | None:
    from snapshots_app.transfer import transfer_export_run

    def work(job: Job, progress: jobs.Progress) -> dict[str, Any]:
        assert job.project is not None
        if job.params.get("scope") == "session" and job.session is None:
            raise StateStoreError("the session to export was deleted")
        return transfer_export_run(project=job.project, session=job.session, job=job, progress=progress,
                                   skip_damaged=bool(job.params.get("skip_damaged")))

    return _run_job(job_id, work)


@shared_task(acks_late=True)
def import_job(job_id: int) -> dict | None:
    from snapshots_app.transfer import import_path, transfer_import_run

    def work(job: Job, progress: jobs.Progress) -> dict[str, Any]:
        assert job.project is not None
        if not import_path(job).is_file():
            # The upload is kept where the web process that took it wrote it. A worker that does not
            # see it failed as an unexpected FileNotFoundError, the server's path as the job's error.
            raise InvalidState(
                f"the uploaded file {job.params.get('file')} is not in this worker's VAR_DIR/imports: the web "
                "processes and the workers must share VAR_DIR (one file system); upload the file again"
            )
        result = transfer_import_run(
            project=job.project, path=import_path(job), job=job, actor=job.created_by,
            actor_label=job.created_by_label, progress=progress, skip_existing=bool(job.params.get("skip_existing")),
        )
        import_path(job).unlink(missing_ok=True)  # imported (and the job finished) in one commit
        return result

    try:
        return _run_job(job_id, work)
    finally:
        _forget_upload_of_failed_import(job_id)


def _forget_upload_of_failed_import(job_id: int) -> None:
    """A failed job is never run again (the file must be sent anew), so its uploaded file, a whole
    project's states readable by the service, is nobody's: remove it (it stayed forever). An import
    still running or waiting for its next attempt keeps it."""
    from snapshots_app.transfer import import_path

    try:
        job = Job.objects.filter(pk=job_id, kind=JobKind.IMPORT, status=JobStatus.FAILED).first()
        if job is not None and import_path(job).exists():
            import_path(job).unlink(missing_ok=True)
            logger.info("import job %s failed (%s); its uploaded file %s is removed", job.pk, job.error[:200],
                        job.params.get("file"))
    except (OperationalError, InterfaceError):  # the database is away: the task's own error says so
        connection.close()


# --------------------------------------------------------------------------------------------------
# Beat schedule entry points (see CELERY_BEAT_SCHEDULE)


@shared_task(acks_late=True)
def transfer_files_sweep() -> dict[str, int]:
    """Hourly: expired export files and orphaned import uploads leave the disk (see transfer)."""
    from snapshots_app import transfer

    return transfer.transfer_files_sweep()


@shared_task(acks_late=True)
def compaction_scheduled() -> int:
    """Queue a compaction for every project (retention applies only where a policy is enabled)."""
    from snapshots_app.compaction import compaction_start

    count = 0
    for project in Project.objects.order_by("id"):
        if Job.objects.filter(project=project, kind=JobKind.COMPACTION, status=JobStatus.QUEUED).exists():
            continue  # the previous one has not started yet: a second would only repeat its work
        compaction_start(project=project, actor_label="schedule")
        count += 1
    return count


@shared_task(acks_late=True)
def integrity_scrub_scheduled() -> int:
    """Queue a rolling-window scrub per project (budget: settings.INTEGRITY_SCRUB_BUDGET versions)."""
    from snapshots_app.integrity import integrity_scrub_start

    count = 0
    for project in Project.objects.order_by("id"):
        waiting = Job.objects.filter(project=project, kind=JobKind.SCRUB, status=JobStatus.QUEUED)
        # A scrub still waiting would walk the same window: no second one. One verifying an admin's
        # selection (its `versions`) leaves the rolling window where it is, so it does not count.
        if waiting.exclude(params__has_key="versions").exists():
            continue
        integrity_scrub_start(project=project, actor_label="schedule")
        count += 1
    return count


@shared_task(acks_late=True)
def jobs_sweep() -> int:
    """Daily: jobs that finished more than JOB_KEEP_DAYS ago are deleted (see jobs.jobs_sweep)."""
    return jobs.jobs_sweep()


@shared_task(acks_late=True)
def jobs_requeue_stale() -> int:
    """Send again the jobs still queued long after creation (their first enqueue was lost) and the
    running ones whose heartbeat stopped (their worker died or lost the database)."""
    try:
        return _requeue_stale()
    except (OperationalError, InterfaceError) as exc:
        # Beat sends this every minute: while the database is away, one line each time, not a traceback.
        logger.warning("jobs_requeue_stale: the database does not answer (%s); the next run looks again", first_line(exc))
        connection.close()
        return 0


def _requeue_stale() -> int:
    now = timezone.now()
    silent = now - jobs.stale_after()
    stale = Job.objects.filter(
        # Never handed to the broker (it was down when the job started): now that this task runs, it is back.
        Q(status=JobStatus.QUEUED, send_failed_at__isnull=False)
        | (
            Q(status=JobStatus.QUEUED, created_at__lt=now - jobs.STALE_QUEUED)
            | Q(status=JobStatus.RUNNING, heartbeat_at__lt=silent)
            | Q(status=JobStatus.RUNNING, heartbeat_at__isnull=True, started_at__lt=silent)
        ) & (
            # Sent again once per wait: a job queued behind a long one is not sent again every minute.
            Q(resent_at__isnull=True) | Q(resent_at__lt=now - jobs.STALE_QUEUED, status=JobStatus.QUEUED)
            | Q(resent_at__lt=silent, status=JobStatus.RUNNING)
        )
    ).order_by("id")
    sent = []
    for job_id, kind, status, attempts, refused, last_sign in stale.values_list(
        "id", "kind", "status", "attempts", "send_failed_at", Coalesce("heartbeat_at", "started_at", "created_at")
    )[:500]:
        _job_task(kind).delay(job_id)
        sent.append(job_id)
        # Said in the log: nothing there told an operator that a worker had died mid-job, nor why a job
        # started over.
        why = ("its worker went silent" if status == JobStatus.RUNNING
               else "the broker refused its message" if refused else "no worker took it")
        logger.warning("job %s (%s) sent again: %s %s ago; the worker that takes it makes attempt %s",
                       job_id, kind, why, jobs.for_how_long(now - (refused or last_sign)), attempts + 1)
    Job.objects.filter(pk__in=sent).update(resent_at=now, send_failed_at=None)
    return len(sent)


def _job_task(kind: str) -> Any:
    """The task that runs jobs of this kind."""
    return {
        JobKind.COMPACTION: compaction_job, JobKind.GC: compaction_job, JobKind.SCRUB: integrity_scrub_job,
        JobKind.EXPORT: export_job, JobKind.IMPORT: import_job,
    }[JobKind(kind)]


def _send_job(job: Job) -> bool:
    """Hand the job to the workers again; False if the broker refused (the requeue sends it later)."""
    try:
        _job_task(job.kind).delay(job.pk)
    except Exception:  # noqa: BLE001 - its heartbeat is stale already: jobs_requeue_stale sends it
        logger.warning("job %s could not be sent again (the broker refused); the periodic requeue sends it", job.pk)
        return False
    return True

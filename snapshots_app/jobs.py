"""Long background jobs (compaction, scrub, export, import): their rows, progress and live events.

A job row is created by the service that starts the work, in the caller's transaction; its task is
enqueued after commit with the job's id. The task may be delivered twice or killed at any instant
(late ack), so every step a job takes is idempotent and progress is only ever advisory.

A running job beats (`heartbeat_at`, every JOB_HEARTBEAT_SECONDS, from a thread beside the work). A
delivery of a job whose heartbeat is fresh is a duplicate and does nothing; a job whose heartbeat
went stale (its worker was killed, or lost the database) is sent again by jobs_requeue_stale, and
the delivery that takes it over counts an attempt. Only the attempt that owns the job may finish
or fail it, so a duplicate or a superseded attempt never overwrites the outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F, QuerySet, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from config.celery import app as celery_app
from sessions_app import background, events
from sessions_app.errors import first_line
from sessions_app.models import Project, WorkflowSession
from sessions_app.services import RequestKey, User, actor_fields, create_once
from snapshots_app.models import Job, JobKind, JobStatus

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between progress writes/events: the UI needs a pulse, not a firehose
JOB_LOCK_CLASS = 4243  # advisory lock class of job_hold (store.PROJECT_LOCK_CLASS is 4242)
MAX_ATTEMPTS = 5  # a job whose worker keeps dying (e.g. out of memory) is failed, not retried forever


def stale_after() -> timedelta:
    """How long a running job's heartbeat may be silent before it is taken for dead."""
    return timedelta(seconds=settings.JOB_STALE_SECONDS)


def seconds_until_stale(job_id: int) -> float | None:
    """How long until the running job's heartbeat is taken for dead; None unless it is running."""
    beat = Job.objects.filter(pk=job_id, status=JobStatus.RUNNING).values_list("heartbeat_at", flat=True).first()
    if beat is None:
        return None
    return max((beat + stale_after() - timezone.now()).total_seconds(), 0.0)


STALE_QUEUED = timedelta(minutes=10)  # a job queued this long was never delivered: tasks.jobs_requeue_stale sends it again


def for_how_long(interval: timedelta) -> str:
    seconds = max(int(interval.total_seconds()), 0)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"


def job_is_stalled(job: Job, *, now: datetime | None = None) -> bool:
    """Running, but its worker has been silent for JOB_STALE_SECONDS: taken for dead (killed, or cut
    off from the database), so beat's next jobs_requeue_stale sends it again."""
    last_sign = job.heartbeat_at or job.started_at
    return job.status == JobStatus.RUNNING and last_sign is not None and (now or timezone.now()) - last_sign >= stale_after()


def job_condition(job: Job, *, now: datetime | None = None) -> str | None:
    """Where an unfinished job stands, in words, for whoever watches it (None once it finished).

    A running job whose worker was killed looks like any other running job, its progress frozen,
    until the requeue takes it over (JOB_STALE_SECONDS and up to a minute more): this says which it
    is, what happens next, and when nothing will without an operator (no worker takes it)."""
    now = now or timezone.now()
    if job.status == JobStatus.QUEUED:
        if job.send_failed_at is not None:
            return (f"not sent yet: the broker refused its message {for_how_long(now - job.send_failed_at)} ago; it is sent "
                    "at the next requeue (every minute) that reaches the broker")
        waited = now - job.created_at
        if waited < STALE_QUEUED:
            return f"waiting for a worker ({for_how_long(waited)} so far)"
        return (f"waiting for a worker for {for_how_long(waited)}; sent again every {for_how_long(STALE_QUEUED)}: if it stays "
                "queued, check that workers are running and reach the broker")
    if job.status != JobStatus.RUNNING:
        return None
    last_sign = job.heartbeat_at or job.started_at or now
    silent = now - last_sign
    if not job_is_stalled(job, now=now):
        again = (f" (attempt {job.attempts}, taken over after a worker died: its progress counts what was left)"
                 if job.attempts > 1 else "")
        return f"running{again}: its worker reported {for_how_long(silent)} ago"
    requeue_every = timedelta(seconds=settings.JOB_REQUEUE_EVERY)
    if silent >= stale_after() + 2 * requeue_every:  # the requeue should have sent it a minute ago at least
        if job.resent_at is None or job.resent_at < last_sign:
            return (f"stalled: its worker has been silent for {for_how_long(silent)} and it was not sent again: "
                    "jobs_requeue_stale has not run (beat sends it each minute, a worker runs it: check that "
                    "celery beat and at least one worker are running)")
        return (f"stalled: its worker has been silent for {for_how_long(silent)}; sent again {for_how_long(now - job.resent_at)} "
                "ago, no worker has taken it yet: the workers are busy, or none is running")
    what_next = ("the next delivery marks it failed (its worker died on every attempt)" if job.attempts >= MAX_ATTEMPTS
                 else "it is sent again within a minute and resumes from what was committed")
    return (f"stalled: its worker has been silent for {for_how_long(silent)} (killed, or cut off from the database) and is "
            f"taken for dead; {what_next}")


def job_event(job: Job) -> dict[str, Any]:
    return {
        "job": job.pk,
        "kind": job.kind,
        "status": job.status,
        "done": job.done,
        "total": job.total,
        "session": str(job.session_id) if job.session_id else None,
        "error": job.error[:500],
    }


def _publish(job: Job, event: str) -> None:
    if job.project_id is None:
        return
    payload = job_event(job)
    events.publish_after_commit(job.project_id, event, payload, session_id=job.session_id)


def job_for_request(request: RequestKey | None) -> Job | None:
    """The job an earlier request with this key started (None if none did)."""
    return None if request is None else request.find(Job.objects.all())


@transaction.atomic
def job_create(
    *,
    kind: str,
    project: Project | None,
    session: WorkflowSession | None = None,
    params: dict[str, Any] | None = None,
    actor: User = None,
    actor_label: str = "",
    enqueue: Callable[[int], None],
    request: RequestKey | None = None,
) -> Job:
    """A queued job; `enqueue(job_id)` runs after commit so the worker always finds the row.

    With a `request` key, a retry gets the job its first request started, and nothing new is
    queued; retries that race each other make one job (the unique key settles it)."""
    who = actor_fields(actor, actor_label)
    job, created = create_once(request, Job.objects.all(), lambda **keyed: Job.objects.create(
        kind=JobKind(kind), project=project, session=session, params=params or {},
        created_by=who["actor"], created_by_label=who["actor_label"], **keyed,
    ))
    if not created:
        return job
    _publish(job, "job.created")
    if celery_app.conf.task_always_eager:
        transaction.on_commit(lambda: _enqueue_safely(enqueue, job.pk))  # no broker: the job runs here, now
    else:
        # From the background thread: a broker that is down or hung (a publish can wait for minutes)
        # must not hold the request that started the job. The row is committed either way.
        background.after_commit(lambda: _enqueue_safely(enqueue, job.pk))
    return job


def _enqueue_safely(enqueue: Callable[[int], None], job_id: int) -> None:
    # The job row is committed; a broker outage must not turn the caller's success into an error.
    # The job says so (`send_failed_at`, shown by the API), and jobs_requeue_stale sends it on its
    # first run once the broker is back, not only when it has waited STALE_QUEUED.
    try:
        enqueue(job_id)
    except Exception as exc:  # noqa: BLE001 - whatever the broker raised: the job row says so, requeue sends it
        # One line, as a failed finalize send or requeue logs: an outage of the broker is no bug in
        # this code, and Celery's chained retries made ~115 lines of traceback per job started.
        logger.error("could not enqueue job %s (%s: %s); it stays queued for the periodic requeue", job_id,
                     type(exc).__name__, first_line(exc))
        Job.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(send_failed_at=timezone.now())


@transaction.atomic
def job_start(*, job_id: int) -> Job | None:
    """Mark a delivery of the job as running (a new attempt, which owns the job from now on).

    None if the job is gone or finished, or if another delivery is running it (its heartbeat is
    fresh): nothing to do. A job whose heartbeat went stale is taken over and started again: the
    work is idempotent and resumes from what the previous attempt committed.
    """
    if not _job_lock(job_id, wait=False):
        logger.info("job %s is being committed by the delivery that runs it; this delivery does nothing", job_id)
        return None
    job = Job.objects.select_for_update().filter(pk=job_id).first()
    if job is None or job.is_finished:
        return None
    now = timezone.now()
    if job.status == JobStatus.RUNNING and job.heartbeat_at is not None and now - job.heartbeat_at < stale_after():
        # Also what a delivery sent again at once after its worker was killed (Celery's WorkerLostError)
        # meets: "running elsewhere" alone read as if it were, while the job waited for the requeue.
        logger.info("job %s has an attempt whose heartbeat is %.0f s old: it runs elsewhere, or its worker just died "
                    "(then the requeue sends it again once that heartbeat is %.0f s old); this delivery does nothing",
                    job.pk, (now - job.heartbeat_at).total_seconds(), stale_after().total_seconds())
        return None
    if job.attempts >= MAX_ATTEMPTS:
        job_fail(job=job, error=f"gave up after {job.attempts} attempts: the worker died each time (see its logs)")
        return None
    job.status = JobStatus.RUNNING
    job.attempts = F("attempts") + 1
    job.started_at = job.started_at or now
    job.heartbeat_at = now
    job.send_failed_at = None  # a message got through after all
    job.save(update_fields=["status", "attempts", "started_at", "heartbeat_at", "send_failed_at"])
    job.refresh_from_db()
    _publish(job, "job.progress")
    return job


class Heartbeat:
    """While the block runs, a thread stamps the job's heartbeat every JOB_HEARTBEAT_SECONDS (on a
    connection of its own: the work may hold its connection in a long transaction). The same thread
    writes the progress the work makes inside such a transaction (see `report`). A job that ends
    sooner and reports nothing never touches the database from the thread."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._reported: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._beat, name=f"job-{job.pk}-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=settings.JOB_HEARTBEAT_SECONDS)

    def report(self, done: int, total: int) -> None:
        """Progress made inside the work's transaction, which its own connection could show only
        once it commits: the thread writes it now (the latest report wins)."""
        with self._lock:
            self._reported = (done, total)
        self._wake.set()

    def _beat(self) -> None:
        interval = settings.JOB_HEARTBEAT_SECONDS
        next_beat = time.monotonic() + interval
        try:
            while True:
                self._wake.wait(max(0.0, next_beat - time.monotonic()))
                if self._stop.is_set():
                    return
                self._wake.clear()
                with self._lock:
                    reported, self._reported = self._reported, None
                if reported is None and time.monotonic() < next_beat:
                    continue
                next_beat = time.monotonic() + interval
                try:
                    self._write(reported)
                except Exception:  # the database is away: the beat stops showing, which is the point
                    logger.warning("job %s: heartbeat not recorded", self.job.pk, exc_info=True)
                    connection.close()
        finally:
            connection.close()

    def _write(self, reported: tuple[int, int] | None) -> None:
        fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
        if reported is not None:
            fields["done"], fields["total"] = reported
        owned = Job.objects.filter(pk=self.job.pk, status=JobStatus.RUNNING, attempts=self.job.attempts)
        if owned.update(**fields) and reported is not None and self.job.project_id is not None:
            # Not after commit: this connection is in autocommit, and the event is advisory.
            payload = {**job_event(self.job), "done": reported[0], "total": reported[1]}
            events.publish(self.job.project_id, "job.progress", payload, session_id=self.job.session_id)


class Progress:
    """Throttled progress reporting for one running job (each write is its own short transaction;
    inside the work's own transaction, where a write would stay invisible until it commits, the
    heartbeat's thread writes it)."""

    def __init__(self, job: Job, heartbeat: Heartbeat) -> None:
        self.job = job
        self.heartbeat = heartbeat
        self._last = 0.0

    def __call__(self, done: int, total: int | None = None, *, force: bool = False) -> None:
        self.job.done = done
        if total is not None:
            self.job.total = total
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        # (On SQLite, a write beside a write transaction would only wait for it: no use.)
        if connection.in_atomic_block and connection.vendor == "postgresql":
            self.heartbeat.report(self.job.done, self.job.total)
        else:
            job_progress(job=self.job, done=self.job.done, total=self.job.total)


@transaction.atomic
def job_progress(*, job: Job, done: int, total: int) -> None:
    Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(done=done, total=total)
    job.done, job.total = done, total
    _publish(job, "job.progress")


class JobSuperseded(Exception):
    """This attempt no longer owns its job (another delivery took it over, or it finished)."""


def _owned(job: Job) -> QuerySet[Job]:
    """The job's row, if it is unfinished and still `job`'s attempt (not taken over since)."""
    return Job.objects.filter(pk=job.pk, attempts=job.attempts).exclude(status__in=[JobStatus.DONE, JobStatus.FAILED])


def job_hold(*, job: Job) -> None:
    """Inside a transaction that will finish the job with what it commits (an import): make sure no
    other delivery takes the job over before that commit, or raise JobSuperseded, so this attempt
    commits nothing.

    An advisory lock (which job_start takes too), not a lock on the job's row: the heartbeat and
    the progress of that long transaction are written to the row from beside it meanwhile.
    """
    _job_lock(job.pk)
    if not _owned(job).exists():
        raise JobSuperseded(f"job {job.pk}: attempt {job.attempts} was taken over or the job finished")


def _job_lock(job_id: int, *, wait: bool = True) -> bool:
    """Until the transaction ends, serialise the job's takeover (job_start) with a transaction that
    holds it (job_hold). False if `wait` is off and another transaction holds it. PostgreSQL only:
    SQLite already serialises write transactions."""
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        cursor.execute(f"SELECT {function}(%s, %s)", [JOB_LOCK_CLASS, job_id % 2**31])
        return wait or bool(cursor.fetchone()[0])


def job_release(*, job: Job) -> bool:
    """This attempt stops, its database connection lost: if the database answers again (a connection
    cut, not an outage), date its heartbeat back so that the next delivery takes the job over at once
    instead of waiting JOB_STALE_SECONDS for it to go stale. False if the database still does not
    answer (the job goes stale and the requeue sends it), or the job is no longer this attempt's."""
    connection.close()
    try:
        released = _owned(job).filter(status=JobStatus.RUNNING).update(heartbeat_at=timezone.now() - stale_after())
    except (OperationalError, InterfaceError):
        connection.close()
        return False
    return bool(released)


@transaction.atomic
def job_finish(*, job: Job, result: dict[str, Any]) -> Job:
    done, finished_at = max(job.done, job.total), timezone.now()
    if not _owned(job).update(status=JobStatus.DONE, result=result, done=done, finished_at=finished_at):
        logger.warning("job %s: finished, but it was already finished or taken over; its outcome stands", job.pk)
        return job
    job.status, job.result, job.done, job.finished_at = JobStatus.DONE, result, done, finished_at
    _publish(job, "job.finished")
    return job


@transaction.atomic
def job_fail(*, job: Job, error: str, code: str = "") -> Job:
    """`code`: the domain error's machine-readable code (errors.StateStoreError.code, such as
    import_rejected), kept as the failed job's result {"code": ...}; the message is its error."""
    error, finished_at = error[:10_000], timezone.now()
    coded = {"result": {"code": code}} if code else {}
    if not _owned(job).update(status=JobStatus.FAILED, error=error, finished_at=finished_at, **coded):
        logger.warning("job %s: failed (%s), but it was already finished or taken over; its outcome stands",
                       job.pk, error[:200])
        return job
    job.status, job.error, job.finished_at = JobStatus.FAILED, error, finished_at
    if code:
        job.result = coded["result"]
    _publish(job, "job.finished")
    return job


SWEEP_BATCH = 5_000  # job rows deleted per statement by jobs_sweep
NEWEST_FIRST = [F("finished_at").desc(), F("id").desc()]


def rolling_scrubs() -> QuerySet[Job]:
    """Finished scrubs of a rolling window (their result has the `cursor` the next one starts after;
    one over chosen versions has none). The newest of a scope, by NEWEST_FIRST, says where it resumes."""
    return Job.objects.filter(kind=JobKind.SCRUB, status=JobStatus.DONE, result__has_key="cursor")


def jobs_sweep(*, now: datetime | None = None) -> int:
    """Delete the jobs that finished more than JOB_KEEP_DAYS ago (0: keep them all), a batch at a
    time; returns how many went. Beat starts a scrub every hour and a compaction every day in each
    project, so without this the table (and every list of it) grew for good. Kept whatever their
    age: unfinished jobs, and each scope's newest scrub with a `cursor`, where the next scheduled
    scrub resumes its rolling window (integrity._last_cursor)."""
    days = int(getattr(settings, "JOB_KEEP_DAYS", 0))
    if days <= 0:
        return 0
    now = now or timezone.now()
    # The newest rolling-window scrub of each project (and of the whole service: project None).
    ranked = rolling_scrubs().annotate(rank=Window(RowNumber(), partition_by=[F("project_id")], order_by=NEWEST_FIRST))
    kept = list(ranked.filter(rank=1).values_list("pk", flat=True))
    old = (Job.objects.filter(status__in=[JobStatus.DONE, JobStatus.FAILED], finished_at__lt=now - timedelta(days=days))
           .exclude(pk__in=kept))
    removed = 0
    while batch := list(old.order_by("pk").values_list("pk", flat=True)[:SWEEP_BATCH]):
        removed += Job.objects.filter(pk__in=batch).delete()[0]
    if removed:
        logger.info("jobs: removed %s that finished more than %s days ago", removed, days)
    return removed

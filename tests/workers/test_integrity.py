"""Scrub windows, live job events and the finalize catch-up, run in-process."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from sessions_app import background
from sessions_app.events import project_group
from snapshots_app import tasks
from snapshots_app.integrity import integrity_problems, integrity_scrub_start
from snapshots_app.models import Job, JobKind, JobStatus, Version
from tests.conftest import clear_cache
from tests.workers.builders import record_history


@pytest.mark.django_db(transaction=True)
def test_a_budgeted_scrub_walks_a_rolling_window_and_wraps_around(project, eager):
    session = record_history(project, "run-w", 5, notes=1)
    ids = list(Version.objects.filter(session=session).order_by("id").values_list("id", flat=True))
    windows = []
    for _ in range(3):
        job = integrity_scrub_start(project=project, budget=2)  # runs as it is sent
        job.refresh_from_db()
        assert job.status == JobStatus.DONE and job.result["failed"] == 0
        windows.append(job.result["cursor"])
    # Versions 1-2, then 3-4, then 5 and (wrapping) 1.
    assert windows == [ids[1], ids[3], ids[0]]
    assert not integrity_problems(project=project).exists()


@pytest.mark.django_db(transaction=True)
def test_job_progress_is_broadcast_live(project, eager):
    record_history(project, "run-e", 3, notes=1)
    background.drain(30)
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(project_group(project.pk), channel)
    job = integrity_scrub_start(project=project, budget=0)  # runs as it is sent
    background.drain(30)  # the events go out on the background thread

    async def drain() -> list[dict]:
        received = []
        while True:
            try:
                received.append(await asyncio.wait_for(layer.receive(channel), timeout=0.5))
            except TimeoutError:
                return received

    messages = [m for m in async_to_sync(drain)() if m["payload"].get("job") == job.pk]
    async_to_sync(layer.group_discard)(project_group(project.pk), channel)
    names = [m["event"] for m in messages]
    assert names[0] == "job.created" and "job.progress" in names and names[-1] == "job.finished"
    assert messages[-1]["payload"]["status"] == "done" and messages[-1]["payload"]["done"] == 3


@pytest.mark.django_db(transaction=True)
def test_versions_whose_finalize_was_lost_are_caught_up(project, eager):
    session = record_history(project, "run-f", 3, notes=1)
    other = record_history(project, "run-g", 2, notes=1)
    background.drain(30)
    # Their finalize messages were lost (the broker was down at commit), ten minutes ago.
    Version.objects.update(summary=None, created_at=timezone.now() - timedelta(minutes=10))
    assert tasks.finalize_pending() == 5

    assert not Version.objects.filter(session__in=[session, other], summary__isnull=True).exists()
    summaries = list(Version.objects.filter(session=session).order_by("number").values_list("summary", flat=True))
    assert summaries[0]["initial"] is True
    assert summaries[1]["changed"] >= 1 and summaries[1]["paths"]
    assert tasks.finalize_pending() == 0


@pytest.mark.django_db(transaction=True)
def test_the_catch_up_leaves_a_damaged_version_until_its_problem_is_resolved(project, eager):
    """A version whose diff failed verification was diffed again by every catch-up run (every 5 min),
    reading both states to fail alike, and enough of them took every run's whole batch, so versions
    missed after them were never summarised. It waits for its problem's resolution instead."""
    from snapshots_app.integrity import integrity_problem_resolve
    from snapshots_app.models import IntegrityProblem, StateNode

    session = record_history(project, "run-d", 3, notes=1)
    background.drain(30)
    Version.objects.update(summary=None, created_at=timezone.now() - timedelta(minutes=10))
    damaged = Version.objects.get(session=session, number=2)
    node = StateNode.objects.filter(project=project, digest=bytes(damaged.root))
    original = node.get().data
    node.update(data=b"\x00garbage")
    clear_cache()  # (the writes left the node in the caches, which would serve it)

    assert tasks.finalize_pending() == 3  # the first run tries them all: v2 and v3 (whose parent is v2) fail
    problem = IntegrityProblem.objects.get(version=damaged, resolved_at__isnull=True)
    assert list(Version.objects.filter(session=session, summary__isnull=True).values_list("number", flat=True)
                .order_by("number")) == [2, 3]
    assert tasks.finalize_pending() == 0  # not again and again while the problem is open

    node.update(data=original)  # restored from a backup
    integrity_problem_resolve(problem=problem, resolution="restored the node from last night's backup")
    assert tasks.finalize_pending() == 2
    assert not Version.objects.filter(session=session, summary__isnull=True).exists()


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_worker_keeps_dying_is_failed_not_retried_forever(project):
    from snapshots_app.jobs import MAX_ATTEMPTS, job_create

    # Its message is delivered by hand below, as the broker would once more.
    job = job_create(kind=JobKind.SCRUB, project=project, params={"budget": 0}, enqueue=lambda job_id: None)
    type(job).objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, attempts=MAX_ATTEMPTS)

    assert tasks.integrity_scrub_job(job.pk) is None
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and "gave up" in job.error


@pytest.mark.django_db(transaction=True)
def test_a_key_holding_nul_gets_a_summary(project, session, eager):
    """A state's keys may hold NUL (the state is stored as bytes); the summary's jsonb cannot."""
    from snapshots_app.services import snapshot_record

    snapshot_record(session=session, state={"a": 1})
    version = snapshot_record(session=session, state={"a": 1, "k\x00": 2})
    background.drain(30)  # the finalize task ran on the background thread, as it was sent
    version.refresh_from_db()
    assert version.summary["paths"] == ["/k\\u0000"] and version.summary["added"] == 1


@pytest.mark.django_db(transaction=True)
def test_budgeted_scrubs_from_the_command_line_move_their_window(project):
    import json
    from io import StringIO

    from django.core.management import call_command

    record_history(project, "run-c", 5, notes=1)
    cursors = []
    for _ in range(2):
        out = StringIO()
        call_command("maintenance", "scrub", project.slug, "--budget", "2", stdout=out)
        result = json.loads(out.getvalue())
        assert result["verified"] == 2 and result["failed"] == 0
        cursors.append(result["cursor"])
    assert cursors[0] != cursors[1]


@pytest.mark.parametrize(("arguments", "said"), [
    (["scrub", "--budget", "-5"], "'-5' is not a count of versions"),  # a job that failed with a traceback
    (["scrub", "--budget", "many"], "'many' is not a count of versions"),
    (["dry-run", "--queue"], "run it without --queue"),  # it ran here, saying nothing of --queue
])
def test_maintenance_refuses_what_it_cannot_do_and_starts_nothing(project, arguments, said):
    from django.core.management import CommandError, call_command

    from snapshots_app.models import Job

    with pytest.raises(CommandError, match=re.escape(said)):
        call_command("maintenance", arguments[0], project.slug, *arguments[1:])
    assert not Job.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_scheduled_scrub_skips_a_project_only_while_its_last_scheduled_one_waits(project, eager):
    """A scrub still queued would walk the same window, so beat does not queue a second; but a
    queued verification of an admin's selection (which leaves the window alone) used to hold the
    project's scheduled scrub back until it had run."""
    session = record_history(project, "run-s", 3, notes=1)
    ids = list(Version.objects.filter(session=session).order_by("id").values_list("id", flat=True))
    selection = Job.objects.create(project=project, kind=JobKind.SCRUB, status=JobStatus.QUEUED,
                                   params={"budget": 0, "selected": 3, "versions": [[ids[0], ids[-1]]]})
    assert tasks.integrity_scrub_scheduled() == 1
    ran = Job.objects.exclude(pk=selection.pk).get(kind=JobKind.SCRUB)
    assert (ran.status, ran.created_by_label, ran.result["verified"]) == (JobStatus.DONE, "schedule", 3)

    Job.objects.create(project=project, kind=JobKind.SCRUB, status=JobStatus.QUEUED, params={"budget": 0})
    assert tasks.integrity_scrub_scheduled() == 0
    assert Job.objects.filter(kind=JobKind.SCRUB, created_by_label="schedule").count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_scheduled_compaction_skips_only_projects_whose_last_one_still_waits(project, eager):
    from tests.factories import make_project

    other = make_project("other")
    record_history(other, "run-c", 2, notes=1)
    Job.objects.create(project=project, kind=JobKind.COMPACTION, status=JobStatus.QUEUED)
    assert tasks.compaction_scheduled() == 1
    ran = Job.objects.get(kind=JobKind.COMPACTION, created_by_label="schedule")
    assert (ran.project, ran.status) == (other, JobStatus.DONE)


@pytest.mark.django_db(transaction=True)
def test_old_finished_jobs_are_swept_but_not_unfinished_ones_nor_the_scrub_window(project, eager, settings):
    """Beat starts ~25 jobs a day per project, and finished jobs used to stay for good. Those older
    than JOB_KEEP_DAYS go; the rolling scrub still resumes where it was."""
    from tests.factories import make_project

    settings.JOB_KEEP_DAYS = 90
    session = record_history(project, "run-j", 5, notes=1)
    ids = list(Version.objects.filter(session=session).order_by("id").values_list("id", flat=True))
    scrubs = [integrity_scrub_start(project=project, budget=2) for _ in range(2)]  # windows 1-2, then 3-4
    other = make_project("other")
    record_history(other, "run-o", 1, notes=1)
    elsewhere = integrity_scrub_start(project=other, budget=2)
    selection = Job.objects.create(project=project, kind=JobKind.SCRUB, status=JobStatus.DONE,
                                   params={"versions": [ids[0]]}, result={"verified": 1, "failed": 0})
    failed = Job.objects.create(project=project, kind=JobKind.EXPORT, status=JobStatus.FAILED, error="disk full")
    waiting = Job.objects.create(project=project, kind=JobKind.COMPACTION, status=JobStatus.QUEUED)
    running = Job.objects.create(project=project, kind=JobKind.COMPACTION, status=JobStatus.RUNNING)
    recent = Job.objects.create(project=project, kind=JobKind.COMPACTION, status=JobStatus.DONE,
                                finished_at=timezone.now() - timedelta(days=89))
    long_ago = timezone.now() - timedelta(days=100)
    Job.objects.exclude(pk=recent.pk).update(created_at=long_ago)
    for age, job in enumerate([*scrubs, elsewhere, selection, failed]):
        Job.objects.filter(pk=job.pk).update(finished_at=long_ago - timedelta(hours=10 - age))

    settings.JOB_KEEP_DAYS = 0
    assert tasks.jobs_sweep() == 0
    settings.JOB_KEEP_DAYS = 90
    assert tasks.jobs_sweep() == 3
    assert set(Job.objects.values_list("pk", flat=True)) == {scrubs[1].pk, elsewhere.pk, waiting.pk, running.pk, recent.pk}
    resumed = integrity_scrub_start(project=project, budget=2)
    resumed.refresh_from_db()
    assert resumed.result["cursor"] == ids[0]  # version 5, then (wrapping) 1: after the kept window


@pytest.mark.django_db(transaction=True)
def test_a_scrub_that_finds_a_problem_another_records_at_that_moment_goes_on(project):
    """Two scrubs at once (the hourly one and an admin's verify-all, or a finalize) find the same
    damaged version: the one that recorded it second hit the open-problem constraint, its job failed
    with an IntegrityError, and the versions after it in its window went unverified."""
    import contextlib
    import threading

    from django.db import IntegrityError, connection, transaction

    from snapshots_app.integrity import integrity_problem_record
    from snapshots_app.jobs import job_create
    from tests.locks import someone_waits_on_a_lock

    session = record_history(project, "run-d", 4, notes=1)  # each version is one node of its own
    damaged = Version.objects.get(session=session, number=2)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE snapshots_app_statenode SET data = overlay(data placing '\\xff'::bytea from 20 for 1) "
                       "WHERE project_id = %s AND digest = %s", [project.pk, bytes(damaged.root)])
    job = job_create(kind=JobKind.SCRUB, project=project, params={"budget": 0}, enqueue=lambda job_id: None)
    recorded, release = threading.Event(), threading.Event()

    def other_scrub() -> None:  # records the problem, and commits a moment later
        try:
            with transaction.atomic():
                integrity_problem_record(version=Version.objects.select_related("session").get(pk=damaged.pk),
                                         detail="found by the other scrub")
                recorded.set()
                release.wait(30)
        finally:
            connection.close()

    def scrub() -> None:
        try:
            with contextlib.suppress(IntegrityError):  # (the job's outcome is the test's subject)
                tasks.integrity_scrub_job(job.pk)
        finally:
            connection.close()

    other, ours = threading.Thread(target=other_scrub), threading.Thread(target=scrub)
    other.start()
    assert recorded.wait(30)
    ours.start()
    assert someone_waits_on_a_lock(ours)  # ours records the same problem, behind the other's commit
    release.set()
    other.join(30)
    ours.join(30)

    job.refresh_from_db()
    assert job.status == JobStatus.DONE, job.error
    assert (job.result["checked"], job.result["verified"], job.result["failed"]) == (4, 3, 1)
    problem = integrity_problems(project=project).get()
    assert problem.version_number == 2 and problem.found_by_id == job.pk and "version 2" in problem.detail


@pytest.mark.django_db(transaction=True)
def test_a_scrub_reading_versions_a_compaction_removes_meanwhile_records_no_problem_and_finishes(
    project, monkeypatch, caplog
):
    """Beat starts the daily compaction and the hourly scrub at the same moment. Versions retention
    removed (and whose nodes garbage collection swept) while the scrub was reading its chunk failed
    to read: each was logged as an integrity problem ("node ... is missing; it will not be served"),
    and recording it failed on the version's foreign key, failing the scrub's job."""
    import threading

    from django.db import connection

    from snapshots_app import integrity
    from snapshots_app.compaction import compaction_run, retention_policy_set
    from snapshots_app.jobs import job_create

    record_history(project, "run-r", 5)
    retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")  # keeps the head
    job = job_create(kind=JobKind.SCRUB, project=project, params={"budget": 0}, enqueue=lambda job_id: None)
    verify, read = integrity._verify, []

    def compaction_meanwhile() -> None:
        try:
            assert compaction_run(project=project)["versions_removed"] == 4
        finally:
            connection.close()

    def verify_while_compacting(version: Version) -> str | None:
        read.append(version.number)
        if len(read) == 2:  # the scrub's chunk is loaded, version 1 verified
            compacting = threading.Thread(target=compaction_meanwhile)
            compacting.start()
            compacting.join()
        return verify(version)

    monkeypatch.setattr(integrity, "_verify", verify_while_compacting)
    tasks.integrity_scrub_job(job.pk)

    job.refresh_from_db()
    assert job.status == JobStatus.DONE, job.error
    assert (job.result["verified"], job.result["failed"]) == (2, 0)  # version 1, then the head: the rest went
    assert not integrity_problems(project=project, open_only=False).exists()
    assert not [record for record in caplog.records if record.levelname == "ERROR"]

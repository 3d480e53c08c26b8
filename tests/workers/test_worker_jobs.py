"""Jobs on a real `celery worker` process (Redis broker, the pytest PostgreSQL database)."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from django.db import connection

from sessions_app import background
from sessions_app.models import AuditEvent
from sessions_app.selectors import removed_numbers
from snapshots_app import tasks
from snapshots_app.compaction import compaction_dry_run, compaction_start, retention_policy_set
from snapshots_app.integrity import integrity_scrub_start
from snapshots_app.models import IntegrityProblem, JobStatus, StateNode, Version
from snapshots_app.services import snapshot_record
from tests.factories import make_session
from tests.workers.builders import midnight, read_all, record_history
from tests.workers.conftest import VISIBILITY_TIMEOUT, WorkerProcess, _purge_queue, wait_finished, wait_for

pytestmark = [pytest.mark.worker]


def _history(project, sessions: int = 3, steps: int = 40) -> None:
    for index in range(sessions):
        record_history(project, f"run-{index}", steps, start=midnight(20))
    retention_policy_set(project=project, enabled=True, keep_last=5, keep_days=1, thin_to="day")


def _kill_part_way(worker, job) -> None:
    """SIGKILL the worker once the compaction job is part-way through its sweep."""
    def sweeping() -> bool:
        job.refresh_from_db()
        return job.status == JobStatus.RUNNING and job.total > 0 and 0 < job.done < job.total
    wait_for(sweeping, timeout=60, interval=0.01, what="compaction to be part-way")
    worker.kill()


def test_compaction_killed_mid_run_finishes_after_restart_with_every_kept_version_intact(worker, project):
    _history(project)
    preview = compaction_dry_run(project=project)
    before = read_all(project)
    assert preview.versions_removed > 0 and preview.nodes_freed > 100

    job = compaction_start(project=project)
    _kill_part_way(worker, job)
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING and job.done < job.total  # it really died mid-job
    partial = StateNode.objects.filter(project=project).count()
    time.sleep(VISIBILITY_TIMEOUT + 0.5)  # the broker delivers the unacknowledged task again after this
    worker.start()

    wait_finished(job)
    assert job.status == JobStatus.DONE and job.attempts == 2
    after = read_all(project)
    removed = {(s.external_id, n) for s in project.sessions.all() for n in preview.removed_numbers.get(str(s.pk), [])}
    assert set(after) == set(before) - removed  # exactly the planned versions went, nothing else
    assert all(after[key] == before[key] for key in after)  # and every kept one reads back exactly
    assert StateNode.objects.filter(project=project).count() == preview.nodes_total - preview.nodes_freed <= partial
    assert compaction_dry_run(project=project, apply_retention=False).nodes_freed == 0
    # The result counts every attempt's work: it said 0 removed when the first attempt had removed them.
    assert job.result["versions_removed"] == preview.versions_removed
    assert job.result["removed_numbers"] == preview.removed_numbers
    assert job.result["versions_before"] == len(before) and job.result["versions_after"] == len(after)
    # What only this attempt knows is said to be so: a nodes_freed short of the work read as the whole job's.
    assert "nodes_freed" in job.result["figures_of_last_attempt_only"]
    assert job.result["nodes_freed"] <= preview.nodes_freed


def test_dry_run_predicts_what_compaction_frees(worker, project):
    _history(project, sessions=2, steps=30)
    tasks.finalize_versions(list(Version.objects.filter(session__project=project).values_list("id", flat=True)))
    preview = compaction_dry_run(project=project)

    job = wait_finished(compaction_start(project=project, actor_label="ops-key (sr_abc)"))

    assert job.status == JobStatus.DONE, job.error
    assert job.result["versions_removed"] == preview.versions_removed
    # Each session's removals are in the audit log, naming who started the job and the job.
    removals = AuditEvent.objects.filter(project=project, action="retention.remove")
    assert sorted(n for event in removals for n in removed_numbers(event.details)) == sorted(
        n for numbers in preview.removed_numbers.values() for n in numbers)
    assert {(event.actor_label, event.details["job"]) for event in removals} == {("ops-key (sr_abc)", job.pk)}
    assert job.result["nodes_freed"] == preview.nodes_freed and "figures_of_last_attempt_only" not in job.result
    assert abs(job.result["bytes_freed"] - preview.bytes_freed) <= 0.02 * preview.bytes_freed
    saved = job.result["bytes_saved_by_recompression"]
    assert job.result["bytes_before"] - job.result["bytes_after"] == job.result["bytes_freed"] + saved
    # The kept versions whose parent went are summarised again, by the worker, against the ancestor
    # they now point at (their summaries were made against the removed parents before the run).
    kept = Version.objects.filter(session__project=project, parent__isnull=False).select_related("parent")
    relinked = [version.pk for version in kept if version.parent.number != version.number - 1]
    assert relinked

    def summarised_again() -> bool:
        found = Version.objects.filter(pk__in=relinked).values_list("summary", flat=True)
        return all(summary and summary["finalized_at"] >= job.started_at.isoformat() for summary in found)
    wait_for(summarised_again, timeout=30, interval=0.1, what="the relinked versions' summaries")


def test_a_task_delivered_twice_does_no_harm(worker, project):
    _history(project, sessions=2, steps=20)
    before = read_all(project)
    preview = compaction_dry_run(project=project)

    job = compaction_start(project=project)
    tasks.compaction_job.delay(job.pk)  # the broker hands the same job out a second time
    wait_finished(job)
    time.sleep(1)  # let the second delivery run too

    job.refresh_from_db()
    assert job.status == JobStatus.DONE and job.attempts == 1  # the duplicate saw it finished
    assert job.result["versions_removed"] == preview.versions_removed
    after = read_all(project)
    assert len(after) == len(before) - preview.versions_removed
    assert all(after[key] == before[key] for key in after)


def test_scrub_finds_a_corrupted_byte_and_names_the_version(worker, project):
    session = record_history(project, "run-x", 4)
    victim = Version.objects.get(session=session, number=3)
    # A node only version 3 has (its notes are unique to it): flip one stored byte.
    nodes = {bytes(d) for d in StateNode.objects.filter(project=project).values_list("digest", flat=True)}
    from snapshots_app import store, tree

    def reach(version: Version) -> set[bytes]:
        return tree.reachable([bytes(version.root)], store.ProjectStore(project.pk, use_cache=False).nodes)

    others = set().union(*(reach(v) for v in Version.objects.filter(session=session).exclude(pk=victim.pk)))
    only_v3 = sorted((reach(victim) - others) & nodes)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE snapshots_app_statenode SET data = overlay(data placing '\\xff'::bytea from 20 for 1) "
            "WHERE project_id = %s AND digest = %s",
            [project.pk, only_v3[0]],
        )
    corrupted = bytes(StateNode.objects.get(project=project, digest=only_v3[0]).data)

    job = wait_finished(integrity_scrub_start(project=project, budget=0))

    assert job.status == JobStatus.DONE, job.error
    assert (job.result["checked"], job.result["verified"], job.result["failed"]) == (4, 3, 1)
    problem = IntegrityProblem.objects.get(project=project)
    assert (problem.session_id, problem.version_number) == (session.pk, 3)
    assert "version 3" in problem.detail
    assert job.result["problems"][0]["version"] == 3
    # Never repaired silently: the stored byte is still the corrupted one.
    assert bytes(StateNode.objects.get(project=project, digest=only_v3[0]).data) == corrupted


def test_writes_and_reads_while_the_worker_compacts_stay_exact(worker, project):
    from sessions_app.models import WorkflowSession
    from snapshots_app import canonical, store
    from snapshots_app.services import snapshot_record
    from tests.workers.builders import bulky_state

    _history(project, sessions=2, steps=40)
    session = WorkflowSession.objects.get(project=project, external_id="run-0")
    preview = compaction_dry_run(project=project)
    removed = preview.removed_numbers[str(session.pk)]
    before = read_all(project)
    kept = sorted(key for key in before if key[0] == "run-1" and key[1] not in preview.removed_numbers[
        str(WorkflowSession.objects.get(project=project, external_id="run-1").pk)])

    job = compaction_start(project=project)
    written: dict[int, bytes] = {}
    reads = 0
    while True:
        job.refresh_from_db()
        if job.is_finished:
            break
        # Store again the state of a version compaction is removing: its nodes are GC candidates
        # at this very moment, and the write reuses whichever of them still exist.
        state = bulky_state("run-0", removed[len(written) % len(removed)])
        version = snapshot_record(session=session, state=state)
        written[version.number] = canonical.dumps(state)
        key = kept[reads % len(kept)]
        version = Version.objects.select_related("session").get(session__external_id=key[0], session__project=project,
                                                              number=key[1])
        assert store.read_canonical(version, use_cache=False) == before[key]
        reads += 1

    assert job.status == JobStatus.DONE, job.error
    assert written, "the compaction finished before any concurrent write"
    after = read_all(project)
    assert all(after[("run-0", number)] == data for number, data in written.items())
    assert all(after[key] == before[key] for key in kept)


def test_a_burst_of_writes_is_finalized_by_the_worker_in_one_task(worker, project, settings):
    settings.SESSION_NOTIFY_INTERVAL_MS = 60_000  # v2..v5 wait for the interval, or for drain()
    session = make_session(project, "burst")
    for number in range(1, 6):
        snapshot_record(session=session, state={"n": number, "items": list(range(number))})
    assert background.drain(5)

    wait_for(lambda: not session.versions.filter(summary__isnull=True).exists(), timeout=60, what="summaries")
    summaries = dict(session.versions.values_list("number", "summary"))
    assert summaries[1]["initial"] is True
    for number in range(2, 6):
        assert (summaries[number]["added"], summaries[number]["changed"]) == (1, 1)
        assert summaries[number]["paths"] == ["/items/" + str(number - 1), "/n"]


def test_a_job_whose_worker_died_and_whose_message_was_lost_is_sent_again(worker, project, settings):
    _history(project)
    job = compaction_start(project=project)
    _kill_part_way(worker, job)
    _purge_queue()  # Redis restarted without the pending message: only the job row remembers
    worker.start()
    settings.JOB_STALE_SECONDS = VISIBILITY_TIMEOUT
    time.sleep(VISIBILITY_TIMEOUT + 0.5)
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING  # nothing else would ever move it on

    assert tasks.jobs_requeue_stale() == 1
    wait_finished(job)
    assert job.status == JobStatus.DONE and job.attempts == 2


def test_a_job_whose_worker_was_killed_says_it_stalled_and_what_happens_next(worker, project, settings, client):
    """A killed worker's job looked like any other running job, its progress frozen, for up to
    JOB_STALE_SECONDS + a minute: the API and the admin's jobs list now say it stalled and what
    happens next, and say so no more once another attempt took it over."""
    from django.contrib.auth import get_user_model

    from snapshots_app.jobs import job_condition
    from tests.api.conftest import key_client

    settings.JOB_STALE_SECONDS = VISIBILITY_TIMEOUT  # as the worker's (tests/workers/conftest.py)
    reader = key_client(project, "read")
    client.force_login(get_user_model().objects.create_superuser("root", password="pw-for-tests-1"))
    _history(project)
    job = compaction_start(project=project)
    _kill_part_way(worker, job)

    time.sleep(VISIBILITY_TIMEOUT + 0.5)
    shown = reader.get(f"/api/v1/jobs/{job.pk}/").json()
    assert (shown["status"], shown["stalled"], shown["attempts"]) == ("running", True, 1)
    assert shown["condition"].startswith("stalled: its worker has been silent for")
    assert "taken for dead; it is sent again within a minute and resumes from what was committed" in shown["condition"]
    assert shown["heartbeat_at"] is not None
    listed = client.get("/admin/snapshots_app/job/").content.decode()
    assert "stalled: its worker has been silent for" in listed

    # Nobody sends it again (no beat here, and the only worker is dead): later the condition says so, and,
    # once it was sent again, that no worker has taken it.
    job.refresh_from_db()
    later = job.heartbeat_at + timedelta(minutes=5)
    assert "it was not sent again: jobs_requeue_stale has not run" in job_condition(job, now=later)
    assert "check that celery beat and at least one worker are running" in job_condition(job, now=later)
    job.resent_at = job.heartbeat_at + timedelta(minutes=2)
    assert "sent again 3 min ago, no worker has taken it yet" in job_condition(job, now=later)
    job.attempts, job.heartbeat_at = 2, later  # as the attempt that takes it over shows it, its progress from 0
    assert job_condition(job, now=later) == ("running (attempt 2, taken over after a worker died: its progress "
                                             "counts what was left): its worker reported 0 s ago")

    worker.start()  # the broker hands the unacknowledged task out again; that attempt takes the job over
    wait_finished(job)
    shown = reader.get(f"/api/v1/jobs/{job.pk}/").json()
    assert (shown["status"], shown["stalled"], shown["condition"], shown["attempts"]) == ("done", False, None, 2)


def test_a_job_whose_database_connection_is_cut_resumes_at_once_when_the_database_answers(worker, project):
    """A failover or an idle-connection killer cuts the worker's connections mid-job while the
    database itself answers. The job stayed "running" until its heartbeat went stale and beat's
    requeue sent it (~2.5 min with the defaults, forever without beat); it is sent again at once."""
    import psycopg

    from tests.liveserver import database_url
    from tests.workers.conftest import WORKER_APPLICATION_NAME

    _history(project)
    preview = compaction_dry_run(project=project)
    before = read_all(project)
    job = compaction_start(project=project)

    def sweeping() -> bool:
        job.refresh_from_db()
        return job.status == JobStatus.RUNNING and job.total > 0 and 0 < job.done < job.total
    wait_for(sweeping, timeout=60, interval=0.01, what="compaction to be part-way")
    with psycopg.connect(database_url(), autocommit=True) as admin:
        cut = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                            [WORKER_APPLICATION_NAME]).fetchone()[0]
    assert cut >= 1

    wait_finished(job, timeout=30)  # no beat runs here: nothing but the attempt itself sends it again
    assert job.status == JobStatus.DONE and job.attempts == 2, job.error
    after = read_all(project)
    removed = {(s.external_id, n) for s in project.sessions.all() for n in preview.removed_numbers.get(str(s.pk), [])}
    assert set(after) == set(before) - removed
    assert all(after[key] == before[key] for key in after)


def test_a_job_does_not_wait_behind_a_backlog_of_change_summaries(worker, project):
    """A write burst queues one finalize message per 100 versions; on the one queue a job started
    then waited behind all of them (110 s after 24,000 versions, "waiting for a worker"). Summaries
    have a queue of their own, and a worker started without -Q takes from both in turn."""
    from config.celery import app

    session = make_session(project, "burst")
    version = snapshot_record(session=session, state={"n": 1})
    worker.stop()
    _purge_queue()
    for _ in range(300):  # a backlog (each finds its version summarised: quick, but not free)
        tasks.finalize_versions.delay([version.pk])
    job = integrity_scrub_start(project=project)
    assert background.drain(5)  # (its message is sent after commit, on the background thread)
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        assert (client.llen("finalize"), client.llen("celery")) == (300, 1)
        worker.start()
        assert wait_finished(job, timeout=60).status == JobStatus.DONE
        wait_for(lambda: client.llen("finalize") == 0, timeout=60, what="the backlog to be taken too")
    # What the restarted worker took, in order (its log; start() returns only once it answers a ping,
    # which a solo worker does between tasks): the job among the first, not the last of 301.
    taken = re.findall(r"Task snapshots_app\.tasks\.(\w+)\[[^]]+\] received", worker.log.read_text().rsplit(" ready.", 1)[1])
    assert "integrity_scrub_job" in taken[:3], taken[:10]


def test_a_job_whose_pool_process_was_killed_resumes_once_its_heartbeat_is_stale_without_the_requeue(
    celery_worker, transactional_db, settings, worker_var_dir, tmp_path, project
):
    """A prefork worker's child killed mid-job (an OOM kill): Celery sends the task again at once, that
    delivery found the dead attempt's heartbeat fresh and did nothing, and the job showed "running"
    until beat's requeue, up to a minute past JOB_STALE_SECONDS (here beat does not run at all)."""

    settings.VAR_DIR = worker_var_dir
    celery_worker.stop()  # (this test's worker only: the job must run in a child process it can kill)
    prefork = WorkerProcess({**celery_worker.env, "JOB_STALE_SECONDS": "6"}, tmp_path / "prefork.log",
                            pool=("--pool=prefork", "--concurrency=1"))
    prefork.start()
    try:
        _history(project)
        job = compaction_start(project=project)
        _kill_part_way_in(prefork, job)
        job.refresh_from_db()
        assert job.status == JobStatus.RUNNING and job.attempts == 1  # it died mid-job
        wait_finished(job, timeout=60)
        assert job.status == JobStatus.DONE and job.attempts == 2
        assert "sent again in" in prefork.log.read_text()
    finally:
        prefork.stop()
        celery_worker.start()


def _kill_part_way_in(worker: WorkerProcess, job) -> None:
    import os
    import signal

    def sweeping() -> bool:
        job.refresh_from_db()
        return job.status == JobStatus.RUNNING and job.total > 0 and 0 < job.done < job.total
    wait_for(sweeping, timeout=60, interval=0.01, what="compaction to be part-way")
    for child in worker.children():
        os.kill(child, signal.SIGKILL)

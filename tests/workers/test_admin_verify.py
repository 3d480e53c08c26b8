"""Verifying a large selection of versions in the admin: handed to a real worker as a job."""

from __future__ import annotations

from urllib.parse import urlencode

from django.urls import reverse

from sessions_app.models import Role
from sessions_app.services import membership_set
from snapshots_app import admin as snapshots_admin
from snapshots_app.integrity import id_runs, ids_of_runs
from snapshots_app.models import IntegrityProblem, Job, JobKind, JobStatus, StateNode, Version
from tests.factories import make_project, make_user
from tests.workers.builders import record_history
from tests.workers.conftest import wait_finished


def test_id_runs_write_consecutive_ids_short_and_read_back_the_same():
    ids = [1, 2, 3, 4, 7, 9, 10, 20]
    assert id_runs(ids) == [[1, 4], 7, [9, 10], 20]
    assert ids_of_runs(id_runs(ids)) == ids and id_runs([]) == []


def test_a_select_all_above_the_request_limit_is_verified_by_a_worker_job(worker, project, client, monkeypatch):
    """Thousands of versions cannot be read and hashed in one request (it timed out): past
    VERIFY_IN_REQUEST the action queues one job per project and says where to follow it. The job
    still reads every chosen version from the database and records what fails; the rest of the
    project, and the scheduled scrub's rolling window, are left alone."""
    monkeypatch.setattr(snapshots_admin, "VERIFY_IN_REQUEST", 3)
    other = make_project("other")
    chosen = record_history(project, "run-a", 4, notes=1)
    record_history(project, "run-b", 2, notes=1)  # not selected (the search below leaves it out)
    elsewhere = record_history(other, "run-a", 2, notes=1)
    damaged = Version.objects.get(session=chosen, number=3)
    StateNode.objects.filter(project=project, digest=bytes(damaged.root)).update(data=b"\x00garbage")
    also_damaged = Version.objects.get(session=record_history(project, "run-b2", 1, notes=1), number=1)
    StateNode.objects.filter(project=project, digest=bytes(also_damaged.root)).update(data=b"\x00garbage")
    staff = make_user("staffer", staff=True)
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)

    url = reverse("admin:snapshots_app_version_changelist")
    response = client.post(f"{url}?{urlencode({'q': 'run-a'})}",
                           {"action": "verify_integrity", "select_across": "1", "index": "0", "_selected_action": ["0"]},
                           follow=True)

    page = response.content.decode()
    jobs = list(Job.objects.filter(kind=JobKind.SCRUB).order_by("project_id"))
    assert [job.project for job in jobs] == [project, other]
    assert "Verifying 6 version(s) in the background" in page
    for job in jobs:
        assert reverse("admin:snapshots_app_job_change", args=[job.pk]) in page
    done = [wait_finished(job) for job in jobs]
    assert [job.status for job in done] == [JobStatus.DONE, JobStatus.DONE], [job.error for job in done]
    assert [(job.result["verified"], job.result["failed"], job.done, job.total) for job in done] == [
        (3, 1, 4, 4), (2, 0, 2, 2)]
    assert "cursor" not in done[0].result  # the rolling window goes on where it was
    problem = IntegrityProblem.objects.get()  # run-b2's damaged version was not selected: not looked at
    assert (problem.version_id, problem.found_by_id) == (damaged.pk, done[0].pk)
    assert not IntegrityProblem.objects.filter(session=elsewhere).exists()
    # The job names how many versions it verifies, not which (its id runs stay on the server).
    membership_set(project=project, user=staff, role=Role.VIEWER)
    api = client.get(f"/api/v1/jobs/{done[0].pk}/").json()
    assert api["params"] == {"budget": 0, "selected": 4} and api["percent"] == 100


def test_a_large_selection_needs_the_operator_role_in_every_project_it_touches(worker, project, client, monkeypatch):
    monkeypatch.setattr(snapshots_admin, "VERIFY_IN_REQUEST", 1)
    record_history(project, "run-a", 3, notes=1)
    clerk = make_user("clerk", staff=True)
    from django.contrib.auth.models import Permission

    clerk.user_permissions.set(Permission.objects.filter(content_type__app_label="snapshots_app"))
    membership_set(project=project, user=clerk, role=Role.VIEWER)
    client.force_login(clerk)
    url = reverse("admin:snapshots_app_version_changelist")
    form = {"action": "verify_integrity", "select_across": "1", "index": "0", "_selected_action": ["0"]}
    assert client.post(url, form).status_code == 403 and not Job.objects.exists()
    membership_set(project=project, user=clerk, role=Role.OPERATOR)
    client.post(url, form)
    assert wait_finished(Job.objects.get()).result["verified"] == 3


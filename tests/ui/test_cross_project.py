"""An attacker who is a member (and staff) of one project tries to read or change another's data by
every address the dashboard and the admin have: ids guessed from the other project, slugs swapped,
other sessions' UUIDs in query parameters. Nothing of the other project is shown or changed."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from sessions_app.models import ApiKey, AuditEvent, Membership, Role
from sessions_app.services import api_key_create, membership_set
from snapshots_app.integrity import integrity_problem_record
from snapshots_app.models import IntegrityProblem, Job, RetentionPolicy, Version
from snapshots_app.services import snapshot_record
from snapshots_app.transfer import transfer_export_start
from tests.api.conftest import key_client
from tests.factories import make_project, make_session, make_user

SECRET = "globex-secret-7f3a"


@pytest.fixture
def mallory(db):
    """Staff with every model permission, admin of acme only."""
    user = make_user("mallory", staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label__in=["sessions_app", "snapshots_app", "auth"]))
    project = make_project("acme")
    membership_set(project=project, user=user, role=Role.ADMIN)
    mine = make_session(project, "mine-1")
    snapshot_record(session=mine, state={"mine": 1})
    snapshot_record(session=mine, state={"mine": 2})
    return user


@pytest.fixture
def globex(db, django_capture_on_commit_callbacks):
    owner = make_user("gina")
    project = make_project("globex", owner=owner)
    session = make_session(project, f"run-{SECRET}", workflow=f"wf-{SECRET}")
    with django_capture_on_commit_callbacks(execute=True):
        v1 = snapshot_record(session=session, state={"token": SECRET, "n": 1}, step=f"step-{SECRET}", label=f"label-{SECRET}")
        snapshot_record(session=session, state={"token": SECRET, "n": 2}, step=f"step-{SECRET}")
    integrity_problem_record(version=v1, detail=f"detail {SECRET}")
    with django_capture_on_commit_callbacks(execute=True):
        transfer_export_start(project=project, session=session, actor=owner)
    api_key_create(project=project, name=f"key-{SECRET}", scopes="read")
    return project, session


def _objects(project, session) -> dict[str, Any]:
    return {
        "sessions_app/project": project.pk,
        "sessions_app/membership": Membership.objects.filter(project=project).first().pk,
        "sessions_app/apikey": ApiKey.objects.filter(project=project).first().pk,
        "sessions_app/workflowsession": session.pk,
        "sessions_app/auditevent": AuditEvent.objects.filter(project=project).first().pk,
        "snapshots_app/version": Version.objects.filter(session=session).first().pk,
        "snapshots_app/integrityproblem": IntegrityProblem.objects.filter(project=project).first().pk,
        "snapshots_app/job": Job.objects.filter(project=project).first().pk,
        "snapshots_app/retentionpolicy": RetentionPolicy.objects.get_or_create(project=project)[0].pk,
        "auth/user": project.memberships.first().user_id,
    }


def _no_leak(response) -> None:
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert SECRET.encode() not in body, (response.request["PATH_INFO"], response.status_code)


def test_dashboard_addresses_of_another_projects_session(client, mallory, globex):
    project, theirs = globex
    client.force_login(mallory)
    mine = mallory.memberships.get().project.sessions.get()
    base = f"/sessions/{theirs.pk}"
    for path in [f"{base}/", f"{base}/?before=2", f"{base}/diff/?from=1&to=2", f"{base}/history/?path=/token",
                 f"{base}/v/1/", f"{base}/v/1/?pointer=/token", f"{base}/v/1/?q=token", f"{base}/v/1/raw.json",
                 f"{base}/v/1/rewind/", f"{base}/v/1/fork/", f"{base}/archive/", f"{base}/trim/", f"{base}/v/99/",
                 f"{base}/goto/?at=v1", f"/?q={theirs.pk}", f"{base}/audit/",
                 f"/sessions/{mine.pk}/diff/?from=1&to=1&from_session={theirs.pk}",
                 f"/sessions/{mine.pk}/diff/?from=1&to=1&to_session={theirs.pk}",
                 f"/sessions/{mine.pk}/diff/?from=1&to=2&from_session={theirs.pk}&mode=split",
                 f"/?project={project.slug}", f"/?project={project.slug}&q=run", "/?q=run-"]:
        for headers in ({}, {"HX-Request": "true"}):
            response = client.get(path, headers=headers)
            assert response.status_code in (200, 302, 400, 404), (path, response.status_code)
            _no_leak(response)
    for path, data in [(f"{base}/v/1/rewind/", {"reason": "x"}), (f"{base}/v/1/fork/", {"reason": "x"}),
                       (f"{base}/v/1/mark/", {"pinned": "on", "label": "x"}), (f"{base}/archive/", {"reason": "x"}),
                       (f"{base}/unarchive/", {}), (f"{base}/trim/", {"keep_newest": "1", "reason": "x"})]:
        response = client.post(path, data, headers={"HX-Request": "true"})
        assert response.status_code == 404, (path, response.status_code)
    assert Version.objects.filter(session=theirs).count() == 2
    assert not AuditEvent.objects.filter(project=project, action__in=["session.rewind", "session.fork"]).exists()


def test_a_member_of_both_projects_diffing_across_them_is_told_why_not_sent_a_404(client, mallory, globex):
    """Both sessions hers, the page said the one she was on "may have been deleted, or belongs to a project
    you are not a member of"; the API answers the same diff 400 with the reason."""
    project, theirs = globex
    membership_set(project=project, user=mallory, role=Role.VIEWER)
    client.force_login(mallory)
    mine = mallory.memberships.get(project__slug="acme").project.sessions.get()
    response = client.get(f"/sessions/{mine.pk}/diff/", {"from_session": theirs.pk, "from": 1, "to": 1})
    page = response.content.decode()
    assert response.status_code == 400 and "versions of different projects cannot be compared" in page
    assert f"run-{SECRET} is in" in page and "may have been deleted" not in page


ADMIN_MODELS = ["sessions_app/project", "sessions_app/membership", "sessions_app/apikey", "sessions_app/workflowsession",
                "sessions_app/auditevent", "snapshots_app/version", "snapshots_app/integrityproblem", "snapshots_app/job",
                "snapshots_app/retentionpolicy", "auth/user"]


@pytest.mark.parametrize("model", ADMIN_MODELS)
def test_admin_pages_of_another_projects_rows(client, mallory, globex, model):
    project, theirs = globex
    client.force_login(mallory)
    pk = _objects(project, theirs)[model]
    for suffix in ["change/", "history/", "delete/"]:
        response = client.get(f"/admin/{model}/{pk}/{suffix}")
        assert response.status_code in (302, 403, 404), (model, suffix, response.status_code)
        _no_leak(response)
    for query in [{}, {"q": SECRET[7:]}, {"q": str(theirs.pk)}, {"project__id__exact": project.pk},
                  {"session__project__id__exact": project.pk}, {"project": project.pk}]:
        response = client.get(f"/admin/{model}/", query)
        assert response.status_code in (200, 302, 400), (model, query, response.status_code)
        _no_leak(response)


def test_admin_custom_views_and_autocomplete(client, mallory, globex):
    project, theirs = globex
    client.force_login(mallory)
    version = Version.objects.filter(session=theirs).first()
    problem = IntegrityProblem.objects.get(project=project)
    for path in [reverse("admin:snapshots_app_version_data_fix", args=[version.pk]),
                 reverse("admin:snapshots_app_integrityproblem_resolve", args=[problem.pk])]:
        response = client.get(path)
        assert response.status_code in (302, 403, 404), (path, response.status_code)
        _no_leak(response)
    for app, model, field in [("sessions_app", "membership", "project"), ("sessions_app", "apikey", "project"),
                              ("snapshots_app", "retentionpolicy", "project")]:
        response = client.get("/admin/autocomplete/", {"app_label": app, "model_name": model, "field_name": field,
                                                        "term": "glo"})
        assert response.status_code in (200, 403), response.status_code
        assert b"globex" not in response.content.lower(), (model, response.content)
    # Actions naming another project's rows act on nothing.
    for model, pk, action in [("snapshots_app/version", version.pk, "pin"),
                              ("snapshots_app/version", version.pk, "verify_integrity"),
                              ("sessions_app/workflowsession", theirs.pk, "archive"),
                              ("sessions_app/apikey", ApiKey.objects.get(project=project).pk, "revoke"),
                              ("sessions_app/project", project.pk, "export_queue")]:
        response = client.post(f"/admin/{model}/", {"action": action, "_selected_action": [pk], "post": "yes",
                                                    "reason": "x"})
        _no_leak(response)
    assert not Version.objects.filter(session=theirs, pinned=True).exists()
    theirs.refresh_from_db()
    assert theirs.archived_at is None
    assert ApiKey.objects.get(project=project).revoked_at is None
    assert Job.objects.filter(project=project).count() == 1





def test_admin_add_forms_refuse_another_project(client, mallory, globex):
    project, _ = globex
    client.force_login(mallory)
    victim = make_user("victim")
    before = (Membership.objects.filter(project=project).count(), ApiKey.objects.filter(project=project).count())
    for model, data in [("sessions_app/membership", {"project": project.pk, "user": "victim", "role": "admin"}),
                        ("sessions_app/membership", {"project": project.pk, "user": "mallory", "role": "admin"}),
                        ("sessions_app/apikey", {"project": project.pk, "name": "mine now", "scopes": ["admin"]}),
                        ("snapshots_app/retentionpolicy", {"project": project.pk, "enabled": "on", "keep_last": 1,
                                                           "keep_days": 0, "thin_to": 0})]:
        response = client.post(f"/admin/{model}/add/", data)
        assert response.status_code in (200, 403), (model, response.status_code)  # the form again, with its error
        _no_leak(response)
    assert (Membership.objects.filter(project=project).count(), ApiKey.objects.filter(project=project).count()) == before
    assert not Membership.objects.filter(user=victim).exists()
    policy = RetentionPolicy.objects.filter(project=project).first()
    assert policy is None or not policy.enabled


@pytest.mark.parametrize("who", ["browser", "key"])
def test_naming_another_project_tells_no_more_than_naming_none(mallory, globex, who):
    """`?project=` (or a body's `project`) naming another project answers exactly as one naming a
    project that does not exist: lists are empty, the rest 404 `no project`; an attacker cannot tell
    which slugs are taken."""
    project, _ = globex
    acme = mallory.memberships.get().project
    if who == "key":
        caller = key_client(acme, "admin")
    else:
        caller = APIClient()
        caller.force_login(mallory)

    def answer(method, path, slug, body=None):
        if method == "get":
            response = caller.get(path, {"project": slug})
        else:
            response = caller.post(path, {**(body or {}), "project": slug}, format="json")
        return response.status_code, response.content.replace(slug.encode(), b"<slug>")

    for method, path, body in [("get", "/api/v1/sessions/", None), ("get", "/api/v1/audit-events/", None),
                               ("get", "/api/v1/jobs/", None), ("get", "/api/v1/integrity-problems/", None),
                               ("get", "/api/v1/keys/", None), ("get", "/api/v1/retention-policy/", None),
                               ("post", "/api/v1/sessions/", {"external_id": "x"}), ("post", "/api/v1/exports/", None),
                               ("post", "/api/v1/integrity-scrub/", None), ("post", "/api/v1/compaction/", None),
                               ("post", "/api/v1/keys/", {"name": "n", "scopes": ["read"]})]:
        taken, free = answer(method, path, project.slug, body), answer(method, path, "no-such-project", body)
        assert taken == free, (method, path, taken, free)
        assert taken[0] in (200, 404), (method, path, taken)



def test_dashboard_posts_without_the_csrf_token_change_nothing(mallory):
    """A page of another site posting with the operator's cookie (htmx's header or a plain form) is refused."""
    mine = mallory.memberships.get().project.sessions.get()
    forged = Client(enforce_csrf_checks=True)
    forged.force_login(mallory)
    for path, data in [(f"/sessions/{mine.pk}/v/1/mark/", {"pinned": "1", "label": "forged"}),
                       (f"/sessions/{mine.pk}/v/1/rewind/", {"reason": "forged"}),
                       (f"/sessions/{mine.pk}/v/1/fork/", {"reason": "forged"}),
                       (f"/sessions/{mine.pk}/archive/", {"reason": "forged"}), (f"/sessions/{mine.pk}/unarchive/", {})]:
        for headers in ({}, {"HX-Request": "true"}):
            assert forged.post(path, data, headers=headers).status_code == 403, path
    mine.refresh_from_db()
    assert (mine.head_number, mine.archived_at) == (2, None)
    assert not Version.objects.filter(session=mine, pinned=True).exists()
    assert not AuditEvent.objects.filter(reason="forged").exists()

EVIL = '"><img src=x onerror=alert(1)>'


def test_markup_an_engine_writes_is_never_markup_on_a_page(db, client, django_capture_on_commit_callbacks):
    """A key of one project writes markup into everything it may name; a superuser (who reaches every
    project) reads it on every page, fragment and admin page: it is text there, never a tag that runs."""
    root = get_user_model().objects.create_superuser("root", password="pw-for-tests-1")
    project = make_project("evil", owner=root)
    s = make_session(project, f"run{EVIL}", workflow=f"wf{EVIL}", metadata={EVIL: EVIL, "forked_from": {"session": EVIL, "version": EVIL}})
    with django_capture_on_commit_callbacks(execute=True):
        snapshot_record(session=s, state={EVIL: EVIL, "n": 1, "j": '{"a": "' + EVIL.replace('"', '\\"') + '"}', "long": ("x\n" * 50) + EVIL},
                        step=f"s{EVIL}", label=f"l{EVIL}"[:100], error=f"e{EVIL}", engine=f"en{EVIL}")
        snapshot_record(session=s, state={EVIL: EVIL + "2", "n": 2, EVIL + "k": [EVIL], "long": ("y\n" * 50) + EVIL},
                        step=f"s{EVIL}", status="failed", error=f"e{EVIL}")
    client.force_login(root)
    v = Version.objects.filter(session=s).first()
    paths = ["/", f"/?q={quote(EVIL)}", f"/?workflow={quote(EVIL)}", f"/?tag={quote(EVIL)}",
             f"/sessions/{s.pk}/", f"/sessions/{s.pk}/?kind={quote(EVIL)}", f"/sessions/{s.pk}/diff/?from=1&to=2",
             f"/sessions/{s.pk}/diff/?from=1&to=2&mode=split", f"/sessions/{s.pk}/diff/?from={quote(EVIL)}&to=2",
             f"/sessions/{s.pk}/history/?path={quote('/' + EVIL)}", f"/sessions/{s.pk}/history/?path=/n",
             f"/sessions/{s.pk}/v/1/", f"/sessions/{s.pk}/v/1/?pointer={quote('/' + EVIL)}", f"/sessions/{s.pk}/v/1/?pointer=/j",
             f"/sessions/{s.pk}/v/1/?q={quote(EVIL)}", f"/sessions/{s.pk}/v/1/?pointer={quote('/nope' + EVIL)}",
             f"/sessions/{s.pk}/v/1/?pointer=/long", f"/sessions/{s.pk}/v/1/rewind/", f"/sessions/{s.pk}/v/1/fork/", f"/sessions/{s.pk}/archive/",
             f"/admin/sessions_app/workflowsession/{s.pk}/change/", "/admin/sessions_app/workflowsession/",
             f"/admin/snapshots_app/version/{v.pk}/change/", "/admin/snapshots_app/version/", f"/admin/snapshots_app/version/{v.pk}/data-fix/",
             f"/admin/snapshots_app/version/{v.pk}/data-fix/?path={quote('/' + EVIL)}",
             "/admin/sessions_app/auditevent/", f"/admin/sessions_app/auditevent/?q={quote(EVIL)}"]
    for path in paths:
        for headers in ({}, {"HX-Request": "true"}):
            r = client.get(path, headers=headers)
            assert r.status_code in (200, 400, 404), (path, r.status_code)
            if r["Content-Type"].startswith("text/html"):
                assert "<img src=x" not in r.content.decode(), (path, headers)


def test_staff_who_only_view_a_project_change_nothing_of_it_in_the_admin(client, mallory, globex):
    """Staff with every model permission, a viewer of globex: every data fix, action, change form,
    confirmation and add form of the admin refuses them there, and globex is as it was."""
    project, theirs = globex
    membership_set(project=project, user=mallory, role=Role.VIEWER)
    client.force_login(mallory)
    version = Version.objects.filter(session=theirs).first()
    key = ApiKey.objects.get(project=project)
    problem = IntegrityProblem.objects.get(project=project)
    policy = RetentionPolicy.objects.get_or_create(project=project)[0]
    gina = project.memberships.get(role="admin")
    reqs = [
        ("post", reverse("admin:snapshots_app_version_data_fix", args=[version.pk]), {"state": '{"token": 1}', "reason": "x", "apply": "1"}),
        ("post", "/admin/snapshots_app/version/", {"action": "pin", "_selected_action": [version.pk]}),
        ("post", "/admin/snapshots_app/version/", {"action": "verify_integrity", "_selected_action": [version.pk]}),
        ("post", "/admin/sessions_app/workflowsession/", {"action": "archive", "_selected_action": [theirs.pk], "post": "yes", "reason": "x"}),
        ("post", f"/admin/sessions_app/workflowsession/{theirs.pk}/change/", {"status": "failed", "workflow": "w", "metadata": "{}", "tags": "[]"}),
        ("get", f"/admin/sessions_app/apikey/{key.pk}/change/", None),
        ("post", "/admin/sessions_app/apikey/", {"action": "revoke", "_selected_action": [key.pk], "post": "yes"}),
        ("post", f"/admin/snapshots_app/retentionpolicy/{policy.pk}/change/", {"enabled": "on", "keep_last": 1, "keep_days": 0, "thin_to": 0}),
        ("post", reverse("admin:snapshots_app_integrityproblem_resolve", args=[problem.pk]), {"resolution": "x"}),
        ("post", "/admin/sessions_app/membership/add/", {"project": project.pk, "user": "mallory", "role": "admin"}),
        ("post", f"/admin/sessions_app/membership/{gina.pk}/change/", {"role": "viewer"}),
        ("post", f"/admin/sessions_app/membership/{gina.pk}/delete/", {"post": "yes"}),
        ("post", "/admin/sessions_app/project/", {"action": "export_queue", "_selected_action": [project.pk]}),
        ("post", "/admin/sessions_app/project/", {"action": "compaction_preview", "_selected_action": [project.pk]}),
        ("post", "/admin/sessions_app/project/", {"action": "compaction_queue", "_selected_action": [project.pk], "post": "yes"}),
        ("get", f"/admin/auth/user/{gina.user_id}/change/", None),
    ]
    for method, path, data in reqs:
        response = getattr(client, method)(path, data) if data is not None else client.get(path)
        # Refused (403), sent back with a message (302), or the add form again with its error (200).
        assert response.status_code in (200, 302, 403), (path, response.status_code)
    theirs.refresh_from_db()
    key.refresh_from_db()
    policy.refresh_from_db()
    assert (theirs.head_number, theirs.archived_at, theirs.status) == (2, None, "running")
    assert key.revoked_at is None and (policy.keep_last, policy.keep_days) != (1, 0)
    assert not Version.objects.filter(session=theirs, pinned=True).exists()
    assert Job.objects.filter(project=project).count() == 1
    assert sorted(project.memberships.values_list("user__username", "role")) == [("gina", "admin"), ("mallory", "viewer")]
    assert IntegrityProblem.objects.get(pk=problem.pk).resolved_at is None
    assert not AuditEvent.objects.filter(project=project, actor=mallory).exists()

"""The admin as staff use it for data fixes: read-only history, keys shown once, audited fixes."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from sessions_app.models import ApiKey, AuditEvent, Role
from sessions_app.services import membership_set, session_archive
from snapshots_app.models import IntegrityProblem, StateNode, Version
from snapshots_app.services import snapshot_record
from tests.factories import make_session, make_user


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_superuser("root", password="pw-for-tests-1")


@pytest.mark.parametrize("model", ["sessions_app/project", "sessions_app/membership", "sessions_app/apikey",
                                   "sessions_app/workflowsession", "sessions_app/auditevent",
                                   "snapshots_app/version", "snapshots_app/integrityproblem", "snapshots_app/job"])
def test_every_changelist_opens_and_searches(client, staff, story, model):
    client.force_login(staff)
    response = client.get(f"/admin/{model}/", {"q": "run"})
    assert response.status_code == 200


def test_non_staff_cannot_enter(client, operator):
    client.force_login(operator)
    assert client.get("/admin/snapshots_app/version/").status_code == 302


def test_versions_are_read_only(client, staff, story):
    client.force_login(staff)
    version = Version.objects.get(session=story, number=2)
    url = reverse("admin:snapshots_app_version_change", args=[version.pk])
    page = client.get(url).content.decode()
    assert 'name="_save"' not in page
    assert client.post(url, {"step": "edited"}).status_code == 403
    assert client.post(reverse("admin:snapshots_app_version_delete", args=[version.pk])).status_code == 403
    version.refresh_from_db()
    assert version.step == "step-2"


def test_api_key_is_shown_once_and_revoked_by_action(client, staff, team):
    client.force_login(staff)
    response = client.post(reverse("admin:sessions_app_apikey_add"),
                           {"project": team.pk, "name": "ci", "scopes": ["read", "write"]}, follow=True)
    page = response.content.decode()
    key = ApiKey.objects.get(name="ci")
    token = page.split("it is not shown again: ")[1].split("<")[0].strip()
    assert token.startswith(f"sr_{key.prefix}_") and token not in key.key_hash
    assert token not in client.get(reverse("admin:sessions_app_apikey_change", args=[key.pk])).content.decode()
    client.post(reverse("admin:sessions_app_apikey_changelist"), {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEvent.objects.filter(action="api_key.revoke").exists()


def test_data_fix_shows_the_diff_requires_a_reason_and_records_a_new_version(client, staff, story):
    client.force_login(staff)
    base = Version.objects.get(session=story, number=2)
    url = reverse("admin:snapshots_app_version_data_fix", args=[base.pk])
    page = client.get(url).content.decode()
    assert "&quot;steps&quot;: 2" in page  # the state, escaped inside the textarea
    edited = {"counters": {"steps": 2, "tokens": 1}, "pointer": "fixed"}
    preview = client.post(url, {"state": json.dumps(edited), "reason": "", "expected_version": 5, "preview": "1"})
    body = preview.content.decode()
    assert preview.status_code == 200 and "/pointer" in body and "Record as new head" in body
    bad = client.post(url, {"state": "{not json", "reason": "x", "expected_version": 5, "preview": "1"})
    assert bad.status_code == 400 and "not valid JSON" in bad.content.decode()
    no_reason = client.post(url, {"state": json.dumps(edited), "reason": " ", "expected_version": 5, "apply": "1"})
    assert no_reason.status_code == 400 and Version.objects.filter(session=story).count() == 5
    done = client.post(url, {"state": json.dumps(edited), "reason": "bad token count", "expected_version": 5,
                             "apply": "1"})
    assert done.status_code == 302
    fixed = Version.objects.get(session=story, number=6)
    assert fixed.kind == "data_fix" and fixed.reason == "bad token count"
    assert AuditEvent.objects.get(action="version.data_fix").actor_label == "root"


def test_data_fix_needs_the_change_permission(client, story):
    clerk = make_user("clerk", staff=True)
    client.force_login(clerk)
    base = Version.objects.get(session=story, number=2)
    assert client.get(reverse("admin:snapshots_app_version_data_fix", args=[base.pk])).status_code == 403


def test_verify_integrity_action_records_a_problem(client, staff, story):
    client.force_login(staff)
    version = Version.objects.get(session=story, number=3)
    StateNode.objects.filter(project=story.project, digest=bytes(version.root)).update(data=b"\x00garbage")
    response = client.post(reverse("admin:snapshots_app_version_changelist"),
                           {"action": "verify_integrity", "_selected_action": [version.pk]}, follow=True)
    assert "failed verification" in response.content.decode()
    assert IntegrityProblem.objects.filter(version=version, resolved_at__isnull=True).exists()
    membership_set(project=story.project, user=staff, role=Role.VIEWER)
    timeline = client.get(reverse("snapshots:session", kwargs={"session_id": story.pk})).content.decode()
    assert 'id="integrity-problems"' in timeline and "v3</a>:" in timeline


def test_compaction_dry_run_action_reports_figures(client, staff, story):
    client.force_login(staff)
    response = client.post(reverse("admin:sessions_app_project_changelist"),
                           {"action": "compaction_preview", "_selected_action": [story.project.pk]}, follow=True)
    assert "would remove" in response.content.decode()


def test_data_fix_action_opens_the_editor_for_one_version(client, staff, story):
    client.force_login(staff)
    version = Version.objects.get(session=story, number=4)
    url = reverse("admin:snapshots_app_version_changelist")
    response = client.post(url, {"action": "data_fix", "_selected_action": [version.pk]})
    assert response["Location"] == reverse("admin:snapshots_app_version_data_fix", args=[version.pk])
    two = client.post(url, {"action": "data_fix", "_selected_action": [version.pk, version.pk - 1]}, follow=True)
    assert "Select exactly one version" in two.content.decode()


def test_pin_action_on_an_archived_session_says_refused_not_done(client, staff, story):
    session_archive(session=story, reason="done with it")
    client.force_login(staff)
    version = Version.objects.get(session=story, number=2)
    response = client.post(reverse("admin:snapshots_app_version_changelist"),
                           {"action": "pin", "_selected_action": [version.pk]}, follow=True)
    page = response.content.decode()
    assert "1 refused" in page and "archived" in page
    assert "Pinned 0" not in page
    version.refresh_from_db()
    assert not version.pinned


def test_session_list_shows_each_projects_recently_updated_first(client, staff, story, team):
    quiet = make_session(team, "run-quiet")
    client.force_login(staff)
    page = client.get(reverse("admin:sessions_app_workflowsession_changelist")).content.decode()
    # run-quiet was made after story's last write
    assert page.index(quiet.external_id) < page.index(story.external_id)
    story.refresh_from_db()
    snapshot_record(session=story, state={"n": 99})
    page = client.get(reverse("admin:sessions_app_workflowsession_changelist")).content.decode()
    assert page.index(story.external_id) < page.index(quiet.external_id)

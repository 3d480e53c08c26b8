"""API keys that expire, whose expiry moves (audited), and lists that show which keys nobody still
answers for: their creator deactivated or no longer an admin of the project."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from sessions_app.models import ApiKey, AuditEvent, Role
from sessions_app.services import api_key_create, api_key_revoke, api_key_touch, membership_remove, membership_set
from snapshots_app.models import Version
from tests.api.conftest import KeyClient, key_client
from tests.factories import make_user


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def expire(api_key: ApiKey, *, ago: timedelta = timedelta(minutes=5)) -> datetime:
    """The key's expiry, moved into the past (as if the clock had run on)."""
    moment = timezone.now() - ago
    ApiKey.objects.filter(pk=api_key.pk).update(expires_at=moment)
    return moment


def test_an_expired_key_is_refused_saying_when_it_expired(project, session):
    engine = key_client(project, "read,write")
    api_key = ApiKey.objects.get(project=project)
    assert engine.get("/api/v1/sessions/").status_code == 200
    used = ApiKey.objects.get(pk=api_key.pk).last_used_at
    expired_at = expire(api_key)

    response = engine.post(f"/api/v1/sessions/{session.pk}/versions/", {"state": {"x": 1}}, format="json")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    body = response.json()
    assert (body["code"], body["title"]) == ("api_key_expired", "API key expired")
    assert f"expired at {iso(expired_at)}" in body["detail"]
    assert body["details"] == {"expired_at": iso(expired_at)}
    assert not Version.objects.exists()
    assert engine.get("/api/v1/sessions/").status_code == 401
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at == used  # a refused request is no use


def test_only_the_keys_secret_learns_that_it_expired(project):
    """A caller who knows a key's public prefix but not its secret learns nothing about that key."""
    engine = key_client(project, "read")
    api_key = ApiKey.objects.get(project=project)
    expire(api_key)
    guess = KeyClient(f"sr_{api_key.prefix}_{'x' * 43}").get("/api/v1/sessions/")
    unknown = KeyClient(f"sr_{'0' * 12}_{'x' * 43}").get("/api/v1/sessions/")
    assert guess.status_code == unknown.status_code == 401
    assert guess.json()["detail"] == unknown.json()["detail"] == "Unknown API key."
    assert "details" not in guess.json()
    assert engine.get("/api/v1/sessions/").json()["code"] == "api_key_expired"


def test_a_key_expires_when_its_creator_says_or_after_the_default_lifetime(project, admin_key, settings):
    def made(**body):
        response = admin_key.post("/api/v1/keys/", {"name": "engine", "scopes": ["write"], **body}, format="json")
        assert response.status_code == 201, response.json()
        return response.json()

    assert made()["expires_at"] is None  # no default lifetime: never
    settings.API_KEY_DEFAULT_LIFETIME_DAYS = 90
    before = timezone.now()
    default = datetime.fromisoformat(made()["expires_at"])
    assert before + timedelta(days=90) <= default <= timezone.now() + timedelta(days=90)
    assert made(expires_at=None)["expires_at"] is None  # "never", said explicitly, wins over the default
    chosen = made(expires_at="2099-03-01T12:00:00+02:00")
    assert datetime.fromisoformat(chosen["expires_at"]) == datetime(2099, 3, 1, 10, tzinfo=UTC)
    event = AuditEvent.objects.get(action="api_key.create", target_id=str(chosen["id"]))
    assert event.details["expires_at"] == "2099-03-01T10:00:00+00:00"


@pytest.mark.parametrize("expires_at", ["2001-01-01T00:00:00Z", "tomorrow", 12, {"days": 3}])
def test_an_expiry_in_the_past_or_not_a_date_is_400_and_makes_no_key(project, admin_key, expires_at):
    response = admin_key.post("/api/v1/keys/", {"name": "engine", "scopes": ["write"], "expires_at": expires_at},
                              format="json")
    assert response.status_code == 400
    assert "expires_at" in response.json()["errors"]
    assert not ApiKey.objects.filter(name="engine").exists()
    assert not AuditEvent.objects.filter(action="api_key.create", details__name="engine").exists()


def test_create_api_key_command_sets_an_expiry(project, settings):
    settings.API_KEY_DEFAULT_LIFETIME_DAYS = 30
    out, err = StringIO(), StringIO()
    call_command("create_api_key", "--project", project.slug, "--name", "ci", "--expires-in-days", "7", stdout=out, stderr=err)
    ci = ApiKey.objects.get(name="ci")
    assert ci.expires_at is not None and timedelta(days=6) < ci.expires_at - timezone.now() <= timedelta(days=7)
    assert f"expires {ci.expires_at:%Y-%m-%d}" in err.getvalue()
    call_command("create_api_key", "--project", project.slug, "--name", "bot", stdout=out, stderr=err)
    assert timedelta(days=29) < ApiKey.objects.get(name="bot").expires_at - timezone.now() <= timedelta(days=30)
    call_command("create_api_key", "--project", project.slug, "--name", "forever", "--expires-in-days", "0",
                 stdout=out, stderr=err)
    assert ApiKey.objects.get(name="forever").expires_at is None and "never expires" in err.getvalue()


def test_an_admin_extends_an_expired_key_and_it_works_again_audited(project, admin_key):
    engine = key_client(project, "read,write")
    engine_key = ApiKey.objects.get(project=project, name="read,write key")
    old = expire(engine_key)
    assert engine.get("/api/v1/sessions/").status_code == 401

    new = timezone.now() + timedelta(days=30)
    response = admin_key.patch(f"/api/v1/keys/{engine_key.pk}/", {"expires_at": iso(new)}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "active" and datetime.fromisoformat(response.json()["expires_at"]) == new
    assert engine.get("/api/v1/sessions/").status_code == 200
    event = AuditEvent.objects.get(action="api_key.expiry")
    assert event.actor_label.startswith("api key admin key") and event.target_id == str(engine_key.pk)
    assert event.details == {"name": "read,write key", "prefix": engine_key.prefix,
                             "from": old.isoformat(), "to": new.isoformat()}

    # Sending the same expiry again changes nothing and records nothing; null = never.
    admin_key.patch(f"/api/v1/keys/{engine_key.pk}/", {"expires_at": iso(new)}, format="json")
    assert AuditEvent.objects.filter(action="api_key.expiry").count() == 1
    assert admin_key.patch(f"/api/v1/keys/{engine_key.pk}/", {"expires_at": None}, format="json").json()["expires_at"] is None


def test_an_expiry_cannot_revive_a_revoked_key_nor_be_set_by_non_admins(project, admin_key):
    engine = key_client(project, "read,write")
    engine_key = ApiKey.objects.get(project=project, name="read,write key")
    later = {"expires_at": iso(timezone.now() + timedelta(days=1))}
    assert engine.patch(f"/api/v1/keys/{engine_key.pk}/", later, format="json").status_code == 403
    assert admin_key.patch(f"/api/v1/keys/{engine_key.pk}/", {"expires_at": "2001-01-01T00:00:00Z"},
                           format="json").status_code == 400
    api_key_revoke(api_key=engine_key)
    response = admin_key.patch(f"/api/v1/keys/{engine_key.pk}/", later, format="json")
    assert response.status_code == 400 and "revoked" in response.json()["detail"]
    assert ApiKey.objects.get(pk=engine_key.pk).expires_at is None
    assert engine.get("/api/v1/sessions/").status_code == 401
    assert not AuditEvent.objects.filter(action="api_key.expiry").exists()


def test_a_key_of_one_project_never_sees_or_changes_another_projects_keys(project, other_project, admin_key):
    theirs, _ = api_key_create(project=other_project, name="their engine", scopes=["write"])
    later = {"expires_at": iso(timezone.now() + timedelta(days=1))}
    assert admin_key.get(f"/api/v1/keys/{theirs.pk}/").status_code == 404
    assert admin_key.patch(f"/api/v1/keys/{theirs.pk}/", later, format="json").status_code == 404
    assert admin_key.delete(f"/api/v1/keys/{theirs.pk}/").status_code == 404
    assert admin_key.get("/api/v1/keys/", {"project": other_project.slug}).status_code == 404
    theirs.refresh_from_db()
    assert theirs.expires_at is None and theirs.revoked_at is None


def test_the_keys_of_a_project_one_only_views_are_403_not_an_empty_list(client, user, project, other_project):
    from sessions_app.models import Role
    from sessions_app.services import membership_set

    membership_set(project=project, user=user, role=Role.ADMIN)
    membership_set(project=other_project, user=user, role=Role.VIEWER)
    client.force_login(user)
    assert client.get("/api/v1/keys/", {"project": project.slug}).status_code == 200
    refused = client.get("/api/v1/keys/", {"project": other_project.slug})
    assert refused.status_code == 403 and refused.json()["code"] == "permission_denied"


def test_the_key_list_shows_expiry_last_use_and_whether_the_creator_still_answers_for_it(project, user):
    """alice (admin) lists keys made by herself, by bob (since an operator), by carol (deactivated),
    by dave (removed from the project) and by a command: each says where its creator stands."""
    bob, carol, dave = make_user("bob"), make_user("carol"), make_user("dave")
    for member in (bob, carol, dave):
        membership_set(project=project, user=member, role=Role.ADMIN)
    for maker in (user, bob, carol, dave):
        api_key_create(project=project, name=f"by {maker.username}", scopes=["write"], actor=maker,
                       expires_at=timezone.now() + timedelta(days=3) if maker is bob else None)
    api_key_create(project=project, name="by command", scopes=["write"], actor_label="manage.py create_api_key")
    membership_set(project=project, user=bob, role=Role.OPERATOR)
    carol.is_active = False
    carol.save()
    membership_remove(membership=dave.memberships.get(project=project))

    alice = APIClient()
    alice.force_login(user)
    rows = {row["name"]: row for row in alice.get("/api/v1/keys/").json()["results"]}
    assert {name: (row["created_by"], row["creator_status"]) for name, row in rows.items()} == {
        "by alice": ("alice", "admin"),
        "by bob": ("bob", "not_admin"),
        "by carol": ("carol", "deactivated"),
        "by dave": ("dave", "not_admin"),
        "by command": ("manage.py create_api_key", "no_account"),
    }
    assert all(row["status"] == "active" and "last_used_at" in row for row in rows.values())
    assert rows["by bob"]["expires_at"] is not None and rows["by alice"]["expires_at"] is None

    def names(**query):
        response = alice.get("/api/v1/keys/", query)
        assert response.status_code == 200, response.json()
        return sorted(row["name"] for row in response.json()["results"])

    assert names(creator_status="deactivated") == ["by carol"]
    assert names(creator_status="not_admin") == ["by bob", "by dave"]
    assert names(status="expiring") == ["by bob"]
    expire(ApiKey.objects.get(name="by bob"))
    assert names(status="expired") == ["by bob"]
    assert "by bob" not in names(status="active")
    assert alice.get("/api/v1/keys/", {"creator_status": "gone"}).status_code == 400
    assert alice.get("/api/v1/keys/", {"status": "stale"}).status_code == 400


def test_authenticating_a_key_reads_one_row_and_writes_its_last_use_at_most_once_a_minute(project):
    """The per-request cost of a key: its row (with the project), and no other table (the creator's
    standing, memberships and expiry lists are for the lists, not for every request)."""
    engine = key_client(project, "read")

    def key_queries() -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            assert engine.get("/api/v1/projects/").status_code == 200
        return [q["sql"] for q in queries.captured_queries if '"sessions_app_apikey"' in q["sql"]]

    first = key_queries()
    assert len(first) == 2 and first[1].startswith("UPDATE")
    again = key_queries()
    assert len(again) == 1 and again[0].startswith("SELECT")
    assert "auth_user" not in again[0] and "membership" not in again[0]


def test_requests_that_read_a_key_together_record_its_last_use_once(project):
    """Workers of one engine that authenticated at the same moment (each read the key before any wrote)."""
    key_client(project, "read")
    first, second = ApiKey.objects.get(project=project), ApiKey.objects.get(project=project)
    api_key_touch(api_key=first)
    with CaptureQueriesContext(connection) as queries:
        api_key_touch(api_key=second)
    assert ApiKey.objects.get(pk=first.pk).last_used_at == first.last_used_at
    assert queries.captured_queries[0]["sql"].startswith("UPDATE")  # asked, and wrote nothing

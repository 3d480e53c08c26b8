"""Who may do what: project isolation (404), scopes and roles (403), bad or revoked keys (401)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from sessions_app.models import ApiKey, AuditEvent, Membership, Role, WorkflowSession
from sessions_app.services import api_key_revoke, membership_set
from snapshots_app.models import Version
from snapshots_app.services import snapshot_record
from tests.api.conftest import KeyClient, key_client
from tests.factories import make_session, make_user


def every_endpoint(session_id, other_id=None):
    """(method, path, body) for every route that names a session."""
    base = f"/api/v1/sessions/{session_id}"
    return [
        ("get", f"{base}/", None),
        ("patch", f"{base}/", {"status": "completed"}),
        ("delete", f"{base}/", None),
        ("post", f"{base}/archive/", {"reason": "x"}),
        ("get", f"{base}/versions/", None),
        ("post", f"{base}/versions/", {"state": {"x": 1}}),
        ("post", f"{base}/versions/batch/", {"versions": [{"state": {"x": 1}}]}),
        ("get", f"{base}/versions/1/", None),
        ("patch", f"{base}/versions/1/", {"pinned": True}),
        ("get", f"{base}/head/", None),
        ("get", f"{base}/diff/?from=1&to=1", None),
        ("post", f"{base}/rewind/", {"to_version": 1, "reason": "x"}),
        ("post", f"{base}/fork/", {"from_version": 1, "reason": "what if"}),
    ]


def call(client, method, path, body):
    if body is None:
        return getattr(client, method)(path)
    return getattr(client, method)(path, body, format="json")


@pytest.fixture
def theirs(other_project):
    session = make_session(other_project, "secret-run")
    snapshot_record(session=session, state={"secret": "value"})
    return session


def test_a_key_of_another_project_gets_404_for_everything(project, theirs, other_project):
    admin = key_client(project, "admin")
    mine = make_session(project, "mine")
    snapshot_record(session=mine, state={"a": 1})
    before = (Version.objects.count(), WorkflowSession.objects.count(), AuditEvent.objects.count())

    for method, path, body in every_endpoint(theirs.pk):
        response = call(admin, method, path, body)
        assert response.status_code == 404, (method, path, response.content)
        assert response["Content-Type"] == "application/problem+json"
    # Comparing with, or resolving, another project's session is just as invisible.
    assert admin.get(f"/api/v1/sessions/{mine.pk}/diff/?from=1&to=1&to_session={theirs.pk}").status_code == 404
    assert admin.get(f"/api/v1/projects/{other_project.slug}/").status_code == 404
    other_key = ApiKey.objects.create(project=other_project, name="k", prefix="abc123abc123", key_hash="0" * 64)
    assert admin.get(f"/api/v1/keys/{other_key.pk}/").status_code == 404
    assert admin.delete(f"/api/v1/keys/{other_key.pk}/").status_code == 404
    # Lists never show it.
    assert [s["id"] for s in admin.get("/api/v1/sessions/").json()["results"]] == [str(mine.pk)]
    assert [p["slug"] for p in admin.get("/api/v1/projects/").json()["results"]] == [project.slug]
    assert all(e["project"] == project.slug for e in admin.get("/api/v1/audit-events/").json()["results"])
    assert (Version.objects.count(), WorkflowSession.objects.count(), AuditEvent.objects.count()) == before
    assert ApiKey.objects.get(pk=other_key.pk).revoked_at is None


def test_a_read_only_key_reads_but_cannot_write(project, session):
    snapshot_record(session=session, state={"a": 1})
    reader = key_client(project, "read")
    before = (Version.objects.count(), AuditEvent.objects.count(), WorkflowSession.objects.count())

    assert reader.get(f"/api/v1/sessions/{session.pk}/head/").status_code == 200
    for method, path, body in every_endpoint(session.pk):
        response = call(reader, method, path, body)
        expected = 200 if method == "get" else 403
        assert response.status_code == expected, (method, path, response.content)
    response = reader.post("/api/v1/sessions/", {"external_id": "new"}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert reader.post("/api/v1/keys/", {"name": "k", "scopes": ["read"]}, format="json").status_code == 403
    assert (Version.objects.count(), AuditEvent.objects.count(), WorkflowSession.objects.count()) == before
    session.refresh_from_db()
    assert session.status == "running" and session.archived_at is None


def test_a_write_key_cannot_delete_or_manage_keys(project, session):
    writer = key_client(project, "read,write")
    assert writer.delete(f"/api/v1/sessions/{session.pk}/").status_code == 403
    assert writer.get("/api/v1/keys/").status_code == 403
    assert WorkflowSession.objects.filter(pk=session.pk).exists()


def test_a_revoked_key_is_refused(project, session):
    client = key_client(project, "admin")
    assert client.get("/api/v1/sessions/").status_code == 200
    api_key_revoke(api_key=ApiKey.objects.get(project=project))

    response = client.get("/api/v1/sessions/")
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["code"] == "authentication_failed"
    assert client.post(f"/api/v1/sessions/{session.pk}/versions/", {"state": {}}, format="json").status_code == 401
    assert not Version.objects.exists()


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer sr_nope_nope", "Bearer not-a-key", "Basic Zm9vOmJhcg==",
                                    "Bearer sr_\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00_x"])
def test_missing_or_unknown_credentials_get_401(db, header):
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/sessions/")
    assert response.status_code == 401
    assert response.json()["status"] == 401
    if header and header.startswith("Basic"):  # sent, in a scheme the API does not take: not "not provided"
        assert response.json()["detail"] == ("The API takes an API key (Authorization: Bearer sr_...) or a signed-in "
                                             "dashboard session, not Basic credentials.")


def test_keys_are_stored_hashed_and_record_their_last_use(project):
    client = key_client(project, "read")
    api_key = ApiKey.objects.get(project=project)
    assert client.token not in api_key.key_hash and api_key.last_used_at is None
    client.get("/api/v1/projects/")
    api_key.refresh_from_db()
    assert api_key.last_used_at is not None


def test_admin_key_creates_lists_and_revokes_keys(project):
    admin = key_client(project, "admin")
    created = admin.post("/api/v1/keys/", {"name": "engine-7", "scopes": ["read", "write"]}, format="json")
    assert created.status_code == 201
    token = created.json()["key"]
    listed = admin.get("/api/v1/keys/").json()["results"]
    assert {k["name"] for k in listed} == {"admin key", "engine-7"} and all("key" not in k for k in listed)

    engine = KeyClient(token)
    assert engine.post("/api/v1/sessions/", {"external_id": "via-new-key"}, format="json").status_code == 201
    assert admin.delete(f"/api/v1/keys/{created.json()['id']}/").status_code == 200
    assert engine.get("/api/v1/sessions/").status_code == 401
    assert AuditEvent.objects.filter(action="api_key.revoke").count() == 1


def test_browser_session_roles(project, session):
    snapshot_record(session=session, state={"a": 1})
    viewer, operator, stranger = make_user("vic"), make_user("olga"), make_user("sam")
    membership_set(project=project, user=viewer, role=Role.VIEWER)
    membership_set(project=project, user=operator, role=Role.OPERATOR)
    rewind = f"/api/v1/sessions/{session.pk}/rewind/"

    client = APIClient()
    client.force_login(viewer)
    assert client.get(f"/api/v1/sessions/{session.pk}/head/").status_code == 200
    assert client.post(rewind, {"to_version": 1, "reason": "x"}, format="json").status_code == 403

    client.force_login(operator)
    assert client.post(rewind, {"to_version": 1, "reason": "x"}, format="json").status_code == 201
    assert client.delete(f"/api/v1/sessions/{session.pk}/").status_code == 403

    client.force_login(stranger)
    assert client.get(f"/api/v1/sessions/{session.pk}/").status_code == 404


def test_a_user_of_no_project_is_told_so_not_to_name_one_of_several(project):
    client = APIClient()
    client.force_login(make_user("newcomer"))
    assert client.get("/api/v1/projects/").json()["results"] == []
    for response in (client.post("/api/v1/sessions/", {"external_id": "x"}, format="json"),
                     client.get("/api/v1/retention-policy/"), client.post("/api/v1/exports/", {}, format="json")):
        assert response.status_code == 403, response.content
        assert response.json()["code"] == "permission_denied" and "no project" in response.json()["detail"]
    assert not WorkflowSession.objects.filter(external_id="x").exists()


def test_browser_writes_need_the_csrf_token(project, user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post("/api/v1/sessions/", {"external_id": "x"}, format="json")
    assert response.status_code == 403
    assert not WorkflowSession.objects.filter(external_id="x").exists()


def test_a_retried_key_creation_makes_no_second_key(project):
    from sessions_app.models import ApiKey

    admin = key_client(project, "admin")
    body = {"name": "engine-8", "scopes": ["read"]}
    first = admin.post("/api/v1/keys/", body, format="json", HTTP_IDEMPOTENCY_KEY="make-engine-8")
    assert first.status_code == 201 and first.json()["key"]
    retry = admin.post("/api/v1/keys/", body, format="json", HTTP_IDEMPOTENCY_KEY="make-engine-8")
    assert "key" not in retry.json()
    assert retry.status_code == 409 and retry.json()["code"] == "secret_shown_once"
    assert first.json()["prefix"] in retry.json()["detail"] and first.json()["key"] not in retry.content.decode()
    other = admin.post("/api/v1/keys/", {**body, "name": "x"}, format="json", HTTP_IDEMPOTENCY_KEY="make-engine-8")
    assert other.status_code == 422
    assert ApiKey.objects.filter(name__in=["engine-8", "x"]).count() == 1


def test_create_api_key_command_prints_a_working_key(project):
    out, err = StringIO(), StringIO()
    call_command("create_api_key", "--project", project.slug, "--name", "ci", "--scopes", "read,write", stdout=out, stderr=err)
    token = out.getvalue().strip()
    assert token.startswith("sr_")
    assert KeyClient(token).post("/api/v1/sessions/", {"external_id": "from-ci"}, format="json").status_code == 201
    assert ApiKey.objects.get(name="ci").scopes == ["read", "write"]


@pytest.mark.django_db
def test_a_fresh_deployment_gets_its_project_members_and_key_from_the_command_line():
    make_user("ana")
    with pytest.raises(CommandError, match="no user bob"):
        call_command("create_project", "support-bots", "--admin", "ana", "--viewer", "bob", stdout=StringIO())
    for bad in ("Support Bots", "", "x" * 101):
        with pytest.raises(CommandError, match="not a slug"):
            call_command("create_project", bad, stdout=StringIO())
    with pytest.raises(CommandError, match="one role per user: ana"):
        call_command("create_project", "support-bots", "--admin", "ana", "--viewer", "ana", stdout=StringIO())
    with pytest.raises(CommandError, match="--name"):
        call_command("create_project", "support-bots", "--name", "n" * 201, stdout=StringIO())
    out = StringIO()
    call_command("create_project", "support-bots", "--admin", "ana", stdout=out)
    assert "created project support-bots (Support Bots)" in out.getvalue()
    call_command("create_project", "support-bots", "--admin", "ana", stdout=out)  # again: nothing new
    assert Membership.objects.get(project__slug="support-bots").role == "admin"
    assert sorted(AuditEvent.objects.filter(project__slug="support-bots").values_list("action", flat=True)) == [
        "membership.set", "project.create"]

    token = StringIO()
    call_command("create_api_key", "--project", "support-bots", "--name", "engine", stdout=token, stderr=StringIO())
    engine = KeyClient(token.getvalue().strip())
    assert engine.post("/api/v1/sessions/", {"external_id": "first"}, format="json").status_code == 201


def test_a_key_creation_retried_after_the_cache_is_lost_still_makes_no_second_key(project):
    """The request's key is kept with the API key it made, not in the cache (here: emptied, as by a
    Redis outage between the first request and its retry)."""
    from django.core.cache import cache

    from sessions_app.models import ApiKey

    admin = key_client(project, "admin")
    body = {"name": "engine-9", "scopes": ["write"]}
    first = admin.post("/api/v1/keys/", body, format="json", HTTP_IDEMPOTENCY_KEY="make-engine-9")
    cache.clear()
    retry = admin.post("/api/v1/keys/", body, format="json", HTTP_IDEMPOTENCY_KEY="make-engine-9")
    assert retry.status_code == 409 and retry.json()["code"] == "secret_shown_once"
    assert str(first.json()["id"]) in retry.json()["detail"]
    assert ApiKey.objects.filter(name="engine-9").count() == 1


def _everything_stored():
    from snapshots_app.models import IntegrityProblem, Job, RetentionPolicy

    return (WorkflowSession.objects.count(), Version.objects.count(), AuditEvent.objects.count(), ApiKey.objects.count(),
            Job.objects.count(), RetentionPolicy.objects.count(), IntegrityProblem.objects.filter(resolved_at=None).count())


def every_write_with_a_bad_request(session_id, key_id, problem_id):
    """(method, path, body) for every write, each body one the endpoint refuses (400) from a caller who may make it."""
    base = f"/api/v1/sessions/{session_id}"
    return [
        ("post", "/api/v1/sessions/", {"external_id": 7, "bogus": 1}),
        ("patch", f"{base}/", {"status": "sideways"}),
        ("delete", f"{base}/", {"reason": "in the body"}),
        ("post", f"{base}/archive/", {"reasn": "x"}),
        ("post", f"{base}/unarchive/", {"reasn": "x"}),
        ("post", f"{base}/versions/", {"state": [1, 2]}),
        ("post", f"{base}/versions/batch/", {"versions": "many"}),
        ("patch", f"{base}/versions/1/", {"pinned": "perhaps"}),
        ("post", f"{base}/rewind/", {"to_version": "one"}),
        ("post", f"{base}/fork/", {"from_version": -1}),
        ("post", "/api/v1/keys/", {"name": "", "scopes": ["root"]}),
        ("patch", f"/api/v1/keys/{key_id}/", {"expires_at": "never"}),
        ("delete", f"/api/v1/keys/{key_id}/", {"why": "x"}),
        ("put", "/api/v1/retention-policy/", {"enabled": True, "keep_last": -1}),
        ("post", "/api/v1/compaction/", {"dry_run": "maybe"}),
        ("post", "/api/v1/exports/", {"session": "not-a-uuid"}),
        ("post", "/api/v1/imports/", None),
        ("post", "/api/v1/integrity-scrub/", {"bogus": 1}),
        ("post", f"/api/v1/integrity-problems/{problem_id}/resolve/", {"resolution": 5}),
    ]


@pytest.fixture
def write_targets(project, session):
    """A session with a version, an API key and an open integrity problem, for the writes to name."""
    from snapshots_app.integrity import integrity_problem_record

    version = snapshot_record(session=session, state={"a": 1})
    problem = integrity_problem_record(version=version, detail="checksum mismatch")
    api_key = ApiKey.objects.create(project=project, name="target", prefix="0123456789ab", key_hash="1" * 64)
    return every_write_with_a_bad_request(session.pk, api_key.pk, problem.pk)


def _admin_only(method, path):
    return "/keys/" in path or "retention" in path or (method == "delete" and "/sessions/" in path)


def _assert_refused_before_read(response, needed):
    assert response.status_code == 403, response.content
    assert response.json()["code"] == "permission_denied"
    assert f"needs the {needed} role" in response.json()["detail"]
    assert "errors" not in response.json()


def test_a_read_only_caller_gets_403_for_every_write_before_its_request_is_judged(project, write_targets):
    """A viewer's write is refused for its role whatever it sends: a bad body, an over-long
    Idempotency-Key or a body too large got 400/413 first on the project-level writes (sessions, keys,
    retention policy, compaction, exports, scrub), telling a caller who may not write what a write takes."""
    reader = key_client(project, "read")
    viewer = APIClient()
    viewer.force_login(vic := make_user("vic"))
    membership_set(project=project, user=vic, role=Role.VIEWER)
    before = _everything_stored()
    for caller in (reader, viewer):
        for method, path, body in write_targets:
            response = call(caller, method, path, body)
            _assert_refused_before_read(response, "admin" if _admin_only(method, path) else "operator")
            response = getattr(caller, method)(path, {}, format="json", HTTP_IDEMPOTENCY_KEY="k" * 201)
            assert response.status_code == 403, (method, path, response.content)
            response = getattr(caller, method)(path, b"{}", content_type="application/json", CONTENT_LENGTH="999999999")
            assert response.status_code == 403, (method, path, response.content)
    assert _everything_stored() == before


def test_an_operator_gets_403_for_admin_writes_before_its_request_is_judged(project, write_targets):
    writer = key_client(project, "read,write")
    before = _everything_stored()
    admin_only = [(method, path, body) for method, path, body in write_targets if _admin_only(method, path)]
    assert len(admin_only) == 5
    for method, path, body in admin_only:
        _assert_refused_before_read(call(writer, method, path, body), "admin")
    assert _everything_stored() == before


def test_the_bad_requests_above_are_refused_for_what_they_are_from_callers_who_may_write(project, write_targets):
    """The counterpart: the requests the tests above send are really bad ones (400), so a 403 there is
    the role speaking, not the body."""
    admin = key_client(project, "admin")
    before = _everything_stored()
    for method, path, body in write_targets:
        response = call(admin, method, path, body)
        assert response.status_code == 400, (method, path, response.content)
    assert _everything_stored() == before


def test_a_read_the_callers_role_allows_nowhere_is_403_whatever_its_query(project):
    """Key reads need an admin, an export's file an operator: a query parameter they do not take is a
    400 only for a caller who may read them, as a bad body is only for a caller who may write."""
    from snapshots_app.models import Job, JobKind

    writer, reader = key_client(project, "read,write"), key_client(project, "read")
    api_key = ApiKey.objects.filter(project=project).first()
    job = Job.objects.create(project=project, kind=JobKind.EXPORT)
    for client, path, needed in ((writer, "/api/v1/keys/", "admin"), (writer, f"/api/v1/keys/{api_key.pk}/", "admin"),
                                 (reader, f"/api/v1/jobs/{job.pk}/file/", "operator")):
        _assert_refused_before_read(client.get(path, {"colour": "blue"}), needed)
    assert key_client(project, "admin").get("/api/v1/keys/", {"colour": "blue"}).status_code == 400


def test_a_method_a_route_lacks_is_405_whoever_calls_it(project, session):
    """Neither the role check nor the query check speaks for a method the route does not have."""
    reader = key_client(project, "read")
    for method, path in (("post", f"/api/v1/sessions/{session.pk}/head/"), ("put", "/api/v1/sessions/"),
                         ("get", "/api/v1/imports/?project=acme"), ("get", "/api/v1/integrity-scrub/?colour=blue")):
        response = getattr(reader, method)(path)
        assert response.status_code == 405 and response.json()["code"] == "method_not_allowed", (method, path)

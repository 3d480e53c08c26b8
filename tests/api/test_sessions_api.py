"""Sessions over the API: idempotent create, filters, cursor pagination, update, archive, delete."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from sessions_app.models import AuditEvent, WorkflowSession
from sessions_app.services import session_update
from snapshots_app.models import Version
from snapshots_app.services import snapshot_record
from tests.conftest import query_plan, statements_run
from tests.factories import make_project, make_session


def test_create_is_idempotent_on_external_id(writer):
    first = writer.post("/api/v1/sessions/", {"external_id": "thread-9", "workflow": "research", "tags": ["t1"]},
                        format="json")
    again = writer.post("/api/v1/sessions/", {"external_id": "thread-9", "workflow": "other"}, format="json")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["workflow"] == "research"
    assert first["Location"] == f"/api/v1/sessions/{first.json()['id']}/"
    assert WorkflowSession.objects.filter(external_id="thread-9").count() == 1


def test_an_external_id_is_kept_as_the_engine_sent_it(writer):
    padded = writer.post("/api/v1/sessions/", {"external_id": "run-7 "}, format="json")
    plain = writer.post("/api/v1/sessions/", {"external_id": "run-7"}, format="json")
    assert padded.status_code == plain.status_code == 201  # two ids, two sessions: they were one
    assert padded.json()["external_id"] == "run-7 " and padded.json()["id"] != plain.json()["id"]
    found = writer.get("/api/v1/sessions/", {"external_id": "run-7 "}).json()["results"]
    assert [s["id"] for s in found] == [padded.json()["id"]]  # the id the engine knows finds its session
    assert writer.post("/api/v1/sessions/", {"external_id": "run-7 "}, format="json").json()["id"] == padded.json()["id"]
    assert writer.post("/api/v1/sessions/", {"external_id": " \n"}, format="json").status_code == 400


def test_list_filters_and_pages_with_a_cursor(writer, project):
    for i in range(5):
        make_session(project, f"run-{i}", workflow="etl" if i % 2 else "chat", tags=["nightly"] if i < 2 else [])
    failed = make_session(project, "broken")
    snapshot_record(session=failed, state={"a": 1}, error="boom", status="failed")

    def ids(query):
        response = writer.get(f"/api/v1/sessions/?{query}")
        assert response.status_code == 200, response.content
        return sorted(s["external_id"] for s in response.json()["results"])

    assert ids("workflow=etl") == ["run-1", "run-3"]
    assert ids("tag=nightly") == ["run-0", "run-1"]
    assert ids("status=failed") == ["broken"] == ids("has_error=true")
    assert ids("q=RUN-3") == ["run-3"]
    assert ids("external_id=run-4") == ["run-4"]
    assert ids("created_after=2000-01-01T00:00:00Z&created_before=2000-01-02T00:00:00Z") == []

    seen, cursor = [], None
    while True:
        page = writer.get("/api/v1/sessions/?limit=2" + (f"&cursor={cursor}" if cursor else "")).json()
        seen += [s["external_id"] for s in page["results"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(["broken", *[f"run-{i}" for i in range(5)]])
    assert seen[0] == "broken"  # newest activity first


@pytest.mark.parametrize("ordering", ["created_at", "-created_at", "-updated_at"])
def test_pages_reach_every_row_once_when_more_than_a_thousand_share_their_time(writer, project, ordering):
    """An import from a system with whole-second times gives many sessions one created_at. DRF's cursor
    stepped through such ties by an offset it capped at 1,000: past that the same page came back with a
    `next` forever, and a client's iter_sessions never ended."""
    moment = timezone.now() - timedelta(days=1)
    WorkflowSession.objects.bulk_create(
        [WorkflowSession(project=project, external_id=f"tied-{i:04}", workflow="w") for i in range(1_250)])
    WorkflowSession.objects.filter(project=project).update(created_at=moment, updated_at=moment)
    make_session(project, "later")
    seen, cursor, pages = [], None, 0
    while pages < 20:
        page = writer.get(f"/api/v1/sessions/?ordering={ordering}&limit=200" + (f"&cursor={cursor}" if cursor else ""))
        assert page.status_code == 200, page.content
        seen += [s["external_id"] for s in page.json()["results"]]
        cursor, pages = page.json()["next"], pages + 1
        if cursor is None:
            break
    assert cursor is None and pages == 7
    assert len(seen) == len(set(seen)) == 1_251
    assert (seen[-1] if ordering == "created_at" else seen[0]) == "later"


def test_a_cursor_sent_without_the_ordering_it_was_made_for_is_400_not_an_empty_page(writer, project, session):
    """A cursor's position is a value of the field its list was sorted by. Sent alone after
    ?ordering=created_at (the README said: pass `next` back as ?cursor=), it was compared with
    updated_at: an empty page and no `next`, as if the list had ended after its first page."""
    for i in range(4):
        make_session(project, f"run-{i}")
    first = writer.get("/api/v1/sessions/?ordering=created_at&limit=2").json()
    cursor = first["next"]
    following = writer.get(f"/api/v1/sessions/?ordering=created_at&limit=2&cursor={cursor}")
    assert following.status_code == 200 and len(following.json()["results"]) == 2
    for ordering in ("", "&ordering=-created_at", "&ordering=updated_at"):
        refused = writer.get(f"/api/v1/sessions/?limit=2&cursor={cursor}{ordering}")
        assert refused.status_code == 400 and refused.json()["code"] == "invalid_request", ordering
        assert "ordering=created_at" in refused.json()["errors"]["cursor"][0]
    versions = f"/api/v1/sessions/{session.pk}/versions/"
    for i in range(3):
        snapshot_record(session=session, state={"i": i})
    oldest_first = writer.get(f"{versions}?ordering=number&limit=1").json()
    assert writer.get(f"{versions}?cursor={oldest_first['next']}").status_code == 400
    assert writer.get(f"{versions}?cursor={oldest_first['next']}&ordering=number").json()["results"][0]["number"] == 2


def test_bad_filters_are_400_not_ignored(writer):
    for query in ("status=sleeping", "has_error=maybe", "created_after=yesterday", "limit=0", "cursor=abc",
                  "ordering=name"):
        response = writer.get(f"/api/v1/sessions/?{query}")
        assert response.status_code == 400, query
        assert response.json()["code"] == "invalid_request"


def test_a_misspelt_filter_is_400_naming_it_not_the_whole_list(writer, admin_key, project, session):
    """?stauts=failed answered every session, as if there were no filter: a script deleting the
    failed sessions it listed would have deleted them all. A parameter a list does not take is a 400
    naming it, as an unknown body field is; the ones it takes (and ?format=) still work."""
    failed = make_session(project, "broken")
    snapshot_record(session=failed, state={"a": 1}, error="boom", status="failed")
    snapshot_record(session=session, state={"a": 1})
    versions = f"/api/v1/sessions/{session.pk}/versions/"
    for client, path, typo in ((writer, "/api/v1/sessions/", "stauts=failed"),
                               (writer, "/api/v1/sessions/", "has_errors=true"),
                               (writer, versions, "pined=true"),
                               (writer, "/api/v1/audit-events/", "actions=session.delete"),
                               (writer, "/api/v1/jobs/", "knd=export"),
                               (writer, "/api/v1/integrity-problems/", "opened=true"),
                               (admin_key, "/api/v1/keys/", "state=revoked"),
                               (writer, "/api/v1/projects/", "slug=acme")):
        refused = client.get(f"{path}?{typo}&limit=5")
        name = typo.split("=")[0]
        assert refused.status_code == 400 and refused.json()["code"] == "invalid_request", typo
        assert list(refused.json()["errors"]) == [name] and "Unknown query parameter" in refused.json()["detail"]
    listed = writer.get("/api/v1/sessions/?status=failed&format=json&limit=5")
    assert listed.status_code == 200 and [s["external_id"] for s in listed.json()["results"]] == ["broken"]
    with_states = writer.get(f"{versions}?with_state=true&pinned=false&ordering=number")
    assert with_states.status_code == 200 and with_states.json()["results"][0]["state"] == {"a": 1}


def test_the_tag_filter_finds_a_projects_tagged_sessions_through_an_index(writer, project):
    """How the LangGraph saver finds a thread's sessions (delete_thread, prune, copy_thread), and the
    dashboard's tag filter. It read every session of the project (36 ms at 200,000) before session_tagged."""
    WorkflowSession.objects.bulk_create(
        WorkflowSession(project=project, external_id=f"thread-{n}", tags=["langgraph", f"lg-thread:{n}"]) for n in range(300)
    )
    make_session(make_project("other"), "thread-7", tags=["lg-thread:7"])  # another project's: never listed
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {WorkflowSession._meta.db_table}")
    found: list[dict] = []
    statements = statements_run(lambda: found.extend(writer.get("/api/v1/sessions/?tag=lg-thread:7").json()["results"]))
    assert [s["external_id"] for s in found] == ["thread-7"]
    sql, params = next(statement for statement in statements if "@>" in statement[0])
    plan = query_plan(sql, params, priced_out=("seqscan", "indexscan"))
    assert "Bitmap Index Scan on session_tagged" in plan, plan


def test_patch_updates_status_metadata_and_tags(writer, session):
    response = writer.patch(f"/api/v1/sessions/{session.pk}/",
                            {"status": "waiting", "metadata": {"owner": "ops"}, "tags": ["a", "b"]}, format="json")
    assert response.status_code == 200
    session.refresh_from_db()
    assert (session.status, session.metadata, session.tags) == ("waiting", {"owner": "ops"}, ["a", "b"])
    event = AuditEvent.objects.get(action="session.update", session_id=session.pk)
    assert event.actor_label.startswith("api key read,write key") and event.details == {
        "status": {"before": "running", "after": "waiting"},
        "metadata": {"before": {}, "after": {"owner": "ops"}},
        "tags": {"before": [], "after": ["a", "b"]},
    }
    # The same again changes nothing, and records nothing.
    writer.patch(f"/api/v1/sessions/{session.pk}/", {"status": "waiting", "tags": ["a", "b"]}, format="json")
    assert AuditEvent.objects.filter(action="session.update").count() == 1


def test_a_replayed_session_create_answers_as_the_first_did(writer, project):
    first = writer.post("/api/v1/sessions/", {"external_id": "k-create"}, format="json", HTTP_IDEMPOTENCY_KEY="c-1")
    again = writer.post("/api/v1/sessions/", {"external_id": "k-create"}, format="json", HTTP_IDEMPOTENCY_KEY="c-1")
    assert (again.status_code, again.json(), again["Location"]) == (201, first.json(), first["Location"])


def test_a_session_create_replayed_after_the_session_was_deleted_creates_it_again(writer, admin_key, project):
    """The remembered answer of a create outlived its session: a retry with the same Idempotency-Key
    after the session was deleted answered 201 with the deleted session's id, and the engine's next
    write to it was a 404. The record lasts only as long as the session: the retry now creates the
    session again (as a create without a key would), and further retries replay that answer."""
    body = {"external_id": "k-deleted"}
    first = writer.post("/api/v1/sessions/", body, format="json", HTTP_IDEMPOTENCY_KEY="c-2")
    assert first.status_code == 201
    gone = first.json()["id"]
    assert admin_key.delete(f"/api/v1/sessions/{gone}/?reason=test data").status_code == 204

    again = writer.post("/api/v1/sessions/", body, format="json", HTTP_IDEMPOTENCY_KEY="c-2")
    assert again.status_code == 201 and again.json()["id"] != gone
    assert again["Location"] == f"/api/v1/sessions/{again.json()['id']}/"
    assert writer.get(again["Location"]).status_code == 200
    assert writer.post(f"{again['Location']}versions/", {"state": {"a": 1}}, format="json").status_code == 201
    assert list(WorkflowSession.objects.filter(project=project, external_id="k-deleted").values_list("pk", flat=True)) == [
        uuid.UUID(again.json()["id"])]
    # From then on the key answers with the new session, and still refuses another body.
    replay = writer.post("/api/v1/sessions/", body, format="json", HTTP_IDEMPOTENCY_KEY="c-2")
    assert (replay.status_code, replay.json()["id"]) == (201, again.json()["id"])
    other = writer.post("/api/v1/sessions/", {"external_id": "k-other"}, format="json", HTTP_IDEMPOTENCY_KEY="c-2")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"


def test_a_key_reused_for_another_patch_is_refused(writer, session):
    path = f"/api/v1/sessions/{session.pk}/"
    first = writer.patch(path, {"tags": ["x", "y"]}, format="json", HTTP_IDEMPOTENCY_KEY="tag-it")
    again = writer.patch(path, {"tags": ["x", "y"]}, format="json", HTTP_IDEMPOTENCY_KEY="tag-it")
    assert first.status_code == again.status_code == 200 and again.json() == first.json()
    other = writer.patch(path, {"tags": ["x", "z"]}, format="json", HTTP_IDEMPOTENCY_KEY="tag-it")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    session.refresh_from_db()
    assert session.tags == ["x", "y"]


def test_bad_patch_changes_nothing(writer, session):
    session_update(session=session, metadata={"keep": True})
    for body in ({"status": "sleeping"}, {"metadata": [1]}, {"tags": "a"}, {"tags": ["bad\ttag"]},
                 {"metadata": {"k": "nul\u0000"}}, {"workflow": 7}):
        response = writer.patch(f"/api/v1/sessions/{session.pk}/", body, format="json")
        assert response.status_code == 400, body
    session.refresh_from_db()
    assert session.metadata == {"keep": True} and session.status == "running"


def test_archive_keeps_history_and_refuses_writes(writer, session):
    snapshot_record(session=session, state={"a": 1})
    assert writer.post(f"/api/v1/sessions/{session.pk}/archive/", {"reason": "done"}, format="json").status_code == 200
    response = writer.post(f"/api/v1/sessions/{session.pk}/versions/", {"state": {"a": 2}}, format="json")
    assert response.status_code == 409 and response.json()["code"] == "session_archived"
    assert writer.get(f"/api/v1/sessions/{session.pk}/head/").json()["state"] == {"a": 1}
    assert writer.get("/api/v1/sessions/?archived=true").json()["results"][0]["id"] == str(session.pk)


def test_admin_deletes_a_session_and_the_audit_log_keeps_the_fact(admin_key, session):
    snapshot_record(session=session, state={"a": 1})
    for blank in ("", "?reason=", "?reason=%20"):
        response = admin_key.delete(f"/api/v1/sessions/{session.pk}/{blank}")
        assert response.status_code == 400 and response.json()["code"] == "reason_required"
    assert WorkflowSession.objects.filter(pk=session.pk).exists()
    assert admin_key.delete(f"/api/v1/sessions/{session.pk}/?reason=gdpr").status_code == 204
    assert not WorkflowSession.objects.filter(pk=session.pk).exists() and not Version.objects.exists()
    event = AuditEvent.objects.get(action="session.delete")
    assert event.reason == "gdpr" and event.actor_label.startswith("api key")
    listed = admin_key.get(f"/api/v1/audit-events/?session={session.pk}").json()["results"]
    assert [e["action"] for e in listed] == ["session.delete"]


@pytest.mark.parametrize(("method", "tail", "body"), [
    ("patch", "", {"status": "completed"}),
    ("patch", "", {"tags": ["late"]}),
    ("patch", "versions/1/", {"pinned": True}),
    ("patch", "versions/1/", {"label": "late"}),
    ("post", "rewind/", {"to_version": 1, "reason": "late"}),
])
def test_an_archived_session_refuses_every_write_with_409(writer, session, method, tail, body):
    snapshot_record(session=session, state={"a": 1})
    assert writer.post(f"/api/v1/sessions/{session.pk}/archive/", {"reason": "done"}, format="json").status_code == 200
    before = (list(WorkflowSession.objects.values_list("status", "tags", "head_number")),
              list(Version.objects.values_list("pinned", "label")), AuditEvent.objects.count())
    response = getattr(writer, method)(f"/api/v1/sessions/{session.pk}/{tail}", body, format="json")
    assert response.status_code == 409, response.content
    assert response.json()["code"] == "session_archived"
    assert (list(WorkflowSession.objects.values_list("status", "tags", "head_number")),
            list(Version.objects.values_list("pinned", "label")), AuditEvent.objects.count()) == before


@pytest.mark.parametrize(("tail", "body"), [
    ("versions/", {"state": {"a": 2}, "step": "two"}),
    ("versions/batch/", {"versions": [{"state": {"a": 2}}, {"state": {"a": 3}}]}),
    ("rewind/", {"to_version": 1, "reason": "back"}),
])
def test_a_retry_of_a_write_made_before_the_archive_gets_its_first_answer(writer, session, tail, body):
    """Not 409 session_archived "nothing was written": the write was made, only its answer was lost."""
    snapshot_record(session=session, state={"a": 1})
    url = f"/api/v1/sessions/{session.pk}/{tail}"
    first = writer.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="lost-answer")
    assert first.status_code == 201, first.content
    writer.post(f"/api/v1/sessions/{session.pk}/archive/", {"reason": "done"}, format="json")
    before = (Version.objects.count(), AuditEvent.objects.count())
    retry = writer.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="lost-answer")
    assert retry.status_code == 201 and retry.json() == first.json()
    for refused in (writer.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="a-new-write"),
                    writer.post(url, body, format="json")):
        assert refused.status_code == 409 and refused.json()["code"] == "session_archived"
    assert (Version.objects.count(), AuditEvent.objects.count()) == before


def test_unarchive_accepts_writes_again_and_is_audited(writer, reader, session):
    url = f"/api/v1/sessions/{session.pk}/"
    assert reader.post(f"{url}unarchive/", {}, format="json").status_code == 403
    writer.post(f"{url}archive/", {"reason": "done"}, format="json")
    assert writer.patch(url, {"status": "completed"}, format="json").status_code == 409
    response = writer.post(f"{url}unarchive/", {"reason": "one more step"}, format="json")
    assert response.status_code == 200 and response.json()["archived_at"] is None
    assert writer.post(f"{url}unarchive/", {}, format="json").status_code == 200  # already live: nothing to do
    assert writer.patch(url, {"status": "completed"}, format="json").status_code == 200
    events = AuditEvent.objects.filter(session_id=session.pk).order_by("pk")
    assert [(e.action, e.reason) for e in events] == [
        ("session.archive", "done"), ("session.unarchive", "one more step"), ("session.update", "")]


@pytest.mark.parametrize("ordering", ["-created_at", "created_at"])
def test_sessions_listed_by_creation_page_through_their_index(reader, project, ordering):
    """?ordering=created_at (or -created_at) reads a page from session_project_created: without it every
    page sorted all of the project's sessions (54 ms at 50,000)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.conftest import query_plan

    for index in range(3):
        make_session(project, f"run-{index}")
    first = reader.get("/api/v1/sessions/", {"ordering": ordering, "limit": 2}).json()
    names = [row["external_id"] for row in first["results"]]
    assert names == (["run-2", "run-1"] if ordering.startswith("-") else ["run-0", "run-1"])
    with CaptureQueriesContext(connection) as queries:
        rest = reader.get("/api/v1/sessions/", {"ordering": ordering, "limit": 2, "cursor": first["next"]}).json()
    assert [row["external_id"] for row in rest["results"]] == (["run-0"] if ordering.startswith("-") else ["run-2"])
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "sessions_app_workflowsession"' in q["sql"]]
    assert len(listing) == 1
    plan = query_plan(listing[0], priced_out=("seqscan", "sort"))
    assert "session_project_created" in plan and "Sort" not in plan, plan


def test_the_audit_log_of_a_member_of_several_projects_pages_through_its_time_index(client, user, project,
                                                                                      other_project):
    """Without ?project=, a member of several projects reads the newest events of all of them from
    audit_created: with only the per-project index every page sorted all their events (413 ms at
    1,000,000). A rare ?action= reads its few events by audit_action, not the whole log."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from sessions_app.models import Role
    from sessions_app.services import membership_set
    from tests.conftest import query_plan

    membership_set(project=other_project, user=user, role=Role.VIEWER)
    for owner in (project, other_project):
        session_update(session=make_session(owner, f"run-of-{owner.slug}"), status="failed", actor=user)
    client.force_login(user)
    with CaptureQueriesContext(connection) as queries:
        answer = client.get("/api/v1/audit-events/")
    assert {row["project"] for row in answer.json()["results"]} == {project.slug, other_project.slug}
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "sessions_app_auditevent"' in q["sql"]]
    assert len(listing) == 1
    plan = query_plan(listing[0], priced_out=("seqscan", "sort"))
    assert "audit_created" in plan and "Sort" not in plan, plan
    with CaptureQueriesContext(connection) as queries:
        answer = client.get("/api/v1/audit-events/", {"action": "session.rewind"})
    assert answer.json()["results"] == []
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "sessions_app_auditevent"' in q["sql"]]
    # Walks priced out too: what matters is that an index serves the action at all.
    plan = query_plan(listing[0], priced_out=("seqscan", "indexscan"))
    assert "audit_action" in plan, plan


@pytest.mark.parametrize(("path", "table", "index"), [
    ("/api/v1/audit-events/", "sessions_app_auditevent", "audit_project_created"),
    ("/api/v1/jobs/", "snapshots_app_job", "job_project_created"),
    ("/api/v1/sessions/", "sessions_app_workflowsession", "session_project_updated"),
])
def test_a_member_of_several_projects_pages_one_of_them_by_its_index(client, user, project, other_project, path, table,
                                                                      index):
    """?project= narrows a list to one project by its id: a page is that project's newest rows, read from
    its (project, time) index. Matched by slug through a join, PostgreSQL could not tell that one project
    remained and sorted every row of the caller's projects for each page (141 ms at 400,000 audit events)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from sessions_app.models import Role
    from sessions_app.services import membership_set
    from snapshots_app.models import Job
    from tests.conftest import query_plan

    membership_set(project=other_project, user=user, role=Role.VIEWER)
    for owner in (project, other_project):
        session = make_session(owner, f"run-of-{owner.slug}")
        session_update(session=session, status="failed", actor=user)
        Job.objects.create(project=owner, kind="scrub", status="done")
    client.force_login(user)
    with CaptureQueriesContext(connection) as queries:
        answer = client.get(path, {"project": other_project.slug})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert results and all(row["project"] == other_project.slug for row in results)
    listing = [q["sql"] for q in queries.captured_queries if f'FROM "{table}"' in q["sql"]]
    assert len(listing) == 1
    # Sorting priced out too: on a few rows the planner may rightly sort one row read by another index;
    # what matters is that the (project, time) index serves the condition and the order at all.
    # The id after the time orders rows that share one (the cursor names both): PostgreSQL sorts only
    # such ties, as it reads the index in order (an Incremental Sort presorted by the time), never the lot.
    plan = query_plan(listing[0], priced_out=("seqscan", "sort"))
    assert index in plan and not re.search(r"(?<!Incremental )Sort  \(cost", plan), plan
    assert "Incremental Sort" not in plan or "Presorted Key" in plan, plan
    # A slug the caller cannot see, unknown or another project's, is a 404 as on every other endpoint
    # (an empty page also told a slug that exists from one that does not).
    make_project("hidden")
    for slug in ("no-such-project", "hidden"):
        hidden = client.get(path, {"project": slug})
        assert hidden.status_code == 404 and hidden.json()["detail"] == f"no project {slug!r}"
    assert client.get(path, {"project": ""}).status_code == 400
    repeated = client.get(path, {"project": [project.slug, other_project.slug]})
    assert repeated.status_code == 400 and repeated.json()["errors"] == {"project": ["Given more than once; it takes one value."]}


def test_a_cursor_sent_to_another_list_is_400_not_a_page_of_that_list(writer, project, session):
    """A cursor names a place in the list that gave it. Sent to another session's versions, or with
    other filters, it gave a page of a list it never came from, starting at a place it does not have."""
    other = make_session(project, "other-run")
    for number in range(4):
        snapshot_record(session=session, state={"i": number}, step="plan" if number % 2 else "act")
        snapshot_record(session=other, state={"i": number})
    versions = f"/api/v1/sessions/{session.pk}/versions/"
    cursor = writer.get(f"{versions}?limit=1&step=act").json()["next"]
    following = writer.get(f"{versions}?limit=2&step=act&cursor={cursor}")  # the page size may change
    assert following.status_code == 200 and [v["step"] for v in following.json()["results"]] == ["act"]
    for elsewhere in (f"/api/v1/sessions/{other.pk}/versions/?step=act", f"{versions}?step=plan", f"{versions}?"):
        refused = writer.get(f"{elsewhere}&limit=1&cursor={cursor}")
        assert refused.status_code == 400 and "continues another list" in refused.json()["errors"]["cursor"][0], elsewhere
    cursor = writer.get("/api/v1/sessions/?limit=1&status=running").json()["next"]
    assert writer.get(f"/api/v1/sessions/?limit=1&status=running&cursor={cursor}").status_code == 200
    assert writer.get(f"/api/v1/sessions/?limit=1&status=failed&cursor={cursor}").status_code == 400

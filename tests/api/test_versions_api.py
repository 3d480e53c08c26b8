"""Versions over the API: record, read back exactly, head + ETag, preconditions, idempotency, diff,
rewind, fork, pin/label and batch."""

from __future__ import annotations

import orjson
import pytest
from django.db import connection

from sessions_app.models import AuditEvent, WorkflowSession
from sessions_app.selectors import removed_numbers
from snapshots_app import canonical
from snapshots_app.api.views import etag_of
from snapshots_app.models import Version
from snapshots_app.services import snapshot_record, snapshot_record_batch
from tests.conftest import query_plan, statements_run
from tests.factories import agent_state, make_session


def url(session, tail=""):
    return f"/api/v1/sessions/{session.pk}/{tail}"


def test_record_and_read_back_byte_for_byte(writer, session):
    state = agent_state(3, history=20)
    response = writer.post(url(session, "versions/"), {"state": state, "step": "plan", "engine": "llama", "tags": ["x"]},
                           format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["number"] == 1 and body["parent"] is None and body["checksum"] == canonical.checksum(canonical.dumps(state))
    assert "state" not in body

    got = writer.get(url(session, "versions/1/"))
    assert got.status_code == 200
    assert orjson.loads(got.content)["state"] == state
    # The state in the body is the stored canonical JSON, byte for byte.
    assert canonical.dumps(state) in got.content


def test_list_is_newest_first_without_states_and_paginates(writer, session):
    for i in range(5):
        snapshot_record(session=session, state={"i": i}, label="keep" if i == 2 else None)
    page = writer.get(url(session, "versions/?limit=2")).json()
    assert [v["number"] for v in page["results"]] == [5, 4] and all("state" not in v for v in page["results"])
    rest = writer.get(url(session, f"versions/?limit=10&cursor={page['next']}")).json()
    assert [v["number"] for v in rest["results"]] == [3, 2, 1] and rest["next"] is None
    assert [v["number"] for v in writer.get(url(session, "versions/?label=keep")).json()["results"]] == [3]
    assert [v["number"] for v in writer.get(url(session, "versions/?ordering=number&limit=2")).json()["results"]] == [1, 2]


def test_the_tag_filter_finds_the_sessions_tagged_versions_through_an_index(writer, session, project):
    """How the LangGraph saver finds a checkpoint by id and its pending writes, on every get_tuple. It
    read the whole versions table, every project's (44 ms at 200,000 versions), before version_tagged."""
    other = make_session(project, "run-2")
    for i in range(6):
        snapshot_record(session=session, state={"i": i}, tags=[f"cp:{i % 3}", "langgraph"])
        snapshot_record(session=other, state={"i": i}, tags=["cp:1"])
    # A long history (as a thread's pending writes session grows), so that the planner, knowing it,
    # prices reading the session's versions above the index (on six it rightly reads them all).
    snapshot_record_batch(session=session, snapshots=[{"state": {"n": n}, "tags": [f"w:{n}"]} for n in range(300)])
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Version._meta.db_table}")
    found: list[dict] = []
    statements = statements_run(lambda: found.extend(writer.get(url(session, "versions/?tag=cp:1")).json()["results"]))
    assert [v["number"] for v in found] == [5, 2]
    assert writer.get(url(session, "versions/?tag=cp:9")).json()["results"] == []
    assert writer.get(url(session, "versions/?tag=cp")).json()["results"] == []  # whole tags only
    sql, params = next(statement for statement in statements if "@>" in statement[0])
    plan = query_plan(sql, params, priced_out=("seqscan", "indexscan"))
    assert "Bitmap Index Scan on version_tagged" in plan, plan


def test_a_version_whose_parent_a_trim_removes_while_it_is_read_names_its_new_parent(session):
    """A version read just before a trim or retention removed its parent: its answer fetched the parent
    afterwards, which was gone (a 500 under back-to-back compactions). It names the kept ancestor the
    removal relinked it to."""
    from snapshots_app.api.serializers import version_data
    from snapshots_app.selectors import version_get
    from snapshots_app.services import session_trim

    for n in range(4):
        snapshot_record(session=session, state={"n": n})
    read = version_get(session=session, number=3)  # its parent, v2, is still there
    session_trim(session=session, keep=[1, 3, 4], reason="trim while a reader holds v3")
    answer = version_data(read)
    assert answer["number"] == 3 and answer["parent"] == 1 and answer["parent_session"] == session.pk


def test_head_has_an_etag_and_if_match_guards_writes(writer, session):
    snapshot_record(session=session, state={"a": 1})
    head = writer.get(url(session, "head/"))
    etag = head["ETag"]
    assert head.status_code == 200 and head.json()["number"] == 1 and head.json()["state"] == {"a": 1}
    assert etag == f'"{head.json()["checksum"]}-1"'
    assert writer.get(url(session, "head/"), HTTP_IF_NONE_MATCH=etag).status_code == 304
    other = writer.get(url(session, "head/"), HTTP_IF_NONE_MATCH='"0000-9", W/"1111-8"')  # none of them: the head
    assert (other.status_code, other["ETag"], other.json()["state"]) == (200, etag, {"a": 1})

    ok = writer.post(url(session, "versions/"), {"state": {"a": 2}}, format="json", HTTP_IF_MATCH=etag)
    assert ok.status_code == 201
    stale = writer.post(url(session, "versions/"), {"state": {"a": 3}}, format="json", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412 and stale.json()["code"] == "precondition_failed"
    current = writer.get(url(session, "head/"))["ETag"]
    both = writer.post(url(session, "versions/"), {"state": {"a": 3}, "expected_version": 1}, format="json",
                       HTTP_IF_MATCH=current)
    assert both.status_code == 400  # they disagree: neither is taken (see below)
    assert session.versions.count() == 2
    # A batch honours If-Match the same way (it pins the first snapshot).
    batch = {"versions": [{"state": {"a": 4}}, {"state": {"a": 5}}]}
    stale = writer.post(url(session, "versions/batch/"), batch, format="json", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412 and session.versions.count() == 2
    assert writer.post(url(session, "versions/batch/"), batch, format="json", HTTP_IF_MATCH=current).status_code == 201
    assert session.versions.count() == 4
    # Its answer carries the new head's tag, as a single snapshot's does: the next batch's If-Match.
    answer = writer.post(url(session, "versions/batch/"), batch, format="json", HTTP_IF_MATCH=writer.get(url(session, "head/"))["ETag"])
    assert answer.status_code == 201 and answer["ETag"] == etag_of(session.versions.get(number=6))
    assert answer["Location"] == f"/api/v1/sessions/{session.pk}/versions/6/"
    assert writer.post(url(session, "versions/batch/"), batch, format="json", HTTP_IF_MATCH=answer["ETag"]).status_code == 201
    assert writer.post(url(session, "versions/batch/"), batch, format="json", HTTP_IF_MATCH=answer["ETag"]).status_code == 412


def test_a_trim_with_the_heads_if_match_removes_and_one_after_another_write_removes_nothing(admin_key, session):
    for step in range(1, 4):
        snapshot_record(session=session, state={"step": step})
    tag = admin_key.get(url(session, "head/"))["ETag"]
    assert _trim(admin_key, session, [3], HTTP_IF_MATCH=tag).json()["removed"] == [1, 2]
    snapshot_record(session=session, state={"step": 4})
    assert _trim(admin_key, session, [4], HTTP_IF_MATCH=tag).status_code == 412
    assert list(session.versions.values_list("number", flat=True).order_by("number")) == [3, 4]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "fork/", {"from_version": 1, "reason": "try"}),
    ("patch", "", {"tags": ["x"]}),
    ("patch", "versions/1/", {"pinned": True}),
    ("post", "archive/", {"reason": "done"}),
    ("delete", "?reason=gone", None),
])
def test_if_match_on_a_write_that_checks_no_head_is_400_and_does_nothing(admin_key, session, method, path, body):
    """Ignored, the header's check was skipped without a word (a trim removed versions that way)."""
    snapshot_record(session=session, state={"a": 1})
    audited = AuditEvent.objects.count()
    stale = '"0000-9"'
    response = getattr(admin_key, method)(url(session, path), body, format="json", HTTP_IF_MATCH=stale)
    assert response.status_code == 400 and response.json()["code"] == "if_match_not_taken", response.content
    assert "takes no If-Match" in response.json()["detail"]
    session.refresh_from_db()
    assert session.tags == [] and session.archived_at is None and WorkflowSession.objects.count() == 1
    assert not session.versions.get(number=1).pinned and AuditEvent.objects.count() == audited


@pytest.mark.parametrize(("path", "body"), [
    ("versions/", {"state": {"a": 3}}),
    ("versions/batch/", {"versions": [{"state": {"a": 3}}, {"state": {"a": 4}}]}),
    ("rewind/", {"to_version": 1, "reason": "back"}),
])
def test_if_match_and_expected_version_that_disagree_are_400_naming_both(writer, session, path, body):
    """Both preconditions, naming different heads: which the caller meant cannot be known (the body's
    used to win silently, writing on a head the header said it had not read). 400, nothing stored."""
    snapshot_record(session=session, state={"a": 1})
    snapshot_record(session=session, state={"a": 2})
    head = writer.get(url(session, "head/"))["ETag"]  # names version 2
    audit_before = AuditEvent.objects.count()
    for expected in (1, 2 + 1):  # a stale one and one that is not there yet: both disagree with the head's tag
        response = writer.post(url(session, path), {**body, "expected_version": expected}, format="json",
                               HTTP_IF_MATCH=head)
        problem = response.json()
        assert response.status_code == 400 and response["Content-Type"] == "application/problem+json"
        assert problem["code"] == "preconditions_disagree"
        assert f"If-Match ({head}) names version 2 but expected_version is {expected}" in problem["detail"]
        assert problem["details"] == {"if_match": head, "if_match_version": 2, "expected_version": expected}
    foreign = writer.post(url(session, path), {**body, "expected_version": 2}, format="json", HTTP_IF_MATCH='"abc"')
    assert foreign.status_code == 400 and foreign.json()["details"]["if_match_version"] is None
    assert session.versions.count() == 2 and AuditEvent.objects.count() == audit_before
    # Both naming the head, or If-Match: * beside it, is no disagreement.
    agreed = writer.post(url(session, path), {**body, "expected_version": 2}, format="json", HTTP_IF_MATCH=head)
    assert agreed.status_code == 201, agreed.json()
    anything = writer.post(url(session, path), {**body, "expected_version": 2}, format="json", HTTP_IF_MATCH="*")
    assert anything.status_code == 409 and anything.json()["code"] == "version_conflict"  # expected_version is stale now


def test_stale_expected_version_is_409_and_writes_nothing(writer, session):
    snapshot_record(session=session, state={"a": 1})
    response = writer.post(url(session, "versions/"), {"state": {"a": 2}, "expected_version": 0}, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "version_conflict" and response.json()["details"] == {"expected": 0, "head": 1}
    assert writer.post(url(session, "versions/"), {"state": {"a": 2}, "expected_version": 1}, format="json").status_code == 201
    assert session.versions.count() == 2


def test_idempotency_key_replays_the_first_answer(writer, session):
    first = writer.post(url(session, "versions/"), {"state": {"a": 1}}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    again = writer.post(url(session, "versions/"), {"state": {"a": 1}}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    other = writer.post(url(session, "versions/"), {"state": {"a": 9}}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert session.versions.count() == 1


def test_a_retry_of_a_write_that_a_trim_or_retention_removed_is_refused_not_written_again(writer, admin_key, session, project):
    """The key went with its version: a retry (a client's, after a lost answer) found no version with it and
    wrote its old state again, on top of everything written since. Batches and rewinds alike."""
    from snapshots_app import compaction

    post = lambda path, body, key: writer.post(url(session, path), body, format="json", HTTP_IDEMPOTENCY_KEY=key)  # noqa: E731
    snapshot_record(session=session, state={"n": 1})
    assert post("versions/", {"state": {"n": 2}}, "single").status_code == 201  # v2
    assert post("versions/batch/", {"versions": [{"state": {"n": 3}}, {"state": {"n": 4}}]}, "batch").status_code == 201
    assert post("rewind/", {"to_version": 1, "reason": "back"}, "rewind").status_code == 201  # v5
    snapshot_record(session=session, state={"n": 6})
    trimmed = admin_key.post(url(session, "trim/"), {"keep": [1, 6], "reason": "tidy"}, format="json")
    assert trimmed.status_code == 200 and trimmed.json()["removed"] == [2, 3, 4, 5]
    for path, body, key, wrote in [("versions/", {"state": {"n": 2}}, "single", "version 2"),
                                   ("versions/batch/", {"versions": [{"state": {"n": 3}}, {"state": {"n": 4}}]}, "batch",
                                    "versions from 3"),
                                   ("rewind/", {"to_version": 1, "reason": "back"}, "rewind", "version 5")]:
        again = post(path, body, key)
        assert again.status_code == 409 and again.json()["code"] == "written_then_removed", again.content
        assert f"wrote {wrote}, since removed" in again.json()["detail"]
    assert list(session.versions.order_by("number").values_list("number", flat=True)) == [1, 6]

    # Retention removes through the same path.
    assert post("versions/", {"state": {"n": 7}}, "kept-then-thinned").status_code == 201
    snapshot_record(session=session, state={"n": 8})
    compaction.retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    compaction.compaction_run(project=project)
    assert post("versions/", {"state": {"n": 7}}, "kept-then-thinned").json()["code"] == "written_then_removed"
    session.refresh_from_db()
    assert session.head_number == 8


def test_a_retry_with_its_if_match_and_key_gets_its_answer_after_the_tag_it_named_was_trimmed(writer, admin_key, session):
    """README: a retry carrying both If-Match and its Idempotency-Key gets the first answer. Once the head
    its tag named was trimmed, it was a 412 saying nothing was written, of a write that was."""
    first = snapshot_record(session=session, state={"a": 1})
    tag = etag_of(first)
    written = writer.post(url(session, "versions/"), {"state": {"a": 2}}, format="json", HTTP_IF_MATCH=tag,
                          HTTP_IDEMPOTENCY_KEY="guarded")
    assert written.status_code == 201
    snapshot_record(session=session, state={"a": 3})
    assert admin_key.post(url(session, "trim/"), {"keep": [2, 3], "reason": "tidy"}, format="json").status_code == 200
    again = writer.post(url(session, "versions/"), {"state": {"a": 2}}, format="json", HTTP_IF_MATCH=tag,
                        HTTP_IDEMPOTENCY_KEY="guarded")
    assert again.status_code == 201 and again.json()["number"] == written.json()["number"] == 2  # (its parent, v1, is gone)
    assert again.json()["checksum"] == written.json()["checksum"] and again["ETag"] == written["ETag"]
    stale = writer.post(url(session, "versions/"), {"state": {"a": 4}}, format="json", HTTP_IF_MATCH=tag,
                        HTTP_IDEMPOTENCY_KEY="never-used")
    assert stale.status_code == 412 and session.versions.count() == 2
    # The trimmed tag with a known key is no pass: a batch under the single write's key is refused as a reuse.
    batch = writer.post(url(session, "versions/batch/"), {"versions": [{"state": {"b": 1}}]}, format="json",
                        HTTP_IF_MATCH=tag, HTTP_IDEMPOTENCY_KEY="guarded")
    assert batch.status_code == 422 and batch.json()["code"] == "idempotency_key_reused"
    admin_key.post(url(session, "trim/"), {"keep": [3], "reason": "tidy"}, format="json")  # v2 (key "guarded") goes
    for path, body in (("versions/batch/", {"versions": [{"state": {"b": 1}}]}), ("versions/", {"state": {"b": 1}})):
        again = writer.post(url(session, path), body, format="json", HTTP_IF_MATCH=tag, HTTP_IDEMPOTENCY_KEY="guarded")
        assert again.status_code in (409, 422), (path, again.content)
    session.refresh_from_db()
    assert session.head_number == 3 and session.versions.count() == 1


def test_if_match_star_takes_any_head_even_one_that_moved_after_it_was_read(writer, session, monkeypatch):
    """`*` was turned into the head read before the write: a writer in between made it a 412."""
    from snapshots_app import selectors

    snapshot_record(session=session, state={"a": 1})
    head_version, calls = selectors.head_version, []

    def another_writer_first(of):
        head = head_version(of)
        if not calls:
            calls.append(head.number)
            snapshot_record(session=of, state={"a": 100})  # another writer's, landing after the header was read
        return head

    monkeypatch.setattr(selectors, "head_version", another_writer_first)
    response = writer.post(url(session, "versions/"), {"state": {"a": 2}}, format="json", HTTP_IF_MATCH="*")
    assert response.status_code == 201 and response.json()["number"] == 3
    fresh = make_session(session.project, "no-head-yet")
    refused = writer.post(url(fresh, "versions/"), {"state": {"a": 1}}, format="json", HTTP_IF_MATCH="*")
    assert refused.status_code == 412 and fresh.versions.count() == 0


def test_diff_within_and_across_sessions(writer, session):
    snapshot_record(session=session, state={"a": 1, "list": [1, 2]})
    snapshot_record(session=session, state={"a": 2, "list": [1, 2, 3], "new": True})
    diff = writer.get(url(session, "diff/?from=1&to=2")).json()
    assert {(c["path"], c["kind"]) for c in diff["changes"]} == {("/a", "changed"), ("/list/2", "added"), ("/new", "added")}
    assert {"op": "replace", "path": "/a", "value": 2} in diff["patch"]

    fork = writer.post(url(session, "fork/"), {"from_version": 1, "reason": "what if", "external_id": "what-if"}, format="json").json()
    across = writer.get(url(session, f"diff/?from=2&to=1&to_session={fork['id']}")).json()
    assert across["to"]["session"] == fork["id"] and {c["path"] for c in across["changes"]} == {"/a", "/list/2", "/new"}
    assert writer.get(url(session, "diff/?from=1&to=1")).json()["changes"] == []
    for query, missing in ((f"from=99&to=1&to_session={fork['id']}", f"session {session.external_id} has no version 99"),
                           (f"from=1&to=7&to_session={fork['id']}", "what-if has no version 7"),
                           ("from=1&to=99", "has no version 99")):
        response = writer.get(url(session, f"diff/?{query}"))
        assert response.status_code == 404 and missing in response.json()["detail"], query
    missing = writer.get(url(session, "diff/?from=1"))
    assert missing.status_code == 400 and missing.json()["errors"]["to"] == ["Required: a version number."]
    empty = writer.get(url(session, "diff/?from=1&to=2&to_session="))  # it compared within this session
    assert empty.status_code == 400 and empty.json()["errors"]["to_session"][0].startswith("Empty")
    for given in ("0", "x", "1.5", "9" * 20):  # given, so not "Required" (as a 20-digit number was told)
        wrong = writer.get(url(session, f"diff/?from={given}&to=1"))
        assert wrong.status_code == 400, given
        assert wrong.json()["errors"]["from"] == ["Not a version number: use a whole number from 1 to 2147483647."]


def test_a_diff_refuses_a_query_parameter_it_does_not_take(writer, session):
    """A misspelt ?structual_strings=false was ignored: the answer was the diff of the JSON inside the
    string, not the one asked for, with nothing to say so. It is a 400 naming it, as on the lists."""
    snapshot_record(session=session, state={"doc": '{"a": 1, "b": 2}'})
    snapshot_record(session=session, state={"doc": '{"a": 1, "b": 3}'})
    as_text = writer.get(url(session, "diff/?from=1&to=2&structural_strings=false&limit=5&offset=0&format=json"))
    assert as_text.status_code == 200 and [c["path"] for c in as_text.json()["changes"]] == ["/doc"]
    assert [c["path"] for c in writer.get(url(session, "diff/?from=1&to=2")).json()["changes"]] != ["/doc"]

    refused = writer.get(url(session, "diff/?from=1&to=2&structual_strings=false"))
    assert refused.status_code == 400 and refused["Content-Type"] == "application/problem+json"
    problem = refused.json()
    assert list(problem["errors"]) == ["structual_strings"] and "Unknown query parameter" in problem["detail"]
    assert "structural_strings" in problem["errors"]["structual_strings"][0]  # it says what it takes
    # The lists' answer, in the same shape and code.
    listed = writer.get("/api/v1/sessions/?stauts=failed").json()
    assert problem["code"] == listed["code"] == "invalid_request" and set(problem) == set(listed)
    assert problem["errors"]["structual_strings"][0].split(";")[0] == listed["errors"]["stauts"][0].split(";")[0]


def test_a_large_diff_can_be_read_a_page_at_a_time(writer, session):
    snapshot_record(session=session, state={"items": {f"k{i:02}": i for i in range(25)}})
    snapshot_record(session=session, state={"items": {f"k{i:02}": -i - 1 for i in range(25)}})
    whole = writer.get(url(session, "diff/?from=1&to=2")).json()
    assert whole["total"] == 25 and len(whole["changes"]) == 25 and whole["next_offset"] is None and whole["patch"]
    pages, offset = [], 0
    while offset is not None:
        page = writer.get(url(session, f"diff/?from=1&to=2&limit=10&offset={offset}")).json()
        assert page["total"] == 25 and page["patch"] is None and page["counts"] == whole["counts"]
        pages.append(page["changes"])
        offset = page["next_offset"]
    assert [len(changes) for changes in pages] == [10, 10, 5]
    assert [change for changes in pages for change in changes] == whole["changes"]
    assert writer.get(url(session, "diff/?from=1&to=2&limit=100")).json()["patch"] == whole["patch"]
    for bad in ("limit=0", "limit=10001", "limit=x", "offset=-1"):
        response = writer.get(url(session, f"diff/?from=1&to=2&{bad}"))
        assert response.status_code == 400 and response.json()["code"] == "invalid_request", bad


def test_rewind_returns_the_new_head_and_is_audited(writer, session):
    snapshot_record(session=session, state={"step": 1})
    snapshot_record(session=session, state={"step": 2}, error="tool failed", status="failed")
    response = writer.post(url(session, "rewind/"), {"to_version": 1, "reason": "retry after fix"}, format="json")
    assert response.status_code == 201
    head = response.json()
    assert head["number"] == 3 and head["kind"] == "rewind" and head["parent"] == 1 and head["state"] == {"step": 1}
    assert response["ETag"] == f'"{head["checksum"]}-3"'
    assert writer.get(url(session, "head/")).json()["number"] == 3
    event = AuditEvent.objects.get(action="session.rewind")
    assert event.reason == "retry after fix" and event.details["to_version"] == 1


def test_rewind_preconditions(writer, session):
    snapshot_record(session=session, state={"step": 1})
    snapshot_record(session=session, state={"step": 2})
    bad = writer.post(url(session, "rewind/"), {"to_version": 1, "reason": "x", "expected_version": 1}, format="json")
    assert bad.status_code == 409
    assert writer.post(url(session, "rewind/"), {"to_version": 1, "reason": "  "}, format="json").status_code == 400
    assert writer.post(url(session, "rewind/"), {"to_version": 7, "reason": "x"}, format="json").status_code == 404
    assert session.versions.count() == 2


def test_fork_creates_a_session_and_replays_with_an_idempotency_key(writer, session):
    snapshot_record(session=session, state={"a": 1})
    first = writer.post(url(session, "fork/"), {"from_version": 1, "reason": "try"}, format="json",
                        HTTP_IDEMPOTENCY_KEY="f-1")
    again = writer.post(url(session, "fork/"), {"from_version": 1, "reason": "try"}, format="json",
                        HTTP_IDEMPOTENCY_KEY="f-1")
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    fork = WorkflowSession.objects.get(pk=first.json()["id"])
    assert fork.head_number == 1 and fork.versions.get().parent.session_id == session.pk
    taken = writer.post(url(session, "fork/"), {"from_version": 1, "reason": "what if", "external_id": session.external_id}, format="json")
    assert taken.status_code == 409 and taken.json()["code"] == "session_exists"
    assert WorkflowSession.objects.count() == 2


@pytest.mark.parametrize("change", ["metadata edited", "first version trimmed"])
def test_a_fork_replayed_after_its_metadata_was_edited_or_its_first_version_trimmed_is_the_same_fork(
    writer, session, change
):
    """The retry was matched through the fork's `forked_from` metadata and its first version: a PATCH
    of the metadata, or a trim of that version, and the retry made a second fork."""
    from snapshots_app.services import session_trim

    snapshot_record(session=session, state={"a": 1})
    body = {"from_version": 1, "reason": "try"}
    first = writer.post(url(session, "fork/"), body, format="json", HTTP_IDEMPOTENCY_KEY="f-3").json()["id"]
    fork = WorkflowSession.objects.get(pk=first)
    if change == "metadata edited":
        assert writer.patch(f"/api/v1/sessions/{first}/", {"metadata": {"owner": "me"}}, format="json").status_code == 200
    else:
        snapshot_record(session=fork, state={"a": 2})
        session_trim(session=fork, keep=[2], reason="keep the head")
        assert not fork.versions.filter(number=1).exists()
    again = writer.post(url(session, "fork/"), body, format="json", HTTP_IDEMPOTENCY_KEY="f-3")
    assert again.status_code == 201 and again.json()["id"] == first
    other = writer.post(url(session, "fork/"), {**body, "reason": "another"}, format="json", HTTP_IDEMPOTENCY_KEY="f-3")
    assert other.status_code == 422 and "different reason" in other.json()["detail"]
    assert WorkflowSession.objects.count() == 2


def test_a_fork_replayed_after_the_fork_was_deleted_makes_a_new_one(writer, admin_key, session):
    """As a session create's: the key is kept on the fork's first version, and goes with it."""
    snapshot_record(session=session, state={"a": 1})
    body = {"from_version": 1, "reason": "try"}
    first = writer.post(url(session, "fork/"), body, format="json", HTTP_IDEMPOTENCY_KEY="f-2").json()["id"]
    assert admin_key.delete(f"/api/v1/sessions/{first}/?reason=done with it").status_code == 204
    again = writer.post(url(session, "fork/"), body, format="json", HTTP_IDEMPOTENCY_KEY="f-2")
    assert again.status_code == 201 and again.json()["id"] != first
    assert writer.get(f"/api/v1/sessions/{again.json()['id']}/head/").json()["state"] == {"a": 1}
    # Its retries get that one: each made one more fork, matched to the deleted first one.
    third = writer.post(url(session, "fork/"), body, format="json", HTTP_IDEMPOTENCY_KEY="f-2")
    assert third.json()["id"] == again.json()["id"] and WorkflowSession.objects.count() == 2


@pytest.mark.parametrize("read_before", [False, True], ids=["cold", "read-before"])
def test_a_rewind_or_fork_to_a_damaged_version_is_refused_and_writes_nothing(writer, session, read_before):
    """A rewind or fork copies its target's stored state without reading it: to a version that fails its
    checksum, it made a head every read of which was an integrity error (an engine resuming from it got
    a 500), or a fork that was damaged from its first version. The check reads the stored rows: a
    target read just before its damage was checked against the process's node cache, and copied."""
    from snapshots_app.models import StateNode
    from tests.conftest import clear_cache

    for step in (1, 2, 3):
        snapshot_record(session=session, state={"step": step, "notes": [f"note {step}-{i}" for i in range(40)]})
    if read_before:
        assert writer.get(url(session, "versions/1/")).status_code == 200
    root = bytes(Version.objects.get(session=session, number=1).root)
    data = bytearray(bytes(StateNode.objects.get(project=session.project, digest=root).data))
    data[len(data) // 2] ^= 0xFF
    StateNode.objects.filter(project=session.project, digest=root).update(data=bytes(data))
    if not read_before:
        clear_cache()

    rewind = writer.post(url(session, "rewind/"), {"to_version": 1, "reason": "back"}, format="json")
    assert rewind.status_code == 409 and rewind.json()["code"] == "version_damaged"
    assert f"version 1 of session {session.external_id}" in rewind.json()["detail"]
    assert rewind.json()["details"]["version"] == 1
    fork = writer.post(url(session, "fork/"), {"from_version": 1, "reason": "try"}, format="json")
    assert fork.status_code == 409 and fork.json()["code"] == "version_damaged"
    assert session.versions.count() == 3 and WorkflowSession.objects.count() == 1
    assert not AuditEvent.objects.filter(action__in=["session.rewind", "session.fork"]).exists()
    # The session's other versions still rewind and fork.
    assert writer.post(url(session, "rewind/"), {"to_version": 2, "reason": "back"}, format="json").status_code == 201
    assert writer.post(url(session, "fork/"), {"from_version": 2, "reason": "try"}, format="json").status_code == 201


def test_pin_and_label(writer, session):
    snapshot_record(session=session, state={"a": 1})
    response = writer.patch(url(session, "versions/1/"), {"pinned": True, "label": "good"}, format="json")
    assert response.status_code == 200 and response.json()["pinned"] is True and response.json()["label"] == "good"
    version = Version.objects.get()
    assert version.pinned and version.label == "good"
    assert {e.action for e in AuditEvent.objects.all()} >= {"version.pin", "version.label"}


def test_a_label_sent_with_a_snapshot_is_kept_as_a_label_set_later_is_without_its_spaces(writer, session):
    """A snapshot's or batch's label kept its spaces, where PATCH trims: `?label=good` missed it."""
    writer.post(url(session, "versions/"), {"state": {"a": 1}, "label": " good "}, format="json")
    writer.post(url(session, "versions/batch/"), {"versions": [{"state": {"a": 2}, "label": "good\t"}]}, format="json")
    listed = writer.get(url(session, "versions/") + "?label=good").json()["results"]
    assert [(v["number"], v["label"]) for v in listed] == [(2, "good"), (1, "good")]


def test_pinning_a_pinned_version_answers_it_and_is_not_audited_again(writer, session):
    snapshot_record(session=session, state={"a": 1})
    for _ in range(2):
        response = writer.patch(url(session, "versions/1/"), {"pinned": True}, format="json")
        assert response.status_code == 200 and response.json()["pinned"] is True
    unpinned = writer.patch(url(session, "versions/1/"), {"pinned": False}, format="json")
    assert writer.patch(url(session, "versions/1/"), {"pinned": False}, format="json").json() == unpinned.json()
    assert list(AuditEvent.objects.filter(target_type="version").order_by("pk").values_list("action", flat=True)) == [
        "version.pin", "version.unpin"]


def test_batch_records_in_order_all_or_nothing(writer, session):
    items = [{"state": {"i": i}, "step": f"s{i}"} for i in range(3)]
    response = writer.post(url(session, "versions/batch/"), {"versions": items, "expected_version": 0}, format="json")
    assert response.status_code == 201
    assert [v["number"] for v in response.json()["versions"]] == [1, 2, 3]

    broken = [{"state": {"i": 4}}, {"state": {"deep": _nested(500)}}]
    assert writer.post(url(session, "versions/batch/"), {"versions": broken}, format="json").status_code == 400
    assert session.versions.count() == 3


def _nested(depth):
    value: dict = {}
    for _ in range(depth):
        value = {"x": value}
    return value


def test_lists_cost_the_same_number_of_queries_whatever_their_length(writer, session, project,
                                                                     django_assert_max_num_queries):
    from tests.factories import make_session

    for i in range(40):
        snapshot_record(session=session, state={"i": i})
        make_session(project, f"other-{i}")
    writer.get("/api/v1/projects/")  # the key's last-use write happens once a minute, not per request
    with django_assert_max_num_queries(3):
        assert len(writer.get(url(session, "versions/")).json()["results"]) == 40
    with django_assert_max_num_queries(3):
        assert len(writer.get("/api/v1/sessions/").json()["results"]) == 41
    with django_assert_max_num_queries(5):
        writer.get(url(session, "head/"))


def test_an_idempotency_key_replays_only_the_same_request(writer, session):
    body = {"state": {"a": 1}, "step": "one"}
    first = writer.post(url(session, "versions/"), body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert writer.post(url(session, "versions/"), body, format="json", HTTP_IDEMPOTENCY_KEY="k-1").json() == first.json()
    # Same state, other metadata: not a retry of that request.
    failed = {**body, "status": "failed", "error": "boom"}
    other = writer.post(url(session, "versions/"), failed, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert other.status_code == 422 and "status, error" in other.json()["detail"]
    # A rewind's key is not a snapshot's.
    rewound = writer.post(url(session, "rewind/"), {"to_version": 1, "reason": "x"}, format="json",
                          HTTP_IDEMPOTENCY_KEY="k-2")
    assert rewound.status_code == 201
    assert writer.post(url(session, "versions/"), body, format="json", HTTP_IDEMPOTENCY_KEY="k-2").status_code == 422
    again = writer.post(url(session, "rewind/"), {"to_version": 1, "reason": "other"}, format="json",
                        HTTP_IDEMPOTENCY_KEY="k-2")
    assert again.status_code == 422 and "reason" in again.json()["detail"]
    assert session.versions.count() == 2


def test_a_retry_with_if_match_replays_the_write_it_repeats(writer, session):
    snapshot_record(session=session, state={"a": 1})
    etag = writer.get(url(session, "head/"))["ETag"]
    for path, body in (("versions/", {"state": {"a": 2}}), ("rewind/", {"to_version": 1, "reason": "back"})):
        first = writer.post(url(session, path), body, format="json", HTTP_IF_MATCH=etag, HTTP_IDEMPOTENCY_KEY=path)
        again = writer.post(url(session, path), body, format="json", HTTP_IF_MATCH=etag, HTTP_IDEMPOTENCY_KEY=path)
        assert first.status_code == again.status_code == 201, again.json()
        assert first.json()["number"] == again.json()["number"]
        # A new key with that stale tag is a stale write: 412, nothing written.
        stale = writer.post(url(session, path), body, format="json", HTTP_IF_MATCH=etag, HTTP_IDEMPOTENCY_KEY=path + "x")
        assert stale.status_code == 412
        etag = writer.get(url(session, "head/"))["ETag"]
    assert session.versions.count() == 3
    forged = etag.replace('"', "").rpartition("-")[0]  # a real checksum with another number
    assert writer.post(url(session, "versions/"), {"state": {"a": 5}}, format="json", HTTP_IF_MATCH=f'"{forged}-1"',
                       HTTP_IDEMPOTENCY_KEY="k-3").status_code == 412


def test_a_batch_key_covers_the_whole_batch(writer, session):
    two = {"versions": [{"state": {"a": 1}}, {"state": {"a": 2}}]}
    first = writer.post(url(session, "versions/batch/"), two, format="json", HTTP_IDEMPOTENCY_KEY="b1")
    assert writer.post(url(session, "versions/batch/"), two, format="json", HTTP_IDEMPOTENCY_KEY="b1").json() == first.json()
    three = {"versions": [*two["versions"], {"state": {"a": 3}}]}
    for other in (three, {"versions": two["versions"][:1]}):
        response = writer.post(url(session, "versions/batch/"), other, format="json", HTTP_IDEMPOTENCY_KEY="b1")
        assert response.status_code == 422 and response.json()["code"] == "idempotency_key_reused"
    # The batch's versions answer to the batch's key only, whatever a client sends by hand.
    plain = writer.post(url(session, "versions/"), {"state": {"a": 1}}, format="json", HTTP_IDEMPOTENCY_KEY="b1#0")
    assert plain.status_code == 201 and plain.json()["number"] == 3
    # Long keys are not cut: two that share their first 180 characters are two keys.
    for tail in "xy":
        key = "k" * 180 + tail
        response = writer.post(url(session, "versions/batch/"), two, format="json", HTTP_IDEMPOTENCY_KEY=key)
        assert response.status_code == 201
    assert session.versions.count() == 7


def test_a_key_a_single_write_used_is_refused_by_a_batch_and_the_other_way_round(writer, session):
    """Each looked for its own kind of key only: a batch retried as a single snapshot (or a snapshot
    retried in a batch) under the same key was written a second time."""
    one = writer.post(url(session, "versions/"), {"state": {"s": 1}}, format="json", HTTP_IDEMPOTENCY_KEY="s")
    as_batch = writer.post(url(session, "versions/batch/"), {"versions": [{"state": {"s": 1}}]}, format="json",
                           HTTP_IDEMPOTENCY_KEY="s")
    assert as_batch.status_code == 422 and as_batch.json()["code"] == "idempotency_key_reused"
    assert "written alone" in as_batch.json()["detail"]
    batch = {"versions": [{"state": {"b": 1}}, {"state": {"b": 2}}]}
    assert writer.post(url(session, "versions/batch/"), batch, format="json", HTTP_IDEMPOTENCY_KEY="b").status_code == 201
    for path, body in (("versions/", {"state": {"b": 1}}), ("rewind/", {"to_version": 1, "reason": "retry"})):
        alone = writer.post(url(session, path), body, format="json", HTTP_IDEMPOTENCY_KEY="b")
        assert alone.status_code == 422 and "was used for a batch (from version 2)" in alone.json()["detail"]
    assert one.json()["number"] == 1 and session.versions.count() == 3


def test_if_match_on_a_session_with_no_version_says_there_is_none(writer, session):
    """It said If-Match "does not match the session's current head", of a session that has none."""
    refused = writer.post(url(session, "versions/"), {"state": {"a": 1}}, format="json", HTTP_IF_MATCH="*")
    assert refused.status_code == 412 and "this session has no version yet" in refused.json()["detail"]
    assert not session.versions.exists()


def test_if_none_match_star_is_304_while_a_head_exists(writer, session):
    assert writer.get(url(session, "head/"), HTTP_IF_NONE_MATCH="*").status_code == 404  # no head yet
    snapshot_record(session=session, state={"a": 1})
    response = writer.get(url(session, "head/"), HTTP_IF_NONE_MATCH="*")
    assert response.status_code == 304 and response["ETag"] and not response.content
    assert "Content-Type" not in response  # no body, so no type (it said text/html)


def test_a_version_carries_an_etag_and_answers_304_while_it_is_as_the_client_has_it(writer, session):
    """A version's state never changes: a client re-reading one sends its tag and gets 304, no body. A pin
    or label changes what the answer shows, so it changes the tag."""
    for n in range(2):
        snapshot_record(session=session, state={"n": n, "pad": "x" * 5000})
    first = writer.get(url(session, "versions/1/"))
    tag = first["ETag"]
    assert first.status_code == 200 and tag.startswith('"') and first.json()["state"]["n"] == 0
    again = writer.get(url(session, "versions/1/"), HTTP_IF_NONE_MATCH=tag)
    assert again.status_code == 304 and not again.content and again["ETag"] == tag
    assert writer.get(url(session, "versions/2/"), HTTP_IF_NONE_MATCH=tag).status_code == 200  # another version
    assert writer.patch(url(session, "versions/1/"), {"pinned": True}, format="json").status_code == 200
    changed = writer.get(url(session, "versions/1/"), HTTP_IF_NONE_MATCH=tag)
    assert changed.status_code == 200 and changed["ETag"] != tag and changed.json()["pinned"] is True
    assert changed.json()["state"] == first.json()["state"]


@pytest.mark.parametrize("number", ["0", "-1", "99999999999", "7"])
def test_a_version_number_that_names_no_version_is_named_as_a_number(writer, session, number):
    """details.version was the integer for a number past the head and the text for 0, -1 or one past
    what the database holds: one field, two types, for the same kind of miss."""
    snapshot_record(session=session, state={"a": 1})
    answer = writer.get(url(session, f"versions/{number}/"))
    assert answer.status_code == 404 and answer.json()["code"] == "version_not_found"
    assert answer.json()["details"]["version"] == int(number)
    assert writer.get(url(session, "versions/abc/")).json()["details"]["version"] == "abc"
    huge = writer.get(url(session, f"versions/{'1' * 5000}/"))  # past Python's int() digit limit: a 500
    assert huge.status_code == 404 and huge.json()["code"] == "version_not_found"


def test_a_list_with_states_reads_a_history_in_one_request_per_page(writer, session, settings, monkeypatch):
    """An engine listing its history (LangGraph's get_state_history) used to ask for each state apart."""
    from snapshots_app import selectors

    states = [agent_state(i, history=5 * i) for i in range(6)]
    for state in states:
        snapshot_record(session=session, state=state, tags=["cp"] if len(state) % 2 else [])
    page = writer.get(url(session, "versions/?with_state=true&limit=4"))
    body = orjson.loads(page.content)
    assert [v["number"] for v in body["results"]] == [6, 5, 4, 3]
    assert [v["state"] for v in body["results"]] == states[::-1][:4]
    assert canonical.dumps(states[5]) in page.content  # as stored, byte for byte
    rest = writer.get(url(session, f"versions/?with_state=true&limit=4&cursor={body['next']}")).json()
    assert [v["state"] for v in rest["results"]] == states[1::-1] and rest["next"] is None
    assert writer.get(url(session, "versions/?with_state=false")).json()["results"][0].keys() >= {"number", "checksum"}
    assert "state" not in writer.get(url(session, "versions/?with_state=false")).json()["results"][0]

    # States are large: at most 50 a page, and a page past the byte budget ends early, going on after it.
    assert writer.get(url(session, "versions/?with_state=true&limit=51")).status_code == 400
    assert writer.get(url(session, "versions/?with_state=maybe")).status_code == 400
    monkeypatch.setattr(selectors, "STATES_PAGE_BYTES", len(canonical.dumps(states[5])) + 1)
    first = writer.get(url(session, "versions/?with_state=true")).json()
    assert [v["number"] for v in first["results"]] == [6, 5]
    following = writer.get(url(session, f"versions/?with_state=true&cursor={first['next']}")).json()
    assert following["results"][0]["number"] == 4


def test_a_list_with_states_costs_the_same_queries_whatever_its_length(writer, session, django_assert_max_num_queries):
    for i in range(30):
        snapshot_record(session=session, state={"i": i, "log": list(range(i))})
    writer.get("/api/v1/projects/")  # the key's last-use write happens once a minute, not per request
    from tests.conftest import clear_cache

    clear_cache()
    with django_assert_max_num_queries(8):
        results = writer.get(url(session, "versions/?with_state=true")).json()["results"]
    assert [v["state"]["i"] for v in results] == list(range(29, -1, -1))


def _trim(client, session, keep, reason="history no longer needed", **extra):
    headers = {name: extra.pop(name) for name in list(extra) if name.startswith("HTTP_")}
    return client.post(url(session, "trim/"), {"keep": keep, "reason": reason, **extra}, format="json", **headers)


def test_trim_removes_all_but_the_versions_kept_and_those_retention_would_keep(admin_key, session):
    from snapshots_app.services import snapshot_fork, snapshot_rewind, version_label, version_pin

    for step in range(1, 8):
        snapshot_record(session=session, state={"step": step, "history": list(range(step))})
    version_pin(version=session.versions.get(number=2), pinned=True)
    version_label(version=session.versions.get(number=3), label="before deploy")
    fork = snapshot_fork(session=session, from_version=4, reason="try another tool")
    snapshot_rewind(session=session, to_version=1, reason="start over")  # v8, the head

    response = _trim(admin_key, session, [5, 8], expected_version=8, HTTP_IDEMPOTENCY_KEY="trim-1")
    assert response.status_code == 200, response.content
    # Kept besides: v1, which the head (a rewind) restored; v2 pinned; v3 labelled; v4, the fork's source.
    first = {"removed": [6, 7], "kept": [1, 2, 3, 4, 5, 8], "protected": [1, 2, 3, 4]}
    assert response.json() == first
    listed = admin_key.get(url(session, "versions/?ordering=number")).json()["results"]
    assert [(v["number"], v["parent"]) for v in listed] == [(1, None), (2, 1), (3, 2), (4, 3), (5, 4), (8, 1)]
    assert admin_key.get(url(session, "versions/5/")).json()["state"] == {"step": 5, "history": [0, 1, 2, 3, 4]}
    assert admin_key.get(url(session, "head/")).json()["state"] == {"step": 1, "history": [0]}
    assert admin_key.get(url(session, "versions/6/")).status_code == 404
    assert WorkflowSession.objects.get(pk=fork.pk).versions.get().parent.number == 4
    session.refresh_from_db()
    assert (session.head_number, session.version_count) == (8, 6)
    event = AuditEvent.objects.get(action="session.trim")
    assert event.reason == "history no longer needed" and removed_numbers(event.details) == [6, 7]
    assert event.details["protected"] == [1, 2, 3, 4] and event.details["bytes_freed"] > 0

    # A retry with the request's Idempotency-Key gets the first answer; another trim of the same has
    # nothing left to remove, and records nothing. The next write follows the head.
    retried = _trim(admin_key, session, [5, 8], expected_version=8, HTTP_IDEMPOTENCY_KEY="trim-1")
    assert retried.json() == first
    again = _trim(admin_key, session, [5, 8])
    assert again.json() == {**first, "removed": []}
    assert AuditEvent.objects.filter(action="session.trim").count() == 1
    assert admin_key.post(url(session, "versions/"), {"state": {"step": 9}}, format="json").json()["number"] == 9

    # Keeping only the head (a step): the rewind goes, and what it restored with it. Versions whose
    # parent went point at their nearest kept ancestor (none for v2 and v9).
    assert _trim(admin_key, session, [9]).json() == {"removed": [1, 5, 8], "kept": [2, 3, 4, 9], "protected": [2, 3, 4]}
    listed = admin_key.get(url(session, "versions/?ordering=number")).json()["results"]
    assert [(v["number"], v["parent"]) for v in listed] == [(2, None), (3, 2), (4, 3), (9, None)]


def test_trim_refuses_what_it_cannot_do_and_removes_nothing(writer, admin_key, session, other_session):
    for step in range(1, 4):
        snapshot_record(session=session, state={"step": step})
    snapshot_record(session=other_session, state={"theirs": True})
    refused = [
        (writer, [3], {}, 403, None),  # trimming is an admin's
        (admin_key, [3], {"reason": " "}, 400, "reason_required"),
        (admin_key, [1, 2], {}, 400, "head_not_kept"),
        (admin_key, [3, 9], {}, 404, "version_not_found"),
        (admin_key, [], {}, 400, None),
        (admin_key, ["3"], {}, 400, None),
        (admin_key, [3], {"expected_version": 2}, 409, "version_conflict"),
        # If-Match is checked as expected_version is: a stale or foreign tag removed versions before.
        (admin_key, [3], {"HTTP_IF_MATCH": etag_of(session.versions.get(number=2))}, 412, "precondition_failed"),
        (admin_key, [3], {"HTTP_IF_MATCH": '"0000-3"'}, 412, "precondition_failed"),
        (admin_key, [3], {"HTTP_IF_MATCH": etag_of(session.versions.get(number=3)), "expected_version": 2},
         400, "preconditions_disagree"),
    ]
    for client, keep, extra, status, code in refused:
        response = _trim(client, session, keep, **extra)
        assert response.status_code == status, (keep, extra, response.content)
        assert code is None or response.json()["code"] == code
    assert _trim(admin_key, other_session, [1]).status_code == 404  # another project's session
    head_not_kept = _trim(admin_key, session, [1, 2]).json()
    assert "keep must include the head, v3" in head_not_kept["detail"]
    assert session.versions.count() == 3 and other_session.versions.count() == 1
    assert not AuditEvent.objects.filter(action="session.trim").exists()

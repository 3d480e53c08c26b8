"""Bad input on every write endpoint: the documented 4xx, one problem+json shape, nothing stored."""

from __future__ import annotations

from urllib.parse import urlencode

import orjson
import pytest
from django.conf import settings

from sessions_app.models import ApiKey, AuditEvent, WorkflowSession
from snapshots_app.models import Version
from snapshots_app.services import snapshot_record


def counts():
    return (WorkflowSession.objects.count(), Version.objects.count(), AuditEvent.objects.count(), ApiKey.objects.count())


def deep(depth):
    value: dict = {}
    for _ in range(depth):
        value = {"x": value}
    return value


# (path tail relative to the session, or absolute when it starts with /, body, status, code)
BAD_WRITES = [
    ("/api/v1/sessions/", {}, 400, "invalid_request"),
    ("/api/v1/sessions/", {"external_id": "   "}, 400, "invalid_request"),
    ("/api/v1/sessions/", {"external_id": "x" * 256}, 400, "invalid_request"),
    ("/api/v1/sessions/", {"external_id": "x", "metadata": "meta"}, 400, "invalid_request"),
    ("/api/v1/sessions/", {"external_id": "x", "tags": [1]}, 400, "invalid_request"),
    ("/api/v1/sessions/", {"external_id": "x", "project": "nope"}, 404, "not_found"),
    ("versions/", {}, 400, "invalid_request"),
    ("versions/", {"state": [1, 2]}, 400, "invalid_request"),
    ("versions/", {"state": "{}"}, 400, "invalid_request"),
    ("versions/", {"state": {"a": 1}, "status": "sleeping"}, 400, "invalid_request"),
    ("versions/", {"state": {"a": 1}, "step": 5}, 400, "invalid_request"),
    ("versions/", {"state": {"a": 1}, "expected_version": -1}, 400, "invalid_request"),
    ("versions/", {"state": {"a": 1}, "expected_version": "1"}, 400, "invalid_request"),
    ("versions/", {"state": {"a": 1}, "tags": ["no\ttabs"]}, 400, "invalid_request"),
    ("versions/", {"state": deep(300)}, 400, "state_too_deep"),
    ("versions/batch/", {"versions": []}, 400, "invalid_request"),
    ("versions/batch/", {"versions": [{"state": {}}, {"state": 3}]}, 400, "invalid_request"),
    ("versions/1/", {"pinned": "yes"}, 400, "invalid_request"),
    ("versions/1/", {"label": "x" * 101}, 400, "invalid_request"),
    ("versions/2/", {"pinned": True}, 404, "version_not_found"),
    ("rewind/", {"to_version": 1}, 400, "reason_required"),
    ("rewind/", {"to_version": 1, "reason": "  "}, 400, "reason_required"),
    ("rewind/", {"to_version": 0, "reason": "x"}, 400, "invalid_request"),
    ("rewind/", {"to_version": 5, "reason": "x"}, 404, "version_not_found"),
    ("fork/", {}, 400, "invalid_request"),
    ("fork/", {"from_version": 1}, 400, "reason_required"),
    ("fork/", {"from_version": 1, "reason": "  "}, 400, "reason_required"),
    ("fork/", {"from_version": 9, "reason": "what if"}, 404, "version_not_found"),
    ("archive/", {"reason": 5}, 400, "invalid_request"),
    ("", {"status": "nope"}, 400, "invalid_request"),
    ("/api/v1/keys/", {"name": "k", "scopes": ["root"]}, 400, "invalid_request"),
    ("/api/v1/keys/", {"name": "", "scopes": ["read"]}, 400, "invalid_request"),
]


def test_a_body_nested_past_what_json_parsing_takes_is_state_too_deep_as_a_shallower_one(project, session):
    """orjson stops at 1,024 levels: that body was 400 malformed_request, where 201 levels are
    state_too_deep, and an engine that branches on the code missed it."""
    from tests.api.conftest import key_client

    client = key_client(project, "read,write")
    body = '{"state": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
    response = client.post(f"/api/v1/sessions/{session.pk}/versions/", body, content_type="application/json")
    assert response.status_code == 400 and response.json()["code"] == "state_too_deep", response.content
    assert "at most 200" in response.json()["detail"]
    assert not session.versions.exists()


def test_a_number_too_small_to_hold_is_refused_not_stored_as_zero(project, session):
    from tests.api.conftest import key_client

    client = key_client(project, "read,write")
    path = f"/api/v1/sessions/{session.pk}/versions/"
    for literal in ("0.1e-400", "-2E-999", "1e-330"):
        response = client.post(path, '{"state": {"e": ' + literal + '}}', content_type="application/json")
        assert response.status_code == 400, response.content
        assert f"Number {literal} is too small to hold (it would read back as 0)" in response.json()["detail"]
    assert not session.versions.exists()
    for literal, kept in (("0e-400", 0.0), ("-0.0", -0.0), ("5e-324", 5e-324)):  # zeros, and the least double
        response = client.post(path, '{"state": {"e": ' + literal + '}}', content_type="application/json")
        assert response.status_code == 201, response.content
        assert client.get(f"{path}{response.json()['number']}/").json()["state"] == {"e": kept}


@pytest.mark.parametrize(("tail", "body", "status", "code"), BAD_WRITES)
def test_bad_input_gets_a_problem_and_stores_nothing(project, session, tail, body, status, code):
    from tests.api.conftest import key_client

    client = key_client(project, "admin")
    snapshot_record(session=session, state={"a": 1})
    path = tail if tail.startswith("/") else f"/api/v1/sessions/{session.pk}/{tail}"
    method = "patch" if tail in ("versions/1/", "versions/2/", "") else "post"
    before = counts()
    response = getattr(client, method)(path, body, format="json")
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status and problem["type"].endswith(code)
    assert problem["instance"] == path and problem["detail"]
    assert counts() == before
    session.refresh_from_db()
    assert (session.head_number, session.status, session.archived_at) == (1, "running", None)


@pytest.mark.parametrize("body", [{"to_version": 1}, {"to_version": 1, "reason": " "}])
def test_a_rewind_without_a_reason_is_400_whatever_its_if_match_says(project, session, body):
    """A request that is invalid anyway is 400, not 412 for a stale If-Match judged before its body
    (HTTP: preconditions are ignored when the request would fail otherwise)."""
    from tests.api.conftest import key_client

    client = key_client(project, "write")
    snapshot_record(session=session, state={"a": 1})
    before = counts()
    for if_match in ('"stale"', '"*"'):
        response = client.post(f"/api/v1/sessions/{session.pk}/rewind/", body, format="json", HTTP_IF_MATCH=if_match)
        assert response.status_code == 400 and response.json()["code"] == "reason_required", response.content
    assert counts() == before


@pytest.mark.parametrize("raw", ["{not json", '{"state": NaN}', '{"state": {"x": Infinity}}', "[]", "",
                                 '{"state": {"big": 18446744073709551616}}', '{"state": {"n": -9223372036854775809}}'])
def test_unparseable_bodies(writer, session, raw):
    response = writer.generic("POST", f"/api/v1/sessions/{session.pk}/versions/", raw)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert not Version.objects.exists()


@pytest.mark.parametrize(("raw", "word"), [
    ('{"state": NaN}', "NaN"), ('{"state": {"x": Infinity}}', "Infinity"), ('{"state": {"x": [1, -Infinity]}}', "-Infinity"),
])
def test_nan_and_infinity_are_named_as_no_json_numbers(writer, session, raw, word):
    """orjson says "unexpected character": people looked for a typo in a body Python's json wrote."""
    response = writer.generic("POST", f"/api/v1/sessions/{session.pk}/versions/", raw, content_type="application/json")
    assert response.status_code == 400 and f"({word} is not a JSON number: write null, or a number)" in response.json()["detail"]


@pytest.mark.parametrize(("raw", "key"), [
    ('{"state": {"a": 1, "a": 2}}', "a"),
    ('{"state":{"a":1,"a":2}}', "a"),  # compact, as clients send
    ('{"state": {"a": 1}, "state": {"b": 2}}', "state"),
    # Last-wins kept 0, the head, and wrote without the check the client asked for.
    ('{"state": {"a": 2}, "expected_version": 99, "expected_version": 0}', "expected_version"),
    ('{"state": {"runs": [{"at": "12:00", "k:1": "x:y", "k:1": 3}]}}', "k:1"),
    ('{"state": {"a": "\\u003a", "\\u0061": 1}}', "a"),  # the same key spelt two ways
])
def test_a_key_written_twice_in_one_object_is_400_naming_it_and_stores_nothing(writer, session, raw, key):
    """JSON parsers keep the last value of a repeated key and drop the other without a word, so the state
    would not read back as sent."""
    before = counts()
    response = writer.generic("POST", f"/api/v1/sessions/{session.pk}/versions/", raw)
    assert response.status_code == 400 and response.json()["code"] == "malformed_request", response.content
    assert response.json()["detail"] == (f'The request body has the key "{key}" twice in one object: JSON keeps only '
                                         "the last one's value, so say each key once.")
    assert counts() == before


@pytest.mark.parametrize("raw", [
    '{"state": {"at": "12:00:01", "k:1": {"a": "b:c"}}}',
    '{"state" : {"a" : [{"a": 1}, {"a": 2}], "b": {"a": {"a": 3}}}}',  # one name in many objects
    '{"state": {"a": "\\u003a", "b": "\\u003a:"}, "step": "s"}',
])
def test_keys_that_only_look_repeated_are_kept(writer, session, raw):
    response = writer.generic("POST", f"/api/v1/sessions/{session.pk}/versions/", raw)
    assert response.status_code == 201, response.content
    assert writer.get(f"/api/v1/sessions/{session.pk}/head/").json()["state"] == orjson.loads(raw)["state"]


def test_other_content_types_are_415(writer, session):
    response = writer.generic("POST", f"/api/v1/sessions/{session.pk}/versions/", "state=1",
                              content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and response.json()["code"] == "unsupported_media_type"


def test_a_body_not_in_utf_8_says_so(writer, session):
    """A latin-1 body read "str is not valid UTF-8: surrogates not allowed", the decoder's words."""
    response = writer.generic("POST", f"/api/v1/sessions/{session.pk}/versions/", '{"state": {"name": "Zoë"}}'.encode("latin-1"),
                              content_type="application/json")
    assert response.status_code == 400
    assert response.json()["detail"] == "The request body is not valid JSON: it must be UTF-8 encoded."
    assert not Version.objects.exists()


def test_metadata_that_cannot_be_stored_is_named_once_with_where_it_is(admin_key):
    """It read "metadata: metadata: a key holds a NUL character"."""
    for metadata, said in (({"a\u0000": 1}, "metadata: A key holds a NUL character, which cannot be stored"),
                           ({"a": "x\u0000"}, "metadata: /a holds a NUL character, which cannot be stored")):
        response = admin_key.post("/api/v1/sessions/", {"external_id": "m", "metadata": metadata}, format="json")
        assert response.status_code == 400 and response.json()["detail"] == said
    assert not WorkflowSession.objects.exists()


def test_a_body_over_the_limit_is_413(writer, session, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    response = writer.post(f"/api/v1/sessions/{session.pk}/versions/", {"state": {"blob": "x" * 4096}}, format="json")
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"
    assert not Version.objects.exists()


def test_a_state_over_the_limit_is_413(writer, session, settings):
    settings.STATE_MAX_BYTES = 1024
    response = writer.post(f"/api/v1/sessions/{session.pk}/versions/", {"state": {"blob": "x" * 2000}}, format="json")
    assert response.status_code == 413 and response.json()["code"] == "state_too_large"
    assert not Version.objects.exists()


def test_throttled_per_key_with_retry_after(project, settings):
    from tests.api.conftest import key_client

    settings.API_RATE_LIMIT = "3/min"
    busy, quiet = key_client(project, "read"), key_client(project, "read")
    assert [busy.get("/api/v1/projects/").status_code for _ in range(3)] == [200, 200, 200]
    limited = busy.get("/api/v1/projects/")
    assert limited.status_code == 429 and limited.json()["code"] == "throttled"
    assert 1 <= int(limited["Retry-After"]) <= 60
    assert quiet.get("/api/v1/projects/").status_code == 200


def test_a_lowered_rate_limit_still_says_when_to_retry(project, settings):
    """A key whose recent requests already exceed a lowered limit is told how long to wait."""
    from tests.api.conftest import key_client

    busy = key_client(project, "read")
    settings.API_RATE_LIMIT = "10/min"
    assert [busy.get("/api/v1/projects/").status_code for _ in range(5)] == [200] * 5
    settings.API_RATE_LIMIT = "2/min"
    limited = busy.get("/api/v1/projects/")
    assert limited.status_code == 429
    assert 1 <= int(limited["Retry-After"]) <= 60


def test_unknown_routes_methods_and_ids(writer, session, client):
    for response in (writer.get("/api/v1/nothing/here/"), client.post("/api/v1/sessions/x/y/z/"), writer.get("/api/v1/")):
        assert response.status_code == 404 and response["Content-Type"] == "application/problem+json"
    assert writer.get("/api/v1/sessions/not-a-uuid/").status_code == 404
    assert writer.get(f"/api/v1/sessions/{session.pk}/versions/abc/").json()["code"] == "version_not_found"
    assert writer.put(f"/api/v1/sessions/{session.pk}/", {}, format="json").status_code == 405
    assert writer.get(f"/api/v1/sessions/{session.pk}/head/").json()["code"] == "version_not_found"


@pytest.mark.parametrize("position", ["garbage", "2026-13-45", "12\x00"])
def test_forged_cursors_are_400(writer, session, position):
    from base64 import b64encode

    cursor = b64encode(f"p={position}".encode()).decode()
    assert writer.get(f"/api/v1/projects/?cursor={cursor}").status_code == 400
    assert writer.get(f"/api/v1/sessions/{session.pk}/versions/?cursor={cursor}").status_code == 400
    assert writer.get("/api/v1/retention-policy/?project=%00x").status_code == 404


def test_an_unknown_format_parameter_is_406_not_404(writer, session):
    for path in (f"/api/v1/sessions/{session.pk}/", "/api/v1/sessions/"):
        response = writer.get(f"{path}?format=csv")
        assert response.status_code == 406, (path, response.content)
        assert response["Content-Type"] == "application/problem+json" and response.json()["code"] == "not_acceptable"
    assert writer.get("/api/v1/schema/?format=csv").status_code == 406
    assert writer.get(f"/api/v1/sessions/{session.pk}/?format=json").status_code == 200
    assert writer.get("/api/v1/schema/?format=json").status_code == 200


def test_accepting_only_problem_json_gets_the_error_itself_not_a_406(writer, session):
    """RFC 9457 has clients say they read problems with Accept: application/problem+json; alone, it was
    a 406 hiding the error asked about."""
    gone = writer.get("/api/v1/sessions/00000000-0000-0000-0000-000000000000/", HTTP_ACCEPT="application/problem+json")
    assert gone.status_code == 404 and gone.json()["code"] == "session_not_found"
    assert gone["Content-Type"] == "application/problem+json"
    found = writer.get(f"/api/v1/sessions/{session.pk}/", HTTP_ACCEPT="application/problem+json")
    assert found.status_code == 200 and found.json()["id"] == str(session.pk)
    assert writer.get(f"/api/v1/sessions/{session.pk}/", HTTP_ACCEPT="text/csv").status_code == 406


@pytest.mark.parametrize("cursor", ["!!!!", "%00", "cD0x%20", "aGVsbG8=", "eD0x", "w6k="])
def test_mangled_cursors_are_400_not_the_first_page_again(writer, session, cursor):
    """Not base64, or not one of ours (b"hello", b"x=1", non-ASCII): DRF read those as no cursor."""
    for path in ("/api/v1/projects/", "/api/v1/sessions/", f"/api/v1/sessions/{session.pk}/versions/"):
        response = writer.get(f"{path}?cursor={cursor}")
        assert response.status_code == 400, (path, response.content)
        assert response.json()["errors"] == {"cursor": ["Invalid cursor."]}


def test_64_bit_integers_and_long_digit_strings_are_kept_exactly(writer, session):
    state = {"max": 18446744073709551615, "min": -9223372036854775808, "text": "123456789012345678901234567890"}
    response = writer.post(f"/api/v1/sessions/{session.pk}/versions/", {"state": state}, format="json")
    assert response.status_code == 201
    assert writer.get(f"/api/v1/sessions/{session.pk}/head/").json()["state"] == state


OPS_BAD_WRITES = [
    ("put", "/api/v1/retention-policy/", {"enabled": True, "keep_last": -1, "keep_days": 1, "thin_to": "day"}, 400),
    ("put", "/api/v1/retention-policy/", {"enabled": "yes", "keep_last": 1, "keep_days": 1, "thin_to": "day"}, 400),
    ("post", "/api/v1/compaction/", {"dry_run": "no"}, 400),
    ("post", "/api/v1/exports/", {"session": "not-a-uuid"}, 400),
    ("post", "/api/v1/exports/", {"session": 123}, 400),
    ("post", "/api/v1/exports/", {"session": "00000000-0000-0000-0000-000000000000"}, 404),
    ("post", "/api/v1/imports/", None, 400),
    ("delete", "/api/v1/keys/999999/", None, 404),
    ("delete", "/api/v1/sessions/00000000-0000-0000-0000-000000000000/", None, 404),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), OPS_BAD_WRITES)
def test_bad_operations_get_a_problem_and_start_nothing(project, method, path, body, status, settings, tmp_path):
    from snapshots_app.models import Job, RetentionPolicy
    from tests.api.conftest import key_client

    settings.VAR_DIR = tmp_path
    client = key_client(project, "admin")
    before = (*counts(), Job.objects.count(), RetentionPolicy.objects.count())
    if body is None:
        response = getattr(client, method)(path)
    else:
        response = getattr(client, method)(path, body, format="json")
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert (*counts(), Job.objects.count(), RetentionPolicy.objects.count()) == before
    assert not list(tmp_path.rglob("*.ndjson"))


# Query strings and path parts the database cannot take (a NUL byte) or int() cannot read ("²" passes
# str.isdigit()): a problem, never a 500. (path, with {sid} for the session; expected status; code)
BAD_QUERIES = [
    ("/api/v1/sessions/?limit=%C2%B2", 400, "invalid_request"),
    ("/api/v1/sessions/?limit=%EF%BC%91", 400, "invalid_request"),  # fullwidth one
    ("/api/v1/sessions/{sid}/versions/?limit=%C2%B2", 400, "invalid_request"),
    ("/api/v1/projects/?limit=%C2%B2", 400, "invalid_request"),
    ("/api/v1/audit-events/?limit=%C2%B2", 400, "invalid_request"),
    ("/api/v1/audit-events/?action=session.rewnd", 400, "invalid_request"),  # was an empty list
    ("/api/v1/jobs/?limit=%C2%B2", 400, "invalid_request"),
    ("/api/v1/integrity-problems/?limit=%C2%B2", 400, "invalid_request"),
    ("/api/v1/keys/?limit=%C2%B2", 400, "invalid_request"),
    ("/api/v1/keys/%C2%B2/", 404, "not_found"),
    ("/api/v1/keys/99999999999999999999999/", 404, "not_found"),
    ("/api/v1/projects/%00/", 404, "not_found"),
    ("/api/v1/projects/a%00b/", 404, "not_found"),
    ("/api/v1/sessions/?project=a%00b", 400, "invalid_request"),
    ("/api/v1/retention-policy/?project=a%00b", 404, "not_found"),
]


@pytest.mark.parametrize(("path", "status", "code"), BAD_QUERIES)
def test_unreadable_query_values_are_problems(admin_key, session, path, status, code):
    response = admin_key.get(path.format(sid=session.pk))
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json" and response.json()["code"] == code


@pytest.mark.parametrize("reason", ["a\x00b", "x" * 2001])
def test_delete_with_a_bad_reason_is_400_and_deletes_nothing(admin_key, session, reason):
    before = counts()
    response = admin_key.delete(f"/api/v1/sessions/{session.pk}/", QUERY_STRING=urlencode({"reason": reason}))
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid_request" and "reason" in response.json()["errors"]
    assert counts() == before


def test_a_delete_with_a_body_is_400_naming_its_fields_and_deletes_nothing(admin_key, session):
    """The reason goes in the query: one sent in the body was dropped (beside ?reason=, the delete went ahead)."""
    before = counts()
    for query in ("", "reason=cleanup"):
        response = admin_key.delete(f"/api/v1/sessions/{session.pk}/", {"reason": "in the body"}, format="json",
                                    QUERY_STRING=query)
        assert response.status_code == 400, response.content
        assert response.json()["code"] == "invalid_request" and "?reason=" in response.json()["errors"]["reason"][0]
    key_id = admin_key.get("/api/v1/keys/").json()["results"][0]["id"]
    response = admin_key.delete(f"/api/v1/keys/{key_id}/", {"why": "rotated"}, format="json")
    assert response.status_code == 400 and list(response.json()["errors"]) == ["why"]
    assert counts() == before and not ApiKey.objects.filter(revoked_at__isnull=False).exists()
    assert admin_key.delete(f"/api/v1/sessions/{session.pk}/", QUERY_STRING="reason=cleanup").status_code == 204


# A misspelt field is a 400 naming it, not a silently skipped check. (path tail as in BAD_WRITES, method, body, field)
UNKNOWN_FIELDS = [
    ("versions/", "post", {"state": {"a": 2}, "expected_verison": 0}, "expected_verison"),
    ("versions/batch/", "post", {"versions": [{"state": {"a": 2}}], "expected_verison": 0}, "expected_verison"),
    ("versions/batch/", "post", {"versions": [{"state": {"a": 2}, "stepp": "x"}]}, "versions"),
    ("versions/1/", "patch", {"pinned": True, "labell": "x"}, "labell"),
    ("rewind/", "post", {"to_version": 1, "reason": "x", "expected_verison": 0}, "expected_verison"),
    ("fork/", "post", {"from_version": 1, "reason": "what if", "externalid": "copy"}, "externalid"),
    ("archive/", "post", {"reasn": "x"}, "reasn"),
    ("unarchive/", "post", {"reasn": "x"}, "reasn"),
    ("", "patch", {"stauts": "completed"}, "stauts"),
    ("/api/v1/sessions/", "post", {"external_id": "new", "workflw": "x"}, "workflw"),
    ("/api/v1/keys/", "post", {"name": "k", "scopes": ["read"], "scope": "admin"}, "scope"),
    ("/api/v1/retention-policy/", "put",
     {"enabled": True, "keep_last": 1, "keep_days": 0, "thin_to": "day", "keep_lst": 5}, "keep_lst"),
    ("/api/v1/compaction/", "post", {"dryrun": False}, "dryrun"),
    ("/api/v1/exports/", "post", {"sesion": "x"}, "sesion"),
    ("/api/v1/integrity-scrub/", "post", {"budget": 5}, "budget"),
]


@pytest.mark.parametrize(("tail", "method", "body", "field"), UNKNOWN_FIELDS)
def test_unknown_body_fields_are_400_and_nothing_changes(project, session, tail, method, body, field):
    from snapshots_app.models import Job, RetentionPolicy
    from tests.api.conftest import key_client

    client = key_client(project, "admin")
    snapshot_record(session=session, state={"a": 1})
    path = tail if tail.startswith("/") else f"/api/v1/sessions/{session.pk}/{tail}"
    before = (counts(), Job.objects.count(), RetentionPolicy.objects.count(),
              list(WorkflowSession.objects.values_list("status", "archived_at")))
    response = getattr(client, method)(path, body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid_request" and field in response.json()["errors"]
    assert (counts(), Job.objects.count(), RetentionPolicy.objects.count(),
            list(WorkflowSession.objects.values_list("status", "archived_at"))) == before


def test_read_only_fields_sent_back_are_ignored(admin_key):
    policy = admin_key.get("/api/v1/retention-policy/").json()
    policy["keep_last"] = 7
    response = admin_key.put("/api/v1/retention-policy/", policy, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["keep_last"] == 7


def nested_json(depth):
    return '{"x":' * depth + "1" + "}" * depth


# Metadata nested past STATE_MAX_DEPTH: deeper than orjson can write (255), its limit was a 500 at
# the edge (and when hashed for an Idempotency-Key); 201 levels would nest the answers past it.
@pytest.mark.parametrize("depth", [201, 300, 1000])
@pytest.mark.parametrize("idempotency_key", [None, "deep-1"])
@pytest.mark.parametrize("method", ["post", "patch"])
def test_too_deep_metadata_is_400_and_stores_nothing(admin_key, session, method, idempotency_key, depth):
    path = "/api/v1/sessions/" if method == "post" else f"/api/v1/sessions/{session.pk}/"
    fields = '"external_id": "deep", ' if method == "post" else ""
    body = f'{{{fields}"metadata": {nested_json(depth)}}}'
    headers = {"HTTP_IDEMPOTENCY_KEY": idempotency_key} if idempotency_key else {}
    before = counts()
    response = admin_key.generic(method.upper(), path, body, **headers)
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "invalid_request" and "metadata" in response.json()["errors"]
    assert counts() == before
    session.refresh_from_db()
    assert session.metadata == {}


def test_metadata_at_the_depth_limit_is_kept_and_reads_back(admin_key, session):
    response = admin_key.generic("PATCH", f"/api/v1/sessions/{session.pk}/", f'{{"metadata": {nested_json(200)}}}')
    assert response.status_code == 200, response.content
    for path in (f"/api/v1/sessions/{session.pk}/", "/api/v1/sessions/", "/api/v1/audit-events/"):
        assert admin_key.get(path).status_code == 200, path


@pytest.mark.parametrize("method", ["post", "patch"])
def test_oversized_metadata_is_400_naming_the_limit_and_stores_nothing(admin_key, session, method):
    """Every session list carries each session's metadata: two 17 MB objects made a 200-session page
    27 MB. Metadata up to SESSION_METADATA_MAX_BYTES is kept; one byte more is refused."""
    path = "/api/v1/sessions/" if method == "post" else f"/api/v1/sessions/{session.pk}/"
    fields = {"external_id": "big"} if method == "post" else {}
    filler = "x" * (settings.SESSION_METADATA_MAX_BYTES - len('{"blob":""}'))
    before = counts()
    response = admin_key.generic(method.upper(), path, orjson.dumps({**fields, "metadata": {"blob": filler + "x"}}))
    assert response.status_code == 400, response.content
    assert "SESSION_METADATA_MAX_BYTES" in response.json()["errors"]["metadata"][0]
    assert counts() == before
    response = admin_key.generic(method.upper(), path, orjson.dumps({**fields, "metadata": {"blob": filler}}))
    assert response.status_code in (200, 201), response.content
    created = WorkflowSession.objects.get(external_id="big") if method == "post" else session
    created.refresh_from_db()
    assert created.metadata == {"blob": filler}


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("tail", ["versions/", "/api/v1/sessions/", "/api/v1/imports/"])
def test_a_compressed_body_is_415_not_read_as_plain(admin_key, session, settings, tmp_path, tail, gzipped):
    """Content-Encoding is not decoded: a gzip body was judged on its compressed bytes (400 'not
    JSON', or an import job bound to fail), and a plain body labelled gzip was stored as if unlabelled."""
    import gzip

    from snapshots_app.models import Job

    settings.VAR_DIR = tmp_path
    path = tail if tail.startswith("/") else f"/api/v1/sessions/{session.pk}/{tail}"
    body = b'{"state": {"a": 1}}' if tail == "versions/" else b'{"external_id": "zipped"}'
    content_type = "application/x-ndjson" if tail == "/api/v1/imports/" else "application/json"
    before = (counts(), Job.objects.count())
    response = admin_key.generic("POST", path, gzip.compress(body) if gzipped else body, content_type=content_type,
                                 HTTP_CONTENT_ENCODING="gzip")
    assert response.status_code == 415, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "unsupported_media_type" and "Content-Encoding" in response.json()["detail"]
    assert (counts(), Job.objects.count()) == before
    identity = admin_key.generic("POST", path, body, content_type=content_type, HTTP_CONTENT_ENCODING="identity")
    assert identity.status_code < 300 or tail == "/api/v1/imports/", identity.content


def test_the_default_rate_limit_lets_an_engine_checkpoint_in_a_tight_loop_and_stops_a_runaway(project, monkeypatch):
    """A LangGraph engine in a tight loop sends about 30 requests a second for as long as it runs. The
    old default, 1,200/min, throttled it after 40 s and then stalled it 20 s (its Retry-After)."""
    from types import SimpleNamespace

    from sessions_app.api.auth import PrincipalRateThrottle
    from sessions_app.services import api_key_create
    from tests.api.conftest import key_client

    clock = [1_000_000.0]
    monkeypatch.setattr(PrincipalRateThrottle, "timer", lambda self: clock[0])
    key, _ = api_key_create(project=project, name="engine", scopes="read")
    request = SimpleNamespace(auth=key, user=None)  # what the throttle reads of an API request
    allowed = []
    for _ in range(1_800):  # a minute at 30 requests a second (the throttle itself: 1,800 requests take long)
        allowed.append(PrincipalRateThrottle().allow_request(request, None))  # type: ignore[arg-type]
        clock[0] += 1 / 30
    assert allowed.count(True) == 1_800

    clock[0] += 60
    runaway = key_client(project, "read")
    answers = [runaway.get("/api/v1/projects/") for _ in range(150)]  # 150 in the same instant
    assert [answer.status_code for answer in answers].count(200) == 100
    assert answers[-1].status_code == 429 and answers[-1]["Retry-After"] == "1"


def test_a_write_to_a_path_without_its_trailing_slash_is_redirected_as_the_same_write(writer, session):
    """A 301 there made clients (requests, curl -L) repeat a POST as a GET, and requests drops a
    PATCH's body: the snapshot was lost behind a 200 that listed the versions. 308 keeps both."""
    versions = f"/api/v1/sessions/{session.pk}/versions"
    moved = writer.post(versions, {"state": {"a": 1}}, format="json")
    assert moved.status_code == 308 and moved["Location"] == versions + "/"
    assert not Version.objects.exists()
    followed = writer.post(versions, {"state": {"a": 1}}, format="json", follow=True)
    assert followed.status_code == 201 and followed.redirect_chain == [(versions + "/", 308)]
    assert Version.objects.get(session=session).number == 1

    patch = writer.patch(f"/api/v1/sessions/{session.pk}?x=1", {"tags": ["t"]}, format="json")
    assert patch.status_code == 308 and patch["Location"] == f"/api/v1/sessions/{session.pk}/?x=1"
    assert writer.get("/api/v1/sessions").status_code == 301  # reads keep Django's redirect


def test_every_read_refuses_a_query_parameter_it_does_not_take_and_takes_those_it_documents(project, admin_key, session):
    """Each GET the schema lists answers 400 invalid_request naming a query parameter it does not take
    (the lists did; the diff, a version, the head, a job's file and the retention policy ignored one),
    and none refuses as unknown a parameter the schema documents for it."""
    from snapshots_app.models import Job, JobKind

    snapshot_record(session=session, state={"a": 1})
    snapshot_record(session=session, state={"a": 2})
    job = Job.objects.create(project=project, kind=JobKind.EXPORT)
    values = {"id": str(session.pk), "number": "1", "slug": project.slug, "job_id": str(job.pk),
              "key_id": str(ApiKey.objects.get(project=project).pk)}
    schema = admin_key.get("/api/v1/schema/?format=json").json()
    reads = [(path, operation) for path, item in schema["paths"].items() for method, operation in item.items()
             if method == "get"]
    assert len(reads) >= 15
    for template, operation in reads:
        path = template.format(**values)
        refused = admin_key.get(path, {"colour": "blue"})
        assert refused.status_code == 400, (template, refused.content)
        problem = refused.json()
        assert problem["code"] == "invalid_request" and list(problem["errors"]) == ["colour"], template
        assert "Unknown query parameter" in problem["detail"], template
        documented = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
        for name in documented:
            value = {"to_session": str(session.pk), "ordering": "-number"}.get(name, "1")
            answer = admin_key.get(path, {name: value})
            assert "Unknown query parameter" not in answer.content.decode(), (template, name, answer.content)


def test_every_write_refuses_a_query_parameter_it_does_not_take_and_stores_nothing(project, admin_key, session):
    """A write's input goes in its body: ?expected_version=3 on a snapshot was ignored, so the check the
    caller asked for was skipped and the write made. Each POST, PUT, PATCH and DELETE the schema lists
    answers 400 invalid_request naming such a parameter, and writes nothing; none refuses as unknown a
    parameter the schema documents for it (a session delete's ?reason=, an import's ?project=)."""
    snapshot_record(session=session, state={"a": 1})
    values = {"id": str(session.pk), "number": "1", "slug": project.slug, "job_id": "1", "problem_id": "1",
              "key_id": str(ApiKey.objects.get(project=project).pk)}
    schema = admin_key.get("/api/v1/schema/?format=json").json()
    writes = [(method, path, operation) for path, item in schema["paths"].items()
              for method, operation in item.items() if method in ("post", "put", "patch", "delete")]
    assert len(writes) >= 15
    before = counts()
    for method, template, operation in writes:
        path = template.format(**values)
        refused = getattr(admin_key, method)(f"{path}?expected_version=1", {}, format="json")
        assert refused.status_code == 400, (method, template, refused.content)
        problem = refused.json()
        assert problem["code"] == "invalid_request" and list(problem["errors"]) == ["expected_version"], template
        documented = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
        assert ("goes in its JSON body" in problem["detail"]) is not bool(documented), template
    snapshot = admin_key.post(f"/api/v1/sessions/{session.pk}/versions/?expected_version=0", {"state": {"a": 2}},
                              format="json")
    assert snapshot.status_code == 400
    assert counts() == before
    for method, template, operation in sorted(writes, key=lambda write: write[0] == "delete"):  # (these may act)
        documented = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
        for name in documented:
            answer = getattr(admin_key, method)(f"{template.format(**values)}?{name}=x", {}, format="json")
            assert "Unknown query parameter" not in answer.content.decode(), (method, template, name)

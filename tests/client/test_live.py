"""The client against a live server: every endpoint, the typed errors, idempotency and rate limits."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from pydantic import BaseModel
from session_rewind_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    RateLimited,
    RetryPolicy,
    SessionRewindError,
    ValidationError,
)


def test_readme_example(rewind):
    s = rewind.create_session("readme-run", workflow="demo")
    for n in (1, 2, 3):
        rewind.record(s["id"], {"step": n, "log": list(range(n))}, step=f"step-{n}")
    changes = rewind.diff(s["id"], 1, 3)["changes"]
    rewind.rewind(s["id"], 2, reason="step 3 was wrong")
    head = rewind.head(s["id"])

    assert {change["path"] for change in changes} >= {"/step", "/log/1"}
    assert head["number"] == 4 and head["kind"] == "rewind" and head["parent"] == 2
    assert head["state"] == {"step": 2, "log": [0, 1]}
    assert head["etag"]
    assert rewind.head(s["id"], if_none_match=head["etag"]) is None
    rewind.record(s["id"], {"step": 5})
    assert rewind.head(s["id"], if_none_match=head["etag"])["number"] == 5


def test_sessions_create_list_get_update_archive_delete(rewind):
    first = rewind.create_session("s-1", workflow="billing", metadata={"owner": "ops"}, tags=["nightly"])
    again = rewind.create_session("s-1")
    other = rewind.create_session("s-2", workflow="search")
    assert first["created"] is True and again["created"] is False and again["id"] == first["id"]

    assert [s["external_id"] for s in rewind.list_sessions(workflow="billing")["results"]] == ["s-1"]
    assert [s["id"] for s in rewind.list_sessions(tag="nightly")["results"]] == [first["id"]]
    assert [s["id"] for s in rewind.list_sessions(q="s-2")["results"]] == [other["id"]]
    assert {s["id"] for s in rewind.iter_sessions(limit=1)} == {first["id"], other["id"]}

    updated = rewind.update_session(first["id"], status="waiting", tags=["nightly", "vip"])
    assert updated["status"] == "waiting" and rewind.get_session(first["id"])["tags"] == ["nightly", "vip"]
    assert [s["id"] for s in rewind.list_sessions(status="waiting")["results"]] == [first["id"]]

    assert rewind.archive_session(other["id"], reason="done")["archived_at"]
    with pytest.raises(ConflictError) as caught:
        rewind.record(other["id"], {"x": 1})
    assert caught.value.code == "session_archived"
    assert rewind.unarchive_session(other["id"], reason="one more step")["archived_at"] is None
    assert rewind.record(other["id"], {"x": 1})["number"] == 1

    assert rewind.delete_session(other["id"], reason="cleanup") is None
    with pytest.raises(NotFound) as caught:
        rewind.get_session(other["id"])
    assert caught.value.status == 404 and caught.value.code == "session_not_found"


def test_versions_record_list_get_head_batch_pin_label(rewind):
    s = rewind.create_session("v-1")
    v1 = rewind.record(s["id"], {"n": 1}, step="load", status="running", engine="home-grown", engine_version="1.0",
                       tags=["first"], label="start", expected_version=0)
    assert (v1["number"], v1["parent"], v1["step"], v1["engine"], v1["label"]) == (1, None, "load", "home-grown", "start")
    batch = rewind.record_batch(s["id"], [{"state": {"n": 2}, "step": "a"}, {"state": {"n": 3}, "step": "b"}],
                                expected_version=1)
    assert [v["number"] for v in batch["versions"]] == [2, 3]

    assert [v["number"] for v in rewind.list_versions(s["id"])["results"]] == [3, 2, 1]
    assert "state" not in rewind.list_versions(s["id"])["results"][0]
    assert [v["number"] for v in rewind.iter_versions(s["id"], limit=2)] == [3, 2, 1]
    assert [v["number"] for v in rewind.list_versions(s["id"], tag="first")["results"]] == [1]
    assert rewind.get_version(s["id"], 2)["state"] == {"n": 2}
    head = rewind.head(s["id"])
    assert head["number"] == 3 and head["state"] == {"n": 3} and head["checksum"] == rewind.get_version(s["id"], 3)["checksum"]

    assert rewind.pin(s["id"], 2)["pinned"] is True
    assert rewind.label(s["id"], 2, "good")["label"] == "good"
    assert [v["number"] for v in rewind.list_versions(s["id"], pinned="true")["results"]] == [2]


def test_stale_writes_are_refused_and_nothing_is_written(rewind):
    s = rewind.create_session("c-1")
    rewind.record(s["id"], {"n": 1})
    stale_etag = rewind.head(s["id"])["etag"]
    rewind.record(s["id"], {"n": 2}, expected_version=1)
    with pytest.raises(ConflictError) as caught:
        rewind.record(s["id"], {"n": 3}, expected_version=1)
    assert caught.value.status == 409 and caught.value.code == "version_conflict"
    assert caught.value.details["head"] == 2
    with pytest.raises(PreconditionFailed):
        rewind.record(s["id"], {"n": 3}, if_match=stale_etag)
    with pytest.raises(ConflictError):
        rewind.rewind(s["id"], 1, reason="late", expected_version=1)
    assert rewind.get_session(s["id"])["head"] == 2


def test_an_engine_chains_if_match_from_each_answer_through_records_rewinds_and_batches(rewind):
    # The README's If-Match works on snapshots, batches and rewinds; the client took it on `record`
    # alone and kept the ETag of `head` only, so an engine paid a GET per write to learn its next tag.
    s = rewind.create_session("etag-chain")
    first = rewind.record(s["id"], {"n": 1})
    second = rewind.record(s["id"], {"n": 2}, if_match=first["etag"])
    back = rewind.rewind(s["id"], 1, reason="n=2 was wrong", if_match=second["etag"])
    assert back["etag"] == rewind.head(s["id"])["etag"] and back["number"] == 3
    assert rewind.record(s["id"], {"n": 3}, if_match=back["etag"], idempotency_key="n3")["number"] == 4
    assert rewind.record(s["id"], {"n": 3}, if_match=back["etag"], idempotency_key="n3")["etag"]  # a retry, replayed

    with pytest.raises(PreconditionFailed):
        rewind.rewind(s["id"], 1, reason="stale", if_match=second["etag"])
    with pytest.raises(PreconditionFailed):
        rewind.record_batch(s["id"], [{"state": {"n": 5}}], if_match=back["etag"])
    assert rewind.get_session(s["id"])["head"] == 4
    batch = rewind.record_batch(s["id"], [{"state": {"n": 5}}, {"state": {"n": 6}}], if_match=rewind.head(s["id"])["etag"])
    assert [v["number"] for v in batch["versions"]] == [5, 6]
    # A batch's answer gives the new head's etag too: the next batch, or a trim, chains on it.
    chained = rewind.record_batch(s["id"], [{"state": {"n": 7}}], if_match=batch["etag"])
    assert chained["etag"] == rewind.head(s["id"])["etag"] and chained["versions"][0]["number"] == 7
    with pytest.raises(PreconditionFailed):
        rewind.trim(s["id"], [7], reason="stale", if_match=batch["etag"])
    assert rewind.get_session(s["id"])["version_count"] == 7


def test_idempotency_key_replays_the_first_answer(rewind):
    s = rewind.create_session("i-1")
    first = rewind.record(s["id"], {"n": 1}, idempotency_key="step-1")
    again = rewind.record(s["id"], {"n": 1}, idempotency_key="step-1")
    assert again["number"] == first["number"] == 1 and rewind.get_session(s["id"])["version_count"] == 1


def test_every_write_the_server_remembers_takes_the_callers_own_idempotency_key(rewind):
    """README: give a write you may have to repeat your own idempotency_key=. trim, pin, label and a key's
    expiry took none (a TypeError), though the server remembers their answers."""
    s = rewind.create_session("i-2")
    for n in range(3):
        rewind.record(s["id"], {"n": n})
    first = rewind.trim(s["id"], [3], reason="cleanup", idempotency_key="trim-1")
    rewind.record(s["id"], {"n": 3})  # the head moves on: a new trim keeping v3 alone would be refused
    assert rewind.trim(s["id"], [3], reason="cleanup", idempotency_key="trim-1") == first
    assert rewind.pin(s["id"], 4, idempotency_key="pin-1")["pinned"] is True
    assert rewind.label(s["id"], 4, "good", idempotency_key="label-1")["label"] == "good"
    key = rewind.create_api_key("rotating", scopes=["read"])
    moved = rewind.set_api_key_expiry(key["id"], "2030-01-01T00:00:00Z", idempotency_key="expiry-1")
    assert moved["expires_at"].startswith("2030-01-01")


def test_bad_input_is_a_validation_error(rewind):
    s = rewind.create_session("bad-1")
    with pytest.raises(ValidationError) as caught:
        rewind.record(s["id"], {"n": 1}, tags=["not a valid tag!"])
    assert caught.value.status == 400 and caught.value.detail
    with pytest.raises(ValidationError):
        rewind.record(s["id"], {"n": 1}, status="sleeping")
    with pytest.raises(ValidationError):
        rewind.create_session("  ")
    with pytest.raises(NotFound):
        rewind.get_version(s["id"], 9)
    assert rewind.get_session(s["id"])["version_count"] == 0


def test_diff_rewind_fork_and_audit(rewind):
    s = rewind.create_session("d-1")
    rewind.record(s["id"], {"messages": ["hi"], "pointer": "a"})
    rewind.record(s["id"], {"messages": ["hi", "there"], "pointer": "b"})
    diff = rewind.diff(s["id"], 1, 2)
    assert sorted((c["path"], c["op"]) for c in diff["changes"]) == [("/messages/1", "add"), ("/pointer", "replace")]
    assert diff["patch"]
    first = rewind.diff(s["id"], 1, 2, limit=1)
    rest = rewind.diff(s["id"], 1, 2, limit=1, offset=first["next_offset"])
    assert first["changes"] + rest["changes"] == diff["changes"] and rest["next_offset"] is None

    head = rewind.rewind(s["id"], 1, reason="pointer b was a bad branch")
    assert (head["number"], head["parent"], head["state"]) == (3, 1, {"messages": ["hi"], "pointer": "a"})

    fork = rewind.fork(s["id"], 2, external_id="d-1-what-if", reason="try b again")
    assert fork["external_id"] == "d-1-what-if" and fork["head"] == 1
    fork_head = rewind.head(fork["id"])
    assert fork_head["parent_session"] == s["id"] and fork_head["parent"] == 2
    assert rewind.diff(s["id"], 3, 1, to_session=fork["id"])["changes"]

    rewind.record(s["id"], {"messages": ["hi", "again"], "pointer": "c"})
    trimmed = rewind.trim(s["id"], [4, 4], reason="only the latest matters", expected_version=4)
    assert trimmed == {"removed": [1, 3], "kept": [2, 4], "protected": [2]}  # v2: the fork's source

    actions = {e["action"] for e in rewind.list_audit_events(session=s["id"])["results"]}
    assert {"session.rewind", "session.fork", "session.trim"} <= actions

    held = rewind.create_session("d-json")  # LlamaIndex keeps every value as a JSON string
    rewind.record(held["id"], {"ctx": '{"step": 1, "queue": []}'})
    rewind.record(held["id"], {"ctx": '{"step": 2, "queue": []}'})
    inside = rewind.diff(held["id"], 1, 2)["changes"]
    assert [(c["string_path"], c["path"], c["new"]) for c in inside] == [("/ctx", "/step", 2)]
    whole = rewind.diff(held["id"], 1, 2, structural_strings=False)["changes"]
    assert [(c["path"], c["new"]) for c in whole] == [("/ctx", '{"step": 2, "queue": []}')]
    rewinds = list(rewind.iter_audit_events(action="session.rewind", limit=1))
    assert [e["reason"] for e in rewinds] == ["pointer b was a bad branch"]


def test_an_engine_key_that_expired_says_so_and_works_again_once_extended(live_api, rewind):
    from datetime import UTC, datetime, timedelta

    from sessions_app.models import ApiKey

    soon = datetime.now(UTC) + timedelta(hours=1)
    created = rewind.create_api_key("engine", scopes=["read"], expires_at=soon)
    assert datetime.fromisoformat(created["expires_at"]) == soon
    assert rewind.create_api_key("forever", scopes=["read"], never_expires=True)["expires_at"] is None
    ApiKey.objects.filter(pk=created["id"]).update(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with Client(live_api.url, api_key=created["key"]) as engine:
        with pytest.raises(AuthenticationError) as caught:
            engine.list_sessions()
        assert caught.value.code == "api_key_expired" and "expired_at" in caught.value.details
        assert [k["name"] for k in rewind.list_api_keys(status="expired")["results"]] == ["engine"]
        assert rewind.set_api_key_expiry(created["id"], soon + timedelta(days=30))["status"] == "active"
        assert engine.list_sessions()["results"] == []


def test_keys_projects_and_permissions(live_api, rewind, monkeypatch):
    monkeypatch.delenv("SESSION_REWIND_API_KEY", raising=False)
    assert [p["slug"] for p in rewind.list_projects()["results"]] == ["acme-live"]
    assert rewind.get_project("acme-live")["slug"] == "acme-live"

    created = rewind.create_api_key("reader", scopes=["read"])
    assert created["key"].startswith("sr_") and created["scopes"] == ["read"]
    assert "reader" in {k["name"] for k in rewind.list_api_keys()["results"]}
    assert rewind.get_api_key(created["id"])["name"] == "reader"

    s = rewind.create_session("p-1")
    with Client(live_api.url) as anonymous, pytest.raises(AuthenticationError) as caught:
        anonymous.list_sessions()
    assert caught.value.status == 401
    with Client(live_api.url, api_key=created["key"]) as reader:
        assert reader.get_session(s["id"])["external_id"] == "p-1"
        with pytest.raises(PermissionDenied) as caught:
            reader.record(s["id"], {"n": 1})
        assert caught.value.status == 403
    rewind.revoke_api_key(created["id"])
    with Client(live_api.url, api_key=created["key"]) as revoked, pytest.raises(AuthenticationError):
        revoked.get_session(s["id"])

    with pytest.raises(NotFound):
        rewind.get_session(uuid.uuid4())


def test_rate_limit_answers_429_with_retry_after(live_api, settings):
    settings.API_RATE_LIMIT = "2/min"
    with Client(live_api.url, api_key=live_api.key, retry=RetryPolicy(max_retries=0)) as client:
        client.list_sessions()
        client.list_sessions()
        with pytest.raises(RateLimited) as caught:
            client.list_sessions()
    assert caught.value.status == 429 and caught.value.retry_after and caught.value.retry_after > 0


def test_async_client_end_to_end(live_api):
    async def main() -> tuple[dict, list[int], dict]:
        async with live_api.aclient() as client:
            s = await client.create_session("async-1")
            for n in (1, 2, 3):
                await client.record(s["id"], {"n": n})
            await client.rewind(s["id"], 1, reason="async rewind")
            numbers = [v["number"] async for v in client.iter_versions(s["id"], limit=2)]
            return await client.head(s["id"]), numbers, await client.diff(s["id"], 1, 3)

    head, numbers, diff = asyncio.run(main())
    assert head["state"] == {"n": 1} and numbers == [4, 3, 2, 1]
    assert [(c["path"], c["old"], c["new"]) for c in diff["changes"]] == [("/n", 1, 3)]


def test_walking_every_session_lists_one_written_meanwhile(live_api, rewind):
    # The list's default order is by activity: a session written while the walk went on moved above
    # its cursor, and iter_sessions ("every session") never listed it: a sweep missed the sessions
    # engines were writing.
    ids = [rewind.create_session(f"walk-{n}", tags=["walk"])["id"] for n in range(5)]
    seen = []
    for session in rewind.iter_sessions(tag="walk", limit=2):
        if not seen:
            rewind.record(ids[0], {"written": "while the walk was on its first page"})
        seen.append(session["id"])
    assert sorted(seen) == sorted(ids)

    async def walk() -> list[str]:
        async with live_api.aclient() as client:
            found = []
            async for session in client.iter_sessions(tag="walk", limit=2):
                if not found:
                    await client.record(ids[1], {"written": "meanwhile"})
                found.append(session["id"])
            return found

    assert sorted(asyncio.run(walk())) == sorted(ids)
    # An order the caller names is kept.
    assert [s["id"] for s in rewind.iter_sessions(tag="walk", ordering="-updated_at", limit=2)][:2] == [ids[1], ids[0]]


@pytest.fixture
def jobs_run_in_process(settings, tmp_path):
    """Celery tasks run inside the live server as their request commits; export files go to tmp."""
    from config.celery import app as celery_app

    settings.VAR_DIR = tmp_path
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def test_operations_retention_compaction_export_import_jobs_integrity(rewind, jobs_run_in_process):
    s = rewind.create_session("ops-1")
    for n in range(5):
        rewind.record(s["id"], {"n": n, "text": "x" * 100})

    policy = rewind.set_retention_policy(enabled=True, keep_last=2, keep_days=0, thin_to="day")
    assert (policy["enabled"], policy["keep_last"]) == (True, 2)
    assert rewind.get_retention_policy()["keep_last"] == 2
    preview = rewind.compact(dry_run=True)
    assert preview["versions_total"] == 5 and preview["versions_removed"] >= 1

    export = rewind.wait_for_job(rewind.start_export(session=s["id"])["id"], timeout=60)
    assert export["status"] == "done" and export["kind"] == "export"
    exported = rewind.download_export(export["id"])
    assert exported.count(b"\n") >= 5

    rewind.delete_session(s["id"], reason="re-import it")
    imported = rewind.wait_for_job(rewind.start_import(exported)["id"], timeout=60)
    assert imported["status"] == "done", imported
    restored = rewind.list_sessions(external_id="ops-1")["results"][0]
    assert restored["head"] == 5 and rewind.head(restored["id"])["state"]["n"] == 4

    assert {job["kind"] for job in rewind.list_jobs()["results"]} >= {"export", "import"}
    assert [job["kind"] for job in rewind.iter_jobs(kind="export", limit=1)] == ["export"]
    scrub = rewind.wait_for_job(rewind.start_integrity_scrub()["id"], timeout=60)
    assert scrub["status"] == "done"
    assert rewind.list_integrity_problems(open=True)["results"] == []
    # A problem whose version verifies again (the data was restored) can be closed.
    from snapshots_app.integrity import integrity_problem_record
    from snapshots_app.models import Version

    problem = integrity_problem_record(version=Version.objects.get(session_id=restored["id"], number=5), detail="restored")
    rewind.create_session("ops-healthy")
    backup = rewind.wait_for_job(rewind.start_export(skip_damaged=True)["id"], timeout=60)
    assert backup["status"] == "done" and [left["external_id"] for left in backup["result"]["skipped"]] == ["ops-1"]
    closed = rewind.resolve_integrity_problem(problem.pk, resolution="rows restored from backup")
    assert closed["resolved_at"] and rewind.list_integrity_problems(open=True)["results"] == []

    compacted = rewind.wait_for_job(rewind.compact(dry_run=False)["id"], timeout=60)
    assert compacted["status"] == "done"
    assert rewind.get_session(restored["id"])["version_count"] < 5


def test_an_async_client_serves_one_asyncio_run_after_another(live_api):
    # A script calling asyncio.run per job with one client used to get httpx's "Event loop is closed"
    # on the second run: the pooled connection belonged to the first, closed, loop.
    client = AsyncClient(live_api.url, api_key=live_api.key)
    session = asyncio.run(client.create_session("two-loops"))
    asyncio.run(client.record(session["id"], {"n": 1}))
    assert asyncio.run(client.head(session["id"]))["state"] == {"n": 1}
    asyncio.run(client.aclose())


def test_an_async_client_with_its_own_transport_names_the_fix_on_a_second_loop(live_api):
    client = AsyncClient(live_api.url, api_key=live_api.key, transport=httpx.AsyncHTTPTransport())
    session = asyncio.run(client.create_session("own-transport"))
    with pytest.raises(RuntimeError, match="Make the AsyncClient inside the loop that uses it"):
        asyncio.run(client.record(session["id"], {"n": 1}))
    # Refused before anything was sent: httpx wrote the request on the dead loop's connection, then
    # failed, and the server stored a write the caller was told had failed.
    with Client(live_api.url, api_key=live_api.key) as check:
        assert check.get_session(session["id"])["head"] == 0


def test_a_path_without_its_slash_is_refused_and_writes_nothing(rewind):
    # The server redirects it (308 for a write); the client used to answer None as if it had written.
    with pytest.raises(SessionRewindError) as caught:
        rewind.request("POST", "sessions", json={"external_id": "no-slash"})
    assert caught.value.status == 308 and "/api/v1/sessions/" in str(caught.value)
    assert rewind.list_sessions(q="no-slash")["results"] == []


def _engine_json(value):
    """What an engine author writes as json_default: its own types as JSON, anything else refused."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, _ById):
        return {1: "first", "1": "second", "n": 2}
    if isinstance(value, _Box):
        return {"items": value.items}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class _Order(BaseModel):
    sku: str
    placed: datetime
    labels: set[str]


_ENGINE_STATE = {
    "at": datetime(2026, 12, 6, 9, 30, tzinfo=UTC),
    "seen": {"b", "a"},
    "blob": b"\x00\xff",
    "price": Decimal("9.99"),
    "orders": [_Order(sku="x-1", placed=datetime(2026, 1, 2, tzinfo=UTC), labels={"gift"})],
}
_AS_STORED = {
    "at": "2026-12-06T09:30:00+00:00",
    "seen": ["a", "b"],
    "blob": "AP8=",
    "price": "9.99",
    "orders": [{"sku": "x-1", "placed": "2026-01-02T00:00:00Z", "labels": ["gift"]}],
}


def test_json_default_turns_an_engines_values_into_json_and_what_it_refuses_is_named(live_api):
    # A state of datetimes, sets, bytes, Decimals and pydantic models was a ValidationError, with no way
    # to tell the client how to convert them but to copy the whole state first.
    with live_api.client(json_default=_engine_json) as rewind:
        session = rewind.create_session("json-default", metadata={"started": datetime(2026, 12, 6, tzinfo=UTC)})
        assert session["metadata"] == {"started": "2026-12-06T00:00:00+00:00"}
        rewind.record(session["id"], _ENGINE_STATE, step="plan")
        assert rewind.head(session["id"])["state"] == _AS_STORED

        # What the hook itself refuses (inside what it returned, too) is named where it is; nothing is written.
        with pytest.raises(ValidationError, match=r"\(a complex at /state/orders/1/1\)$"):
            rewind.record(session["id"], {**_ENGINE_STATE, "orders": [_ENGINE_STATE["orders"][0], ["x", 1j]]})
        with pytest.raises(ValidationError, match=r"\(a complex at /state/box/items/0\)$"):
            rewind.record(session["id"], {**_ENGINE_STATE, "box": _Box([1j])})
        with pytest.raises(ValidationError, match=r"\(a float at /state/ratio\)$"):  # NaN is no JSON either way
            rewind.record(session["id"], {"ratio": float("nan")})
        # Keys the hook's answer would spell alike are refused as any others.
        with pytest.raises(ValidationError, match=r"would both be sent as \"1\" \(at /state/by_id\)"):
            rewind.record(session["id"], {"by_id": _ById()})
        assert rewind.get_session(session["id"])["head"] == 1

    async def scenario() -> dict:
        async with live_api.aclient(json_default=_engine_json) as arewind:
            await arewind.record(session["id"], _ENGINE_STATE, step="act")
            return await arewind.head(session["id"])

    assert asyncio.run(scenario())["state"] == _AS_STORED
    # Without the hook such a state is refused before anything is sent, as before.
    with live_api.client() as plain, pytest.raises(ValidationError, match=r"\(a datetime at /state/at\)$"):
        plain.record(session["id"], _ENGINE_STATE)


class _ById:
    """An engine object whose JSON form has keys of two types that JSON spells alike."""


class _Box:
    def __init__(self, items: list) -> None:
        self.items = items

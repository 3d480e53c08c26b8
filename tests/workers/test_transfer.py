"""Export → import round trips exactly; a corrupt file is refused with nothing stored."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from django.db import connection
from django.utils import timezone

from sessions_app.errors import ImportRejected
from sessions_app.models import WorkflowSession
from sessions_app.services import session_delete
from snapshots_app import canonical, tree
from snapshots_app.models import Job, JobStatus, StateNode, Version
from snapshots_app.selectors import version_state_bytes
from snapshots_app.services import (
    snapshot_data_fix,
    snapshot_fork,
    snapshot_record,
    snapshot_rewind,
    version_label,
    version_pin,
)
from snapshots_app.transfer import (
    _line,
    import_path,
    transfer_export_run,
    transfer_export_start,
    transfer_import_run,
    transfer_import_start,
)
from tests.factories import agent_state, make_project, make_session
from tests.workers.builders import read_all, record_history
from tests.workers.conftest import wait_finished

VERSION_COLUMNS = (
    "number", "kind", "checksum", "logical_size", "step", "status", "error", "label", "pinned", "engine",
    "engine_version", "tags", "reason", "idempotency_key", "created_at",
)


def _rich_project(project, user):
    """Every shape the store knows: long arrays (runs of runs), wide objects, JSON held in strings,
    rewinds, forks, data fixes, pins, labels, tags, errors."""
    session = make_session(project, "agent-1", workflow="support", metadata={"customer": "c-9"}, tags=["prod"])
    for step in range(1, 6):
        state = agent_state(step, history=40 * step)
        state["store"] = {f"key-{k}": json.dumps({"value": k, "text": "x" * 300, "step": step}) for k in range(70)}
        state["big"] = list(range(1100 + step))
        snapshot_record(
            session=session, state=state, step=f"step-{step}", status="running", engine="llama-index-workflows",
            engine_version="1.2.0", tags=[f"t{step}"], idempotency_key=f"idem-{step}",
            error="rate limited" if step == 3 else None,
        )
    version_pin(version=Version.objects.get(session=session, number=2), pinned=True)
    version_label(version=Version.objects.get(session=session, number=4), label="before the bad tool call")
    snapshot_rewind(session=session, to_version=2, reason="bad answer", actor=user)
    snapshot_data_fix(session=session, state={"fixed": True, "note": "y" * 700}, based_on=6, reason="typo", actor=user)
    snapshot_fork(session=session, from_version=4, external_id="agent-1-fork", reason="what if", actor=user)
    return session


def _versions(project) -> dict[tuple[str, int], dict]:
    rows = {}
    for version in Version.objects.filter(session__project=project).select_related("session", "parent__session"):
        parent = version.parent
        rows[(version.session.external_id, version.number)] = {
            **{column: getattr(version, column) for column in VERSION_COLUMNS},
            "parent": (parent.session.external_id, parent.number) if parent else None,
        }
    return rows


def _sessions(project) -> dict[str, tuple]:
    return {
        s.external_id: (s.workflow, s.status, s.metadata, s.tags, s.head_number, s.version_count, s.last_step,
                        s.last_error)
        for s in WorkflowSession.objects.filter(project=project)
    }


@pytest.mark.worker
def test_export_then_import_into_a_fresh_project_reproduces_every_version(worker, project, user):
    _rich_project(project, user)

    export = wait_finished(transfer_export_start(project=project, actor=user))
    assert export.status == JobStatus.DONE, export.error
    assert export.done == export.total > 0
    path = Path(export.result["path"])
    assert path.parent.name == "exports" and path.is_file()

    fresh = make_project("fresh")
    with path.open("rb") as upload:
        imported = wait_finished(transfer_import_start(project=fresh, source=upload, actor=user))
    assert imported.status == JobStatus.DONE, imported.error

    assert read_all(fresh) == read_all(project)
    assert _versions(fresh) == _versions(project)
    assert _sessions(fresh) == _sessions(project)
    assert imported.result["parents_outside_export"] == 0
    assert not import_path(imported).exists()  # the uploaded copy is removed once imported


@pytest.mark.django_db
def test_single_session_export_round_trips_and_import_twice_is_refused(project, user, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    session = _rich_project(project, user)
    result = transfer_export_run(project=project, session=session)
    fresh = make_project("fresh")

    outcome = transfer_import_run(project=fresh, path=Path(result["path"]))

    assert outcome["versions"] == 7 and outcome["parents_outside_export"] == 0
    assert read_all(fresh) == {key: data for key, data in read_all(project).items() if key[0] == "agent-1"}
    # The history is kept, but each version's author says it came in by import, and who imported it.
    fixed = Version.objects.get(session__project=fresh, kind="data_fix")
    assert (fixed.reason, fixed.created_by_label) == ("typo", f"{user.username} (imported by system)")
    with pytest.raises(ImportRejected, match="already exist"):
        transfer_import_run(project=fresh, path=Path(result["path"]))
    assert not list(tmp_path.glob("imports/*"))  # the nodes spilled to disk during each import are gone


@pytest.mark.django_db
def test_an_import_whose_nodes_outgrow_the_decoded_cache_reads_them_again(project, user, settings, tmp_path,
                                                                          monkeypatch):
    from snapshots_app import transfer

    monkeypatch.setattr(transfer._NodeSpill, "DECODED_KEPT_BYTES", 1)  # every node read from the spill again
    settings.VAR_DIR = tmp_path
    session = _rich_project(project, user)
    fresh = make_project("fresh")
    transfer_import_run(project=fresh, path=Path(transfer_export_run(project=project, session=session)["path"]))
    assert read_all(fresh) == {key: data for key, data in read_all(project).items() if key[0] == "agent-1"}


@pytest.mark.django_db
def test_a_file_whose_roots_carry_subtree_digests_still_imports(project, user, settings, tmp_path):
    """Releases before tree.root_digest stored (and exported) a root under the digest it would have as
    a subtree; such files import, and a root digest that is neither is refused."""
    settings.VAR_DIR = tmp_path
    session = _rich_project(project, user)
    path = Path(transfer_export_run(project=project, session=session)["path"])
    texts = {bytes(v.root).hex(): version_state_bytes(v) for v in Version.objects.filter(session=session)}
    old_digests = {root: tree.digest_of(tree.KIND_OBJECT, tree.CANONICAL, text).hex() for root, text in texts.items()}

    def to_old_digests(body: list[dict]) -> None:
        for record in body:
            if record["type"] == "node" and record["digest"] in old_digests:
                record["digest"] = old_digests[record["digest"]]
            elif record["type"] == "version":
                record["root"] = old_digests[record["root"]]

    fresh = make_project("fresh")
    transfer_import_run(project=fresh, path=_rewrite(path, to_old_digests))
    assert read_all(fresh) == {key: data for key, data in read_all(project).items() if key[0] == "agent-1"}

    wrong = {root: hashlib.sha256(root.encode()).hexdigest()[:32] for root in texts}
    with pytest.raises(ImportRejected, match="does not match its digest"):
        transfer_import_run(project=make_project("other"), path=_rewrite(path, lambda body: [
            record.update(digest=wrong[record["digest"]]) if record["type"] == "node" and record["digest"] in wrong
            else record.update(root=wrong[record["root"]]) if record["type"] == "version" else None
            for record in body
        ]))


def _rewrite(path: Path, change) -> Path:
    """Apply `change` to the parsed records, re-sign every line and the end record like a forger would."""
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    body = [r for r in records if r["type"] != "end"]
    for record in body:
        record.pop("sum")
    change(body)
    out = tmp = path.with_suffix(".forged")
    running = hashlib.sha256()
    lines = []
    for record in body:
        line = canonical.dumps({**record, "sum": hashlib.sha256(canonical.dumps(record)).hexdigest()}) + b"\n"
        running.update(line)
        lines.append(line)
    end = {"type": "end", "records": len(lines), "sha256": running.hexdigest()}
    lines.append(canonical.dumps({**end, "sum": hashlib.sha256(canonical.dumps(end)).hexdigest()}) + b"\n")
    tmp.write_bytes(b"".join(lines))
    return out


def _change_one_byte(data: bytes) -> bytes:
    position = data.index(b'"raw":"') + 20
    return data[:position] + (b"B" if data[position:position + 1] != b"B" else b"C") + data[position + 1 :]


def _flip_node_byte(body: list[dict]) -> None:
    node = next(r for r in body if r["type"] == "node" and len(base64.b64decode(r["raw"])) > 100)
    raw = bytearray(base64.b64decode(node["raw"]))
    raw[-5] ^= 0x01
    node["raw"] = base64.b64encode(bytes(raw)).decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("corrupt", "said"),
    [
        pytest.param(lambda data: _change_one_byte(data), "fails its checksum", id="byte-changed"),
        pytest.param(lambda data: data[: len(data) // 2], "the file is truncated: its last line", id="truncated"),
        pytest.param(lambda data: data[: data.rindex(b"\n", 0, len(data) // 2) + 1], "the file is truncated",
                     id="truncated-after-a-line"),
        pytest.param(lambda data: b"\n".join(data.split(b"\n")[:3] + data.split(b"\n")[4:]), "end record",
                     id="line-missing"),
        pytest.param(lambda data: gzip.compress(data), "the file is gzip-compressed", id="gzipped"),
        pytest.param("forged-node", "does not match its digest", id="node-changed-and-resigned"),
        pytest.param("forged-checksum", "checksum", id="version-checksum-changed-and-resigned"),
    ],
)
def test_a_corrupt_file_is_refused_and_nothing_is_stored(project, user, settings, tmp_path, corrupt, said):
    settings.VAR_DIR = tmp_path
    session = _rich_project(project, user)
    path = Path(transfer_export_run(project=project, session=session)["path"])
    if corrupt == "forged-node":
        path = _rewrite(path, _flip_node_byte)
    elif corrupt == "forged-checksum":
        path = _rewrite(path, lambda body: next(r for r in body if r["type"] == "version").update(checksum="0" * 64))
    else:
        path.write_bytes(corrupt(path.read_bytes()))
    fresh = make_project("fresh")

    with pytest.raises(ImportRejected, match=re.escape(said)):
        transfer_import_run(project=fresh, path=path)

    assert not WorkflowSession.objects.filter(project=fresh).exists()
    assert not StateNode.objects.filter(project=fresh).exists()
    assert not Version.objects.filter(session__project=fresh).exists()
    assert not list(tmp_path.glob("imports/*"))


@pytest.mark.django_db
def test_an_export_refuses_a_version_the_scrub_found_damaged(project, settings, tmp_path):
    from sessions_app import errors
    from snapshots_app.integrity import integrity_problem_record

    settings.VAR_DIR = tmp_path
    session = record_history(project, "run-bad", 3)
    integrity_problem_record(version=Version.objects.get(session=session, number=2), detail="checksum mismatch")
    with pytest.raises(errors.IntegrityProblem, match="version 2 of session run-bad"):
        transfer_export_run(project=project)
    assert not list(tmp_path.glob("exports/*.ndjson"))


@pytest.mark.django_db
def test_a_project_export_asked_to_skip_damaged_sessions_leaves_them_out_names_them_and_imports(
    project, settings, tmp_path
):
    """One damaged version used to block every export of the project: the healthy sessions'
    backup now goes out without it, and says what it left out."""
    from sessions_app import errors
    from snapshots_app.integrity import integrity_problem_record

    settings.VAR_DIR = tmp_path
    healthy = record_history(project, "run-good", 3)
    damaged = record_history(project, "run-bad", 3)
    fork = snapshot_fork(session=damaged, from_version=2, external_id="run-bad-fork", reason="try again")
    integrity_problem_record(version=Version.objects.get(session=damaged, number=3), detail="checksum mismatch")
    with pytest.raises(errors.IntegrityProblem, match=r"version 3 of session run-bad .*skip_damaged"):
        transfer_export_run(project=project)

    result = transfer_export_run(project=project, skip_damaged=True)

    assert result["sessions"] == 2 and result["versions"] == 3 + fork.head_number
    assert result["skipped"] == [{"session": str(damaged.pk), "external_id": "run-bad", "version": 3,
                                  "detail": "checksum mismatch"}]
    fresh = make_project("fresh")
    transfer_import_run(project=fresh, path=Path(result["path"]))
    copies = {s.external_id: s for s in WorkflowSession.objects.filter(project=fresh)}
    assert sorted(copies) == ["run-bad-fork", "run-good"]
    exported = {key: state for key, state in read_all(project).items() if key[0] != "run-bad"}
    assert read_all(fresh) == exported
    assert Version.objects.get(session=copies["run-bad-fork"], number=1).parent is None
    with pytest.raises(Exception, match="skip_damaged is for a project's export"):
        transfer_export_start(project=project, session=healthy, skip_damaged=True)


@pytest.mark.django_db
def test_a_project_export_brings_a_deleted_session_back_into_its_project_leaving_out_the_others(
    project, user, settings, tmp_path
):
    """README promised that importing a project's export brings a deleted session back; into its own
    project every other session was taken, and the all-or-nothing import refused the whole file."""
    from sessions_app.errors import ImportRejected

    settings.VAR_DIR = tmp_path
    for n in range(11):
        record_history(project, f"kept-{n:02}", 2)
    source = WorkflowSession.objects.get(project=project, external_id="kept-03")
    gone = snapshot_fork(session=source, from_version=2, external_id="gone", reason="try it")
    snapshot_record(session=gone, state={"tried": True})
    snapshot_record(session=gone, state={"tried": 2})
    before = read_all(project)
    path = Path(transfer_export_run(project=project)["path"])
    session_delete(session=gone, reason="deleted by mistake", actor=user)

    with pytest.raises(ImportRejected, match=r"kept-00, .*, kept-09 and 1 more \(import with skip_existing"):
        transfer_import_run(project=project, path=path)
    result = transfer_import_run(project=project, path=path, skip_existing=True, actor=user)

    assert [s["external_id"] for s in result["sessions"]] == ["gone"] and result["versions"] == 3
    assert result["skipped"] == [{"external_id": f"kept-{n:02}", "versions": 2} for n in range(11)]
    assert read_all(project) == before
    assert WorkflowSession.objects.filter(project=project).count() == 12
    # The fork comes back forked from its source, which the project kept (it came back parentless).
    first = Version.objects.get(session__project=project, session__external_id="gone", number=1)
    assert (first.parent.session_id, first.parent.number) == (source.pk, 2)
    assert result["parents_outside_export"] == 0


@pytest.mark.django_db
def test_an_export_refuses_a_node_that_fails_its_seal(project, settings, tmp_path):
    """A damaged node that still decompresses would be written out, and its import would blame the file."""
    from django.db import connection

    from sessions_app import errors
    from snapshots_app import store

    settings.VAR_DIR = tmp_path
    record_history(project, "run-seal", 2)
    node = StateNode.objects.filter(project=project, codec=store.CODEC_RAW).first()
    with connection.cursor() as cursor:  # one byte of its text changed: it decodes, to the wrong thing
        cursor.execute(
            "UPDATE snapshots_app_statenode SET data = overlay(data placing '\\x7e'::bytea from length(data) for 1) "
            "WHERE project_id = %s AND digest = %s",
            [project.pk, bytes(node.digest)],
        )
    with pytest.raises(errors.IntegrityProblem, match=f"node {bytes(node.digest).hex()}"):
        transfer_export_run(project=project)
    # Nor the part written before the node (a project's states, kept EXPORT_KEEP_DAYS: after a full
    # disk, it kept the disk full).
    assert not list(tmp_path.glob("exports/*"))


@pytest.mark.django_db
@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda r: r.update(status="pwned"), id="session-status"),
        pytest.param(lambda r: r.update(tags=["<not a tag>", {"x": 1}]), id="session-tags"),
        pytest.param(lambda r: r.update(metadata=["not", "an", "object"]), id="session-metadata"),
        pytest.param(lambda r: r.update(external_id="x" * 300), id="session-external-id"),
        pytest.param(lambda r: r.update(workflow="w" * 201), id="session-workflow"),
    ],
)
def test_a_resigned_file_with_fields_the_api_refuses_is_refused(project, user, settings, tmp_path, forge):
    """The checksums are no signature: a file's session fields get the API's own checks."""
    settings.VAR_DIR = tmp_path
    session = _rich_project(project, user)
    path = Path(transfer_export_run(project=project, session=session)["path"])
    fresh = make_project("fresh")

    with pytest.raises(ImportRejected):
        transfer_import_run(project=fresh, path=_rewrite(path, lambda body: [
            forge(record) for record in body if record["type"] == "session"
        ]))

    assert not WorkflowSession.objects.filter(project=fresh).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(("record_type", "field", "value"), [
    ("version", "status", "bogus"),
    ("version", "status", ["completed"]),  # not text: looking it up among the names must not raise
    ("version", "kind", {"step": True}),
    ("session", "status", ["running"]),
])
def test_a_resigned_file_with_an_unknown_status_or_kind_is_refused(project, user, settings, tmp_path,
                                                                     record_type, field, value):
    settings.VAR_DIR = tmp_path
    session = _rich_project(project, user)
    path = Path(transfer_export_run(project=project, session=session)["path"])
    with pytest.raises(ImportRejected, match=f"unknown {field}"):
        transfer_import_run(project=make_project("fresh"), path=_rewrite(path, lambda body: [
            record.update({field: value}) for record in body if record["type"] == record_type
        ]))


@pytest.mark.django_db
@pytest.mark.parametrize(("record_type", "field", "value", "said"), [
    ("version", "step", "s" * 201, "step must be text of at most 200 characters"),
    ("version", "created_at", "2026-13-45T00:00:00+00:00", "created_at must be an ISO 8601 date and time"),
    ("version", "parent", "x", "parent must be null or {session, number}"),
    ("version", "pinned", "yes", "pinned must be true or false"),
    ("version", "stored_size", -1, "logical_size and stored_size must be whole numbers"),
    ("version", "idempotency_key", 7, "idempotency_key must be text"),
    ("version", "tags", ["no\ttabs"], "tag"),
    ("session", "created_at", "yesterday", "created_at must be an ISO 8601 date and time"),
    ("version", "number", 3_000_000_000, "a version has no valid number"),
    ("version", "stored_size", 2**63, "logical_size and stored_size must be whole numbers"),
    ("version", "summary", {"a": "\u0000"}, "has a malformed summary"),
    ("session", "id", ["x"], "has no valid id"),
    ("version", "root", ["x"], "has a malformed root or checksum"),
])
def test_a_resigned_file_with_a_field_no_write_could_make_is_refused_naming_it(
    project, user, settings, tmp_path, record_type, field, value, said
):
    """They failed as the database's or Python's own errors ("DataError: value too long…", "ValueError:
    month must be in 1..12", "AttributeError: 'str' object has no attribute 'get'"), with a traceback."""
    settings.VAR_DIR = tmp_path
    session = _rich_project(project, user)
    path = Path(transfer_export_run(project=project, session=session)["path"])
    fresh = make_project("fresh")
    with pytest.raises(ImportRejected, match=re.escape(said)):
        transfer_import_run(project=fresh, path=_rewrite(path, lambda body: [
            record.update({field: value}) for record in body if record["type"] == record_type
        ]))
    assert not WorkflowSession.objects.filter(project=fresh).exists()


@pytest.mark.django_db
def test_export_and_import_files_are_readable_by_the_service_only(project, user, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    session = make_session(project, "private")
    snapshot_record(session=session, state={"secret": "s3cr3t"})
    exported = Path(transfer_export_run(project=project, session=session)["path"])
    assert exported.stat().st_mode & 0o777 == 0o600
    assert exported.parent.stat().st_mode & 0o777 == 0o700

    job = transfer_import_start(project=make_project("fresh"), source=exported)
    uploaded = import_path(job)
    if uploaded.exists():  # (an eager run has imported and removed it already)
        assert uploaded.stat().st_mode & 0o777 == 0o600
    assert uploaded.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.django_db(transaction=True)
def test_a_deleted_session_leaves_no_export_file_nor_cached_state(project, user, settings, tmp_path, eager):
    from django.core.cache import cache

    from sessions_app import background
    from sessions_app.errors import InvalidState
    from snapshots_app import store
    from snapshots_app.selectors import version_with_state_bytes
    from snapshots_app.transfer import export_file

    settings.VAR_DIR = tmp_path
    gone = record_history(project, "gone", 3)
    keep = record_history(project, "keep", 2)
    own_export = transfer_export_start(project=project, session=gone, actor=user)
    project_export = transfer_export_start(project=project, actor=user)
    own_export.refresh_from_db()
    project_export.refresh_from_db()
    own_file, project_file = export_file(job=own_export), export_file(job=project_export)
    for session in (gone, keep):
        version_with_state_bytes(session=session, number=session.head_number)  # a head read caches it
    background.drain(10)
    gone_head = Version.objects.select_related("session").get(session=gone, number=3)
    gone_key, keep_key = store._head_cache_key(gone.pk, 3), store._head_cache_key(keep.pk, 2)
    assert cache.get(gone_key) is not None and cache.get(keep_key) is not None
    # Written within the day the head cache keeps a state: v1 was the head an hour ago, and read then.
    Version.objects.filter(session=gone).update(created_at=timezone.now() - timedelta(hours=1))
    earlier_key = store._head_cache_key(gone.pk, 1)
    cache.set(earlier_key, b'{"step": 1}', store.STATE_CACHE_TIMEOUT)

    session_delete(session=gone, reason="the customer asked us to forget it", actor=user)

    # Before the fix the export stayed downloadable (and re-importable: the session came back) and
    # the head state stayed in Redis for a day.
    assert not own_file.exists() and not list(tmp_path.glob("exports/*session-gone*"))
    with pytest.raises(InvalidState, match="no longer there"):
        export_file(job=own_export)
    assert cache.get(gone_key) is None and cache.get(earlier_key) is None
    # A head-cache write already on its way (a background thread's, after a write or read) does not bring it back.
    store.remember_head(gone_head, b'{"late": true}')
    assert cache.get(gone_key) is None
    # What the deletion did not concern stays: the other session's cache, the whole project's backup.
    assert cache.get(keep_key) is not None and project_file.exists()


def _elsewhere(action: Callable[[], object]) -> None:
    """Run `action` now on a connection of its own (another request or worker, beside an export)."""

    def run() -> None:
        try:
            action()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


@pytest.mark.django_db(transaction=True)
def test_a_project_export_is_the_project_as_it_was_whatever_a_compaction_meanwhile_removes(
    project, user, settings, tmp_path
):
    """A compaction (here the collection after a session's deletion) that ran while an export was
    writing removed nodes the export had listed: the job said done, and its file was refused at import
    ("the version or node records do not match the header"), found out when the backup was needed."""
    from snapshots_app.compaction import compaction_run

    settings.VAR_DIR = tmp_path
    record_history(project, "kept", 3)
    gone = record_history(project, "gone", 3)
    before = read_all(project)
    calls = []

    def compacted_meanwhile() -> None:
        session_delete(session=WorkflowSession.objects.get(pk=gone.pk), reason="forget it", actor=user)
        assert compaction_run(project=project, apply_retention=False)["nodes_freed"] > 0

    def progress(done: int, total: int | None = None, *, force: bool = False) -> None:
        calls.append(done)
        if len(calls) == 1:  # its versions are listed, their nodes not yet read
            _elsewhere(compacted_meanwhile)

    result = transfer_export_run(project=project, progress=progress)

    fresh = make_project("fresh")
    outcome = transfer_import_run(project=fresh, path=Path(result["path"]))
    assert outcome["versions"] == result["versions"] == 6
    assert read_all(fresh) == before


@pytest.mark.django_db(transaction=True)
def test_two_imports_of_one_file_at_once_import_it_once_and_the_other_says_why_it_did_not(
    project, user, settings, tmp_path
):
    """The second import's check for taken external ids ran before the first committed: it stopped on
    the database's constraint, its job failing with "IntegrityError: duplicate key value violates
    unique constraint", where one run after the other says which sessions are already there."""
    from tests.locks import someone_waits_on_a_lock

    settings.VAR_DIR = tmp_path
    record_history(project, "run-1", 2)
    path = Path(transfer_export_run(project=project)["path"])
    fresh = make_project("fresh")
    stored, release = threading.Event(), threading.Event()
    outcomes: dict[str, object] = {}

    totals: list[int] = []

    def first_holds(done: int, total: int | None = None, *, force: bool = False) -> None:
        totals.extend([total] if total else [])
        if done == totals[0]:  # every node and version read, verified and stored, not yet committed
            stored.set()
            release.wait(30)

    def run(name: str, progress: Callable[..., None] | None = None) -> None:
        try:
            outcomes[name] = transfer_import_run(project=fresh, path=path, **({"progress": progress} if progress else {}))
        except Exception as exc:  # noqa: BLE001 - what each import ends with is the test's subject
            outcomes[name] = exc
        finally:
            connection.close()

    first = threading.Thread(target=run, args=("first", first_holds))
    second = threading.Thread(target=run, args=("second",))
    first.start()
    assert stored.wait(30)
    second.start()
    assert someone_waits_on_a_lock(second)  # its session waits on the first's uncommitted one
    release.set()
    first.join(30)
    second.join(30)

    assert isinstance(outcomes["first"], dict) and outcomes["first"]["versions"] == 2
    assert isinstance(outcomes["second"], ImportRejected), outcomes["second"]
    assert "already exist in this project: run-1" in outcomes["second"].message
    assert read_all(fresh) == read_all(project)


@pytest.mark.django_db(transaction=True)
def test_an_export_of_a_session_deleted_while_it_runs_leaves_no_file(project, user, settings, tmp_path):
    from sessions_app.errors import SessionNotFound

    settings.VAR_DIR = tmp_path
    session = record_history(project, "gone", 3)
    calls = []

    def progress(done: int, total: int | None = None, *, force: bool = False) -> None:
        calls.append(done)
        if len(calls) == 2:  # its nodes are being written out
            _elsewhere(lambda: session_delete(session=WorkflowSession.objects.get(pk=session.pk), reason="forget it",
                                              actor=user))

    with pytest.raises(SessionNotFound):
        transfer_export_run(project=project, session=session, progress=progress)
    assert not list(tmp_path.glob("exports/*"))


@pytest.mark.django_db(transaction=True)
def test_an_export_job_whose_session_is_deleted_while_it_writes_fails_saying_so(
    project, user, settings, tmp_path, monkeypatch, caplog
):
    """A job's export file is named after the job, so the deletion removes it while it is still being
    written: the job must fail as a deleted session's export, not on the vanished file (an unexpected
    FileNotFoundError, logged as an error with its traceback and the file's path as the job's error)."""
    from snapshots_app import jobs, tasks, transfer
    from snapshots_app.models import JobKind

    settings.VAR_DIR = tmp_path
    session = record_history(project, "gone", 3)
    job = jobs.job_create(kind=JobKind.EXPORT, project=project, session=session, params={"scope": "session"},
                          enqueue=lambda job_id: None)
    export = transfer.transfer_export_run

    def deleted_while_writing(**kwargs):
        inner, calls = kwargs.pop("progress"), []

        def progress(done: int, total: int | None = None, *, force: bool = False) -> None:
            inner(done, total, force=force)
            calls.append(done)
            if len(calls) == 2:  # its nodes are being written out
                assert list(tmp_path.glob("exports/*.partial*"))
                _elsewhere(lambda: session_delete(session=WorkflowSession.objects.get(pk=session.pk),
                                                  reason="forget it", actor=user))

        return export(progress=progress, **kwargs)

    monkeypatch.setattr(transfer, "transfer_export_run", deleted_while_writing)
    assert tasks.export_job(job.pk) is None

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.error == "session gone was deleted during its export"
    assert not list(tmp_path.glob("exports/*"))
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_import_leaves_no_uploaded_file_behind(project, user, settings, tmp_path, eager):
    """A failed job is never run again, so the copy of the upload it kept (a whole project's states)
    must go with it, as an imported one's does; it stayed in VAR_DIR/imports for good."""
    settings.VAR_DIR = tmp_path
    session = make_session(project, "kept")
    snapshot_record(session=session, state={"secret": "s3cr3t"})
    exported = Path(transfer_export_run(project=project, session=session)["path"])
    exported.write_bytes(_change_one_byte(exported.read_bytes()))

    job = transfer_import_start(project=make_project("fresh"), source=exported, actor=user)

    job.refresh_from_db()
    assert job.status == "failed" and "checksum" in job.error
    assert not import_path(job).exists()
    assert not list(tmp_path.glob("imports/*"))


@pytest.mark.django_db(transaction=True)
def test_the_sweep_deletes_expired_exports_and_orphaned_uploads_and_keeps_the_rest(
    project, user, settings, tmp_path, eager
):
    """Export files (a project's states each) and uploads no job waits for used to stay on disk for good."""
    import os
    import time

    from sessions_app.errors import InvalidState
    from snapshots_app import jobs
    from snapshots_app.models import JobKind
    from snapshots_app.transfer import export_file, imports_dir, transfer_files_sweep

    settings.VAR_DIR = tmp_path
    settings.EXPORT_KEEP_DAYS = 7
    record_history(project, "kept", 2)
    old_export = transfer_export_start(project=project, actor=user)
    new_export = transfer_export_start(project=project, actor=user)
    old_export.refresh_from_db()
    new_export.refresh_from_db()
    eight_days_ago = time.time() - 8 * 86400
    os.utime(export_file(job=old_export), (eight_days_ago, eight_days_ago))
    waiting = jobs.job_create(kind=JobKind.IMPORT, project=make_project("target"), params={"file": "waiting.ndjson"},
                              enqueue=lambda job_id: None)
    imports_dir().mkdir(parents=True, exist_ok=True)
    for name in ("waiting.ndjson", "orphan.ndjson", "just-uploaded.ndjson"):
        (imports_dir() / name).write_bytes(b"{}\n")
    two_hours_ago = time.time() - 7200
    for name in ("waiting.ndjson", "orphan.ndjson"):
        os.utime(imports_dir() / name, (two_hours_ago, two_hours_ago))

    assert transfer_files_sweep() == {"exports": 1, "uploads": 1}

    with pytest.raises(InvalidState, match="no longer there"):
        export_file(job=old_export)
    assert export_file(job=new_export).exists()
    assert import_path(waiting).exists()  # its job still needs it
    assert sorted(p.name for p in imports_dir().iterdir()) == ["just-uploaded.ndjson", "waiting.ndjson"]


@pytest.mark.django_db
def test_a_fork_of_a_session_with_metadata_at_its_limit_round_trips(project, settings, tmp_path):
    """A fork's metadata is its source's plus its lineage (`forked_from`): the fork is allowed that much
    over SESSION_METADATA_MAX_BYTES, and so is its import, or a backup holding it could not be restored."""
    settings.VAR_DIR, settings.SESSION_METADATA_MAX_BYTES = tmp_path, 1024
    source = make_session(project, "full", metadata={"notes": "n" * (1024 - len('{"notes":""}'))})
    snapshot_record(session=source, state={"n": 1})
    fork = snapshot_fork(session=source, from_version=1, reason="what if")
    result = transfer_export_run(project=project, session=fork)

    transfer_import_run(project=make_project("fresh"), path=Path(result["path"]))

    assert WorkflowSession.objects.get(project__slug="fresh").metadata == fork.metadata


@pytest.mark.django_db
def test_maintenance_progress_line_ends_before_the_result_or_the_error(project, settings, tmp_path):
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.VAR_DIR = tmp_path
    record_history(project, "run-p", 4, notes=1)
    out, err = StringIO(), StringIO()
    call_command("maintenance", "export", project.slug, stdout=out, stderr=err)
    # Progress redraws one line ("\r3/8"); it must end before the JSON printed after it, which a
    # terminal would otherwise show as "8/8{".
    assert "\r" in err.getvalue() and err.getvalue().endswith("\n")
    path = json.loads(out.getvalue())["path"]

    err = StringIO()
    with pytest.raises(CommandError, match="already exist"):
        call_command("maintenance", "import", project.slug, "--file", path, stdout=StringIO(), stderr=err)
    # Django prints the error to stderr after this: on a line of its own, not "5/8CommandError: ...".
    assert "\r" in err.getvalue() and err.getvalue().endswith("\n")


@pytest.mark.django_db(transaction=True)
def test_an_import_whose_upload_the_worker_cannot_see_fails_saying_why_without_the_servers_path(
    project, settings, tmp_path, caplog
):
    """Web processes keep an upload in their VAR_DIR/imports; a worker on another machine (or with
    another VAR_DIR) does not find it. The job failed as an unexpected error, "FileNotFoundError:
    [Errno 2] No such file or directory: '/srv/.../imports/...'", the server's path in the API's answer."""
    from snapshots_app import jobs, tasks
    from snapshots_app.models import JobKind

    settings.VAR_DIR = tmp_path
    job = jobs.job_create(kind=JobKind.IMPORT, project=project, params={"file": "acme-0123.ndjson"},
                          enqueue=lambda job_id: None)

    assert tasks.import_job(job.pk) is None

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error == ("the uploaded file acme-0123.ndjson is not in this worker's VAR_DIR/imports: the web processes "
                         "and the workers must share VAR_DIR (one file system); upload the file again")
    assert str(tmp_path) not in job.error
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


@pytest.mark.django_db(transaction=True)
def test_a_file_of_one_long_line_is_refused_at_that_line_without_reading_it_whole(
    project, user, settings, tmp_path, eager
):
    """A JSON document uploaded in place of an export is one long line: it was read whole and parsed
    (a 295 MB one took 1 GB of the worker; a few GB got the worker killed on every delivery, and the
    job said only that the worker died each time)."""
    import resource

    settings.VAR_DIR = tmp_path
    settings.STATE_MAX_BYTES = 64 * 1024  # lines of its exports: at most 1 MiB + 128 KiB
    document = tmp_path / "checkpoints.json"
    document.write_bytes(orjson.dumps([{"thread": i, "messages": ["hello world " * 20] * 10} for i in range(8000)]))
    assert document.stat().st_size > 16 * 1024 * 1024
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # Refused as it is uploaded (its first line is no export header), reading 64 KB of it: no job, no copy.
    with pytest.raises(ImportRejected, match=r"^not a Session Rewind export: line 1 is not an export header$"):
        transfer_import_start(project=project, source=document, actor=user)
    assert not Job.objects.exists() and not list(tmp_path.glob("imports/*"))

    # Behind an export's header, the job meets it as it reads the file.
    behind_a_header = tmp_path / "behind-a-header.ndjson"
    with behind_a_header.open("wb") as out:
        out.write(_line({"type": "header", "format": "session-rewind-export", "format_version": 1}))
        out.write(document.read_bytes())
    job = transfer_import_start(project=project, source=behind_a_header, actor=user)  # runs as it is sent

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("line 2 is longer than any line of an export (1179648 bytes): not a Session Rewind "
                                "export")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 16 * 1024  # KiB: never held whole
    assert not WorkflowSession.objects.filter(project=project).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("into", ["attacker", "victim"])
def test_a_file_naming_another_projects_state_without_its_nodes_is_refused(project, user, settings, tmp_path, into):
    """An attacker who guesses another project's state can compute its root digest and checksum. A
    forged file naming them (with no nodes) must not import: whether it did would confirm the guess,
    and the attacker's project would then read the other's state. Nodes come from the file only."""
    settings.VAR_DIR = tmp_path
    victim = make_project("victim")
    secret = snapshot_record(session=make_session(victim, "payroll"), state={"salary": 123456})
    attacker_session = make_session(project, "decoy")
    snapshot_record(session=attacker_session, state={"x": 1})
    path = Path(transfer_export_run(project=project, session=attacker_session)["path"])

    def name_the_secret(body: list[dict]) -> None:
        body[:] = [record for record in body if record["type"] != "node"]
        next(r for r in body if r["type"] == "header")["nodes"] = 0
        next(r for r in body if r["type"] == "version").update(
            root=bytes(secret.root).hex(), checksum=secret.checksum, logical_size=secret.logical_size,
        )

    target = project if into == "attacker" else victim
    before = Version.objects.filter(session__project=target).count()
    with pytest.raises(ImportRejected, match="is missing from the file"):
        transfer_import_run(project=target, path=_rewrite(path, name_the_secret))
    assert Version.objects.filter(session__project=target).count() == before
    assert not WorkflowSession.objects.filter(project=target, external_id="decoy").exclude(pk=attacker_session.pk).exists()


# --------------------------------------------------------------------------------------------------
# Hostile files that verify: their checksums are re-signed, so only the import's own checks stand
# between them and the database.


def _resigned(project, user, tmp_path, change) -> Path:
    """A session's export (agent-1 with 7 versions, and its fork agent-1-fork), changed and re-signed."""
    session = _rich_project(project, user)
    path = Path(transfer_export_run(project=project)["path"])
    assert session.version_count == 7
    return _rewrite(path, change)


def _nothing_stored(fresh) -> None:
    assert not WorkflowSession.objects.filter(project=fresh).exists()
    assert not Version.objects.filter(session__project=fresh).exists()
    assert not StateNode.objects.filter(project=fresh).exists()


def _version_of(body: list[dict], number: int, *, fork: bool = False) -> dict:
    external_id = "agent-1-fork" if fork else "agent-1"
    session = next(r["id"] for r in body if r["type"] == "session" and r["external_id"] == external_id)
    return next(r for r in body if r["type"] == "version" and r["session"] == session and r["number"] == number)


def _parent_is(number: int, *, fork: bool = False, parent: int, parent_in_fork: bool = False):
    def change(body: list[dict]) -> None:
        target = _version_of(body, parent, fork=parent_in_fork)
        _version_of(body, number, fork=fork)["parent"] = {"session": target["session"], "number": target["number"]}
    return change


@pytest.mark.django_db
@pytest.mark.parametrize(("change", "said"), [
    pytest.param(_parent_is(3, parent=3), r"version 3 of session '[0-9a-f-]{36}' names version 3 of its session as its "
                 r"parent: its parent must be an earlier version", id="its-own-parent"),
    pytest.param(_parent_is(2, parent=5), r"version 2 of session '[0-9a-f-]{36}' names version 5 of its session as its "
                 r"parent: its parent must be an earlier version", id="a-later-parent"),
    # agent-1 v1 -> the fork's v1 -> agent-1 v4 -> v3 -> v2 -> v1: each step across sessions or down.
    pytest.param(_parent_is(1, parent=1, parent_in_fork=True), r"version \d of session '[0-9a-f-]{36}': its parent must "
                 r"be an earlier version, but its parents \(across sessions\) lead back to itself", id="a-cycle-across-sessions"),
    pytest.param(lambda body: [r.update(external_id="twin") for r in body if r["type"] == "session"],
                 "two sessions in the file have the same external id 'twin'", id="external-id"),
    pytest.param(lambda body: [_version_of(body, n).update(idempotency_key="same") for n in (2, 5)],
                 r"version 5 of session '[0-9a-f-]{36}' has the idempotency key 'same' of another version of its "
                 r"session: a session's keys are unique", id="idempotency-key"),
    pytest.param(lambda body: _version_of(body, 7).update(number=2**31 - 1),
                 r"version 2147483647 of session '[0-9a-f-]{36}': version numbers above 2000000000 are refused, "
                 r"leaving room for the session's later writes", id="number-at-the-columns-limit"),
])
def test_a_file_whose_lineage_or_keys_the_store_cannot_take_is_refused_naming_what(
    project, user, settings, tmp_path, change, said
):
    """A version whose parent is not an earlier version imported, and the session's next trim or
    retention run looped for good in remove_versions. Two of one external id or idempotency key failed
    as the database's IntegrityError (a traceback as the job's error); a version numbered 2**31 - 1
    imported, and every write to its session after was a 500 ("integer out of range")."""
    settings.VAR_DIR = tmp_path
    path = _resigned(project, user, tmp_path, change)
    fresh = make_project("fresh")

    with pytest.raises(ImportRejected, match=said):
        transfer_import_run(project=fresh, path=path)

    _nothing_stored(fresh)


@pytest.mark.django_db
def test_a_legitimate_file_with_a_fork_and_high_numbers_still_imports(project, user, settings, tmp_path):
    """What the checks above refuse leaves every real lineage alone: a fork's first version names
    its source in another session, a rewind an earlier version of its own."""
    settings.VAR_DIR = tmp_path
    path = _resigned(project, user, tmp_path, lambda body: [
        record.update(number=record["number"] + 1_999_999_000,
                      parent=record["parent"] and {**record["parent"], "number": record["parent"]["number"] + 1_999_999_000})
        for record in body if record["type"] == "version"
    ])
    fresh = make_project("fresh")

    outcome = transfer_import_run(project=fresh, path=path)

    assert outcome["versions"] == 8 and outcome["parents_outside_export"] == 0
    fork = Version.objects.select_related("parent__session").get(session__project=fresh, session__external_id="agent-1-fork")
    assert (fork.parent.session.external_id, fork.parent.number) == ("agent-1", 1_999_999_004)


def _bomb(depth: int) -> tuple[list[tuple[bytes, tree.Node]], bytes, str, int]:
    """Nodes of which each names the one below twice: (nodes, root digest, checksum, size) of a state
    of 2**depth strings of 1,000 bytes, from depth + 1 nodes."""
    leaf_text = b'"' + b"x" * 998 + b'"'
    child = tree.digest_of(tree.KIND_STRING, 0, leaf_text)
    nodes = [(child, tree.Node(tree.KIND_STRING, 0, 0, (), leaf_text))]
    for _ in range(depth):
        node = tree.Node(tree.KIND_ARRAY, 0, 1, ((1, child), (2, child)), b"[,]")
        child = tree.paged_digest(node.encode())
        nodes.append((child, node))
    state = hashlib.sha256()

    def spell(level: int) -> int:
        if level == 0:
            state.update(leaf_text)
            return len(leaf_text)
        state.update(b"[")
        size = spell(level - 1)
        state.update(b",")
        size += spell(level - 1)
        state.update(b"]")
        return size + 3

    size = spell(depth)
    return nodes, child, state.hexdigest(), size


def _bomb_file(project, tmp_path, depth: int, *, declared: int | None = None) -> tuple[Path, int]:
    session = make_session(project, "small")
    snapshot_record(session=session, state={"a": 1})
    path = Path(transfer_export_run(project=project, session=session)["path"])
    nodes, root, checksum, size = _bomb(depth)

    def change(body: list[dict]) -> None:
        body[:] = [record for record in body if record["type"] != "node"]
        next(r for r in body if r["type"] == "header")["nodes"] = len(nodes)
        body[2:2] = [{"type": "node", "digest": digest.hex(), "raw": base64.b64encode(node.encode()).decode()}
                     for digest, node in nodes]
        next(r for r in body if r["type"] == "version").update(
            root=root.hex(), checksum=checksum, logical_size=size if declared is None else declared,
        )

    forged = _rewrite(path, change)
    assert forged.stat().st_size < 16 * 1024
    return forged, size


@pytest.mark.worker
def test_a_file_whose_nodes_spell_a_state_over_the_limit_fails_its_job_and_stores_nothing(
    worker, project, user, settings, tmp_path
):
    """A 6 KB file whose nodes each name the one below twice spells a state of any size (each level
    doubles it): the import assembled and stored 65 MB from one, and deeper ones got the worker killed
    on every delivery. The version's declared size is refused before anything is assembled."""
    path, size = _bomb_file(project, tmp_path, 15)
    assert size > 16 * 1024 * 1024  # the worker's STATE_MAX_BYTES (its default)
    fresh = make_project("fresh")

    job = wait_finished(transfer_import_start(project=fresh, source=path, actor=user))

    assert job.status == JobStatus.FAILED
    assert re.fullmatch(
        rf"version 1 of session '[0-9a-f-]{{36}}' is a state of {size} bytes, over STATE_MAX_BYTES \(16777216\) of this "
        r"install \(raise it here to import it\)", job.error,
    ), job.error
    assert job.result == {"code": "import_rejected"}
    _nothing_stored(fresh)


@pytest.mark.django_db
def test_a_file_whose_nodes_spell_more_than_the_state_it_declares_stops_assembling_it(
    project, user, settings, tmp_path
):
    """Whatever size a version declares (its own number, checked only against what it assembles),
    assembling stops once the text grows past it: memory stays bounded by the limit, not by the file."""
    import tracemalloc

    settings.VAR_DIR = tmp_path
    settings.STATE_MAX_BYTES = 1024 * 1024
    path, size = _bomb_file(project, tmp_path, 14, declared=512 * 1024)
    assert size > 16_000_000
    fresh = make_project("fresh")

    tracemalloc.start()
    try:
        with pytest.raises(ImportRejected, match=r"version 1 of session '[0-9a-f-]{36}' fails its checksum: its state is "
                                                 r"larger than its logical_size \(524288 bytes\); the file is corrupt"):
            transfer_import_run(project=fresh, path=path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 8 * 1024 * 1024, peak  # assembled whole, it was twice the state's 16 MB
    _nothing_stored(fresh)


@pytest.mark.django_db
@pytest.mark.parametrize("body", [b'{"a":1}', b'{"a":1}\n', b"[1, 2, 3]", b"hello"])
def test_a_file_that_is_no_export_is_called_so_not_truncated(project, settings, tmp_path, body):
    """A file without a final newline was "truncated: its last line (line 1) is cut off", whatever it was."""
    from snapshots_app.transfer import transfer_import_check

    settings.VAR_DIR = tmp_path
    path = tmp_path / "upload.ndjson"
    path.write_bytes(body)

    with pytest.raises(ImportRejected, match=r"^not a Session Rewind export: line 1 is not an export header$"):
        transfer_import_run(project=project, path=path)
    with pytest.raises(ImportRejected, match=r"^not a Session Rewind export: line 1 is not an export header$"):
        transfer_import_check(path)
    assert not WorkflowSession.objects.filter(project=project).exists()

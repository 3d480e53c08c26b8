"""Export and import of sessions as NDJSON with checksums.

File format (one JSON object per line, canonical JSON; every line carries `sum`, the SHA-256 of its
own canonical JSON without `sum`):

    {"type": "header", "format": "session-rewind-export", "format_version": 1, ...}
    {"type": "session", "id": ..., "external_id": ..., ...}            one per session
    {"type": "node", "digest": hex, "raw": base64}                      each state-tree node once
    {"type": "version", "session": ..., "number": n, "parent": {...}, "root": hex, "checksum": ...}
    {"type": "end", "records": n, "sha256": hex}                        SHA-256 of every line above

Import verifies every line's sum, the end record (nothing truncated or reordered), every node's
digest against the text it spells and every version's SHA-256 against the state it assembles,
all before storing anything; then it stores everything in one transaction. Version numbers, kinds,
metadata and parents within the export come back exactly; parents outside it become empty.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import uuid
from collections import Counter, OrderedDict
from collections.abc import Generator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from sessions_app import errors
from sessions_app.errors import ImportRejected, InvalidState
from sessions_app.models import SESSION_STATUSES, Project, WorkflowSession
from sessions_app.services import (
    RequestKey,
    User,
    actor_fields,
    audit_record,
    clean_external_id,
    clean_metadata,
    clean_tags,
    session_lock,
)
from snapshots_app import canonical, jobs, rows, store, tree
from snapshots_app.compaction import ProgressFn, _chunks, _mark, _no_progress
from snapshots_app.models import (
    VERSION_KINDS,
    IntegrityProblem,
    Job,
    JobKind,
    JobStatus,
    StateNode,
    Version,
)

logger = logging.getLogger(__name__)

FORMAT = "session-rewind-export"
FORMAT_VERSION = 1

SESSION_FIELDS = ("external_id", "workflow", "status", "metadata", "tags", "last_step", "last_error")
VERSION_FIELDS = (
    "number", "kind", "checksum", "logical_size", "stored_size", "step", "status", "error", "label", "pinned",
    "engine", "engine_version", "tags", "reason", "idempotency_key", "created_by_label", "summary",
)


def exports_dir() -> Path:
    return Path(settings.VAR_DIR) / "exports"


def imports_dir() -> Path:
    return Path(settings.VAR_DIR) / "imports"


def _private_folder(folder: Path) -> Path:
    """Exports and uploaded imports hold whole projects' states: only the service's own user may read
    them (the process umask would leave them world-readable on a shared host)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o777 != 0o700:  # (made earlier, under another umask)
        folder.chmod(0o700)
    return folder


NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _room_for(path: Path, then: str) -> Iterator[None]:
    """Writing `path`: a full disk (or quota) removes what was written and says where and what to
    do (it was a bare "No space left on device", an upload's 500 and its part-file left behind)."""
    try:
        yield
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in NO_ROOM:
            raise errors.StorageFull(f"no space left on the disk of {path.parent} (VAR_DIR): free space there, "
                                     f"then {then}; nothing was kept") from None
        raise


def _private_file(path: Path) -> IO[bytes]:
    """`path` opened for writing (truncated), readable by the service's own user only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file (a .partial left by a killed attempt) keeps its mode otherwise
    return os.fdopen(descriptor, "wb")


def _line(record: dict[str, Any]) -> bytes:
    body = canonical.dumps(record)
    record = {**record, "sum": hashlib.sha256(body).hexdigest()}
    return canonical.dumps(record) + b"\n"


def _when(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


# --------------------------------------------------------------------------------------------------
# Export


def _one_snapshot() -> Any:
    """A read-only transaction in which every read sees the database as it was at its first one.

    An export reads its versions, then their nodes, a chunk at a time, for as long as the file takes
    to write: a compaction (or a session deletion and the collection after it) that ran meanwhile
    removed nodes of versions the export had already listed, and the file went out without them,
    its header counting them. The job said done; the import refused the file ("the version or node
    records do not match the header"), found out only when the backup was needed. (On SQLite, whose
    tasks run in the caller, a write transaction would hold every writer back: plain reads there.)
    """
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return contextlib.nullcontext()
    return _repeatable_read()


@contextlib.contextmanager
def _repeatable_read() -> Iterator[None]:
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


def transfer_export_run(
    *,
    project: Project,
    session: WorkflowSession | None = None,
    job: Job | None = None,
    progress: ProgressFn = _no_progress,
    skip_damaged: bool = False,
) -> dict[str, Any]:
    """Write one session (or every session of the project) to VAR_DIR/exports; returns path and counts.

    The file appears complete or not at all (written aside, then renamed), so a killed export
    that runs again simply writes it again. Its contents are the project as it was when the export
    began, whatever a compaction running meanwhile removes (see _one_snapshot).

    A session with an open integrity problem stops the export, naming the version; with
    `skip_damaged` (a project's export) it is left out instead, and the result's `skipped` names it.
    """
    _refuse_skip_damaged_of_session(session, skip_damaged)
    with _one_snapshot():
        chosen = WorkflowSession.objects.filter(project=project)
        if session is not None:
            chosen = chosen.filter(pk=session.pk)
        sessions = list(chosen.order_by("created_at", "id"))
        # A version the integrity scrub found damaged would be written out as it is stored, and its import
        # would then blame the file. Say so here, naming it, instead (or leave its session out).
        damaged = _damaged_sessions(sessions)
        if damaged and not skip_damaged:
            problem = next(iter(damaged.values()))
            raise errors.IntegrityProblem(
                f"version {problem.version_number} of session {problem.session.external_id} has an open integrity "
                f"problem ({problem.detail}); resolve it before exporting"
                + ("" if session is not None else ", or export the project leaving out the damaged sessions (the API's "
                   "skip_damaged, or the admin's \"Export, leaving out sessions with an open integrity problem\")")
            )
        sessions = [item for item in sessions if item.pk not in damaged]
        skipped = [{"session": str(problem.session_id), "external_id": problem.session.external_id,
                    "version": problem.version_number, "detail": problem.detail} for problem in damaged.values()]
        versions = list(
            Version.objects.filter(session__in=sessions).select_related("parent").order_by("session_id", "number")
        )
        marked: set[bytes] = set()
        project_store = store.ProjectStore(project.pk, use_cache=False)
        _mark(project_store, {bytes(v.root) for v in versions}, marked)
        digests = sorted(marked)
        total = len(digests) + len(versions)
        progress(0, total, force=True)

        folder = _private_folder(exports_dir())
        name = _export_name(project, session, job.pk if job else uuid.uuid4().hex[:8])
        final = folder / name
        # Each attempt writes a file of its own: one taken over (its worker paused past JOB_STALE_SECONDS)
        # went on writing into the file the next attempt had renamed into place, and the finished
        # export's file no longer matched its end record. An earlier attempt's file is of no more use.
        partial = folder / f"{name}.partial-{job.attempts if job is not None else uuid.uuid4().hex[:8]}"
        for earlier in folder.glob(f"{name}.partial-*"):
            # Only an earlier attempt's: this one may be the superseded one, and a later attempt's file
            # is the export being made.
            attempt = earlier.name.rpartition("-")[2]
            if job is not None and attempt.isdigit() and int(attempt) < job.attempts:
                earlier.unlink(missing_ok=True)
        digest = hashlib.sha256()
        records = 0
        done = 0
        # A failed export is never renamed into place: _room_for removes its part-written file (a
        # project's states, as large as the export got), which stayed for EXPORT_KEEP_DAYS; after a
        # full disk, it kept the disk full. (A killed attempt's is removed by the next.)
        with _room_for(partial, "export again"), _private_file(partial) as out:

            def emit(record: dict[str, Any]) -> None:
                nonlocal records
                line = _line(record)
                digest.update(line)
                out.write(line)
                records += 1

            emit({
                "type": "header", "format": FORMAT, "format_version": FORMAT_VERSION,
                "scope": "session" if session else "project",
                "project": {"slug": project.slug, "name": project.name},
                "exported_at": timezone.now().isoformat(),
                "sessions": len(sessions), "versions": len(versions), "nodes": len(digests),
                **({"skipped_sessions": len(skipped)} if skipped else {}),
            })
            for item in sessions:
                emit({
                    "type": "session", "id": str(item.pk), **{f: getattr(item, f) for f in SESSION_FIELDS},
                    "created_at": _when(item.created_at), "archived_at": _when(item.archived_at),
                })
            for chunk in _chunks(digests, 500):
                rows = StateNode.objects.filter(project=project, digest__in=chunk).values_list("digest", "codec", "data", "seal")
                for node_digest, codec, data, seal in rows:
                    try:
                        raw = store.sealed_encoding(bytes(node_digest), codec, bytes(data), seal)
                    except store.CorruptNode as exc:  # written out, it would make its import blame the file
                        raise errors.IntegrityProblem(f"{exc}; the integrity scrub names the versions it affects") from None
                    emit({"type": "node", "digest": bytes(node_digest).hex(), "raw": base64.b64encode(raw).decode()})
                done += len(chunk)
                progress(done)
            for version in versions:
                parent = version.parent
                emit({
                    "type": "version", "session": str(version.session_id),
                    **{f: getattr(version, f) for f in VERSION_FIELDS},
                    "root": bytes(version.root).hex(),
                    "parent": {"session": str(parent.session_id), "number": parent.number} if parent else None,
                    "created_at": _when(version.created_at),
                })
                done += 1
                progress(done)
            end = {"type": "end", "records": records, "sha256": digest.hexdigest()}
            out.write(_line(end))
            out.flush()
            os.fsync(out.fileno())
    missing = None
    try:
        with transaction.atomic():
            if job is not None:
                jobs.job_hold(job=job)  # only the attempt that owns the job puts its file in place
            os.replace(partial, final)
    except FileNotFoundError as exc:
        # A job's partial file is named after the job, so the session's deletion removes it too:
        # an error only if the session is still there.
        missing = exc
    except BaseException:  # superseded (JobSuperseded), or the database went: the file is nobody's
        partial.unlink(missing_ok=True)
        raise
    if session is not None and not WorkflowSession.objects.filter(pk=session.pk).exists():
        # Deleted while this ran (the deletion removes the files of its exports, but this one was
        # not there yet): a deleted session's states must not stay downloadable, nor re-importable.
        final.unlink(missing_ok=True)
        raise errors.SessionNotFound(f"session {session.external_id} was deleted during its export", session=str(session.pk))
    if missing is not None:
        raise missing
    return {
        "path": str(final), "file": name, "bytes": final.stat().st_size, "sessions": len(sessions),
        "versions": len(versions), "nodes": len(digests), **({"skipped": skipped} if skipped else {}),
    }


def _refuse_skip_damaged_of_session(session: WorkflowSession | None, skip_damaged: bool) -> None:
    if session is not None and skip_damaged:
        raise InvalidState("skip_damaged is for a project's export: a session's own export is refused while it has an "
                           "open integrity problem")


def _damaged_sessions(sessions: list[WorkflowSession]) -> dict[Any, IntegrityProblem]:
    """Each of `sessions` with an open integrity problem, with its first (lowest version) problem."""
    found: dict[Any, IntegrityProblem] = {}
    problems = (IntegrityProblem.objects.filter(session__in=sessions, resolved_at__isnull=True)
                .select_related("session").order_by("session__created_at", "session_id", "version_number"))
    for problem in problems:
        found.setdefault(problem.session_id, problem)
    return found


def transfer_export_start(
    *, project: Project, session: WorkflowSession | None = None, skip_damaged: bool = False, actor: User = None,
    actor_label: str = "", request: RequestKey | None = None,
) -> Job:
    """Queue an export of one session, or of every session of the project when `session` is None
    (leaving out those with an open integrity problem if `skip_damaged`; see transfer_export_run).
    `request`: the starting request's idempotency key (see jobs.job_create)."""
    from snapshots_app import tasks

    if session is not None and session.project_id != project.pk:
        raise InvalidState("the session belongs to another project")
    _refuse_skip_damaged_of_session(session, skip_damaged)
    return jobs.job_create(
        kind=JobKind.EXPORT, project=project, session=session, actor=actor, actor_label=actor_label,
        params={"scope": "session" if session else "project", **({"skip_damaged": True} if skip_damaged else {})},
        enqueue=lambda job_id: tasks.export_job.delay(job_id), request=request,
    )


def transfer_session_export_start(*, session: WorkflowSession, actor: User = None) -> tuple[Job, bool]:
    """The dashboard's Export button: queue an export of the session unless one is still unfinished,
    whose job it then returns. (job, whether it is new.) A double click queued two, and two files."""
    with transaction.atomic():
        session_lock(session)  # (two clicks at once: the second waits, then finds the first's job)
        running = Job.objects.filter(kind=JobKind.EXPORT, session=session, params__scope="session",
                                     status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).order_by("-id").first()
        if running is not None:
            return running, False
        return transfer_export_start(project=session.project, session=session, actor=actor), True


def _export_name(project: Project, session: WorkflowSession | None, suffix: Any) -> str:
    scope = f"session-{session.external_id}" if session else "project"
    safe_scope = "".join(c if c.isalnum() or c in "-_." else "_" for c in scope)[:80]
    return f"{project.slug}-{safe_scope}-{suffix}.ndjson"


def session_export_files(*, session: WorkflowSession) -> list[Path]:
    """The files the session's own exports wrote, or are writing (finished, or named as they will be)."""
    names: set[str] = set()
    for job_id, result in Job.objects.filter(session=session, kind=JobKind.EXPORT).values_list("id", "result"):
        name = _export_name(session.project, session, job_id)
        names.add(name)
        names.update(path.name for path in exports_dir().glob(f"{name}.partial*"))  # (one per attempt)
        if isinstance(result, dict) and isinstance(result.get("file"), str):
            names.add(Path(result["file"]).name)
    return [exports_dir() / name for name in sorted(names)]


def export_file(*, job: Job) -> Path:
    """The finished export's file, for download (InvalidState if the job has none, or not yet)."""
    if job.kind != JobKind.EXPORT or not job.result or "file" not in job.result:
        raise InvalidState("this job has no export file (yet)")
    path = exports_dir() / Path(job.result["file"]).name
    if not path.is_file():
        raise InvalidState("the export file is no longer there; export again")
    return path


# --------------------------------------------------------------------------------------------------
# Import


def _line_max() -> int:
    """The longest line an export of this install writes: a node of the largest state, in base64,
    is 4/3 of it; every other record is far smaller."""
    return 2 * int(settings.STATE_MAX_BYTES) + 1024 * 1024


def _lines(source: IO[bytes], limit: int) -> Iterator[bytes]:
    """The file's lines, refusing one longer than `limit`. A file that is one long line (a JSON
    document uploaded in place of an export) was read whole and parsed: a 295 MB one took 1 GB of the
    worker, a few GB one got the worker killed on every delivery, and the job failed as "gave up after
    5 attempts: the worker died each time", not saying the file was not an export."""
    number = 0
    while line := source.readline(limit + 1):
        number += 1
        if len(line) > limit:
            raise ImportRejected(
                f"line {number} is longer than any line of an export ({limit} bytes): not a Session Rewind export, "
                "or one from an install with a larger STATE_MAX_BYTES (raise it here to import it)"
            )
        yield line


GZIP_MAGIC = b"\x1f\x8b"


def _records(lines: Iterator[bytes]) -> Generator[dict[str, Any], None, None]:
    running = hashlib.sha256()
    count = 0
    ended = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if ended:
            raise ImportRejected(f"line {number}: data after the end record")
        try:
            record = orjson.loads(line)
            claimed = record.pop("sum")
        except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError):
            if number == 1 and line.startswith(GZIP_MAGIC):
                raise ImportRejected("the file is gzip-compressed: decompress it (gunzip), then import the .ndjson") from None
            if count == 0:
                # No header yet: whatever this is, it is not an export. (A JSON document without a final
                # newline was called "truncated: its last line (line 1) is cut off".)
                raise ImportRejected(f"not a Session Rewind export: line {number} is not an export header") from None
            if not line.endswith(b"\n"):  # the last line, cut short: a download or copy that stopped
                raise ImportRejected(f"the file is truncated: its last line (line {number}) is cut off") from None
            raise ImportRejected(f"line {number} is not a checksummed export record") from None
        if not isinstance(record, dict) or hashlib.sha256(canonical.dumps(record)).hexdigest() != claimed:
            raise ImportRejected(f"line {number} fails its checksum: the file is corrupt")
        if record.get("type") == "end":
            if record.get("records") != count or record.get("sha256") != running.hexdigest():
                raise ImportRejected("the end record does not match the file: lines are missing or changed")
            ended = True
            continue
        if count == 0 and (record.get("type") != "header" or record.get("format") != FORMAT):
            raise ImportRejected("not a Session Rewind export (no header)")
        if count == 0 and record.get("format_version") != FORMAT_VERSION:
            raise ImportRejected(f"unsupported export format version {record.get('format_version')!r}")
        running.update(line if line.endswith(b"\n") else line + b"\n")
        count += 1
        yield record
    if not ended:
        if count == 0:
            raise ImportRejected("not a Session Rewind export (no header)")
        raise ImportRejected("the file is truncated (no end record)")


HEADER_LINE_MAX = 64 * 1024  # an export's header line is a few hundred bytes


def transfer_import_check(source: IO[bytes] | Path) -> None:
    """ImportRejected unless the file begins with an export's header record (its sum and format
    checked): what an upload is checked for before it is kept and its job queued, so a file that is no
    export (gzip-compressed, a JSON document) is refused at once, with nothing kept, instead of
    answered 202 and failed by its job. Only the first line is read (at most HEADER_LINE_MAX bytes);
    the job verifies the rest. A file object is left where it was."""
    if isinstance(source, Path):
        with source.open("rb") as opened:
            transfer_import_check(opened)
        return
    start = source.tell()

    def first_lines() -> Iterator[bytes]:
        number = 0
        while line := source.readline(HEADER_LINE_MAX + 1):
            number += 1
            if len(line) > HEADER_LINE_MAX:
                if number == 1 and line.startswith(GZIP_MAGIC):
                    raise ImportRejected("the file is gzip-compressed: decompress it (gunzip), then import the .ndjson")
                raise ImportRejected(f"not a Session Rewind export: line {number} is not an export header")
            yield line

    records = _records(first_lines())
    try:
        next(records)  # the header, checked; or ImportRejected
    finally:
        records.close()
        source.seek(start)


def _verified_text(root: bytes, nodes: _NodeSpill, verified: set[bytes], *, most: int, name: str) -> bytes:
    """Splice a tree like tree.splice, also checking that every node's digest matches it: the digest
    of its text, or for a node whose holes are runs that of its encoding (tree.TreeWriter.node_of),
    or for the root tree.root_digest of the text's SHA-256 (files of earlier releases have digests
    of the text there too).

    A text that grows past `most` bytes (the version's logical_size, itself at most STATE_MAX_BYTES)
    stops the assembly: nodes that name a child twice, level upon level, spelled 65 MB from a 6 KB file
    (and more, a level more), and the worker was killed on every delivery. The texts kept for nodes met
    again stay within STATE_MAX_BYTES too (past it, one met again is assembled again)."""
    memo: dict[bytes, bytes] = {}
    memo_room = int(settings.STATE_MAX_BYTES)

    def too_large() -> ImportRejected:
        return ImportRejected(f"{name} fails its checksum: its state is larger than its logical_size ({most} bytes); "
                              "the file is corrupt")

    def text_of(digest: bytes) -> bytes:
        nonlocal memo_room
        cached = memo.get(digest)
        if cached is not None:
            return cached
        node = nodes.get(digest)
        if node is None:
            raise ImportRejected(f"node {digest.hex()} is missing from the file")
        if node.kind == tree.KIND_JSON_STRING:
            result = tree.FLAVORS[node.flavor].encode(text_of(node.holes[0][1]).decode())
        elif not node.holes:
            result = node.text
        else:
            parts = []
            position = 0
            length = 0
            for offset, child in node.holes:
                parts.append(node.text[position:offset])
                parts.append(text_of(child))
                length += len(parts[-2]) + len(parts[-1])
                if length > most:
                    raise too_large()
                position = offset
            parts.append(node.text[position:])
            result = b"".join(parts)
        if len(result) > most:
            raise too_large()
        if digest not in verified:
            kind = tree.KIND_STRING if node.kind == tree.KIND_JSON_STRING else node.kind
            as_root = digest == root and tree.root_digest(hashlib.sha256(result).digest()) == digest
            paged = node.kind in tree.CONTAINER_KINDS and node.level > 0 and tree.paged_digest(node.encode()) == digest
            if not (as_root or paged) and tree.digest_of(kind, node.flavor, result) != digest:
                raise ImportRejected(f"node {digest.hex()} does not match its digest: the file is corrupt")
            verified.add(digest)
        if len(result) <= memo_room:
            memo[digest] = result
            memo_room -= len(result)
        return result

    try:
        return text_of(root)
    except (IndexError, KeyError, ValueError, UnicodeDecodeError, RecursionError, TypeError) as exc:
        raise ImportRejected(f"a state tree in the file cannot be assembled: {exc}") from None


class _NodeSpill:
    """The file's nodes, on disk rather than in memory: an export is as large as its project, and
    holding its nodes twice (raw and decoded) took an import ~4x the file's size in memory, enough
    for a legal upload to get a worker killed on every delivery. The disk is SQLite's own private
    temporary database (in its temp folder, TMPDIR: never left behind, even by a killed worker, and
    VAR_DIR may be read-only). `get` decodes on demand and keeps the most recently used nodes, up to
    DECODED_KEPT_BYTES of their encodings (a state's nodes are read together, and shared across versions)."""

    DECODED_KEPT_BYTES = 32 * 1024 * 1024

    def __init__(self) -> None:
        self._db = sqlite3.connect("")  # "": a private temporary database, on disk, deleted on close
        self._db.executescript(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
            "CREATE TABLE node (digest BLOB PRIMARY KEY, raw BLOB NOT NULL) WITHOUT ROWID;"
        )
        self._pending: list[tuple[bytes, bytes]] = []
        self._decoded: OrderedDict[bytes, tuple[tree.Node, int]] = OrderedDict()
        self._decoded_bytes = 0

    def __enter__(self) -> _NodeSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.close()

    def put(self, digest: bytes, raw: bytes) -> None:
        self._pending.append((digest, raw))
        if len(self._pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        self._db.executemany("INSERT OR IGNORE INTO node VALUES (?, ?)", self._pending)
        self._pending.clear()

    def count(self) -> int:
        self.flush()
        return int(self._db.execute("SELECT count(*) FROM node").fetchone()[0])

    def get(self, digest: bytes) -> tree.Node | None:
        kept = self._decoded.get(digest)
        if kept is not None:
            self._decoded.move_to_end(digest)
            return kept[0]
        row = self._db.execute("SELECT raw FROM node WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        try:
            node = tree.Node.decode(row[0])
        except (IndexError, ValueError) as exc:
            raise ImportRejected(f"node {digest.hex()} cannot be decoded: {exc}") from None
        self._decoded[digest] = (node, len(row[0]))
        self._decoded_bytes += len(row[0])
        while self._decoded_bytes > self.DECODED_KEPT_BYTES and len(self._decoded) > 1:
            self._decoded_bytes -= self._decoded.popitem(last=False)[1][1]
        return node

    def batches(self, keep: set[bytes], size: int = 500) -> Iterator[dict[bytes, bytes]]:
        """The raw nodes whose digests are in `keep`, `size` at a time."""
        batch: dict[bytes, bytes] = {}
        for digest, raw in self._db.execute("SELECT digest, raw FROM node"):
            if digest in keep:
                batch[digest] = raw
                if len(batch) >= size:
                    yield batch
                    batch = {}
        if batch:
            yield batch


def _read_file(path: Path, nodes: _NodeSpill, progress: ProgressFn) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """The header, session and version records of the file; its nodes go to `nodes`."""
    header: dict[str, Any] = {}
    sessions: list[dict] = []
    versions: list[dict] = []
    read = 0
    with path.open("rb") as source:
        for record in _records(_lines(source, _line_max())):
            kind = record.get("type")
            try:
                if kind == "header":
                    header = record
                    # Every node and version is counted twice: read and verified, then stored.
                    progress(0, 2 * (int(record.get("nodes", 0)) + int(record.get("versions", 0))), force=True)
                elif kind == "session":
                    sessions.append(record)
                elif kind == "node":
                    nodes.put(bytes.fromhex(record["digest"]), base64.b64decode(record["raw"], validate=True))
                    read += 1
                    progress(read)
                elif kind == "version":
                    versions.append(record)
                else:
                    raise ImportRejected(f"unknown record type {kind!r}")
            except (KeyError, ValueError, TypeError) as exc:
                raise ImportRejected(f"malformed {kind} record: {exc}") from None
    return header, sessions, versions


SESSION_TEXT_LIMITS = {"workflow": 200, "last_step": 200, "last_error": None}


def _check_session(record: dict[str, Any]) -> None:
    """A session record holds what the API would have accepted: the file's checksums are no
    signature (anyone can write a file that verifies), so its fields get the API's own checks."""
    name = f"session {str(record.get('id'))[:64]!r}"
    if not isinstance(record.get("id"), str) or len(record["id"]) > 64:
        raise ImportRejected(f"{name} has no valid id")
    try:
        clean_external_id(record.get("external_id"))
        clean_tags(record.get("tags"))
        clean_metadata(record.get("metadata"))
    except InvalidState as exc:
        raise ImportRejected(f"{name}: {exc.message}") from None
    if record.get("status") not in SESSION_STATUSES:
        raise ImportRejected(f"{name} has an unknown status")
    _check_texts(record, SESSION_TEXT_LIMITS, name)
    _check_moments(record, ("created_at", "archived_at"), name)


# As the columns (and snapshot_record) take them; None: no limit.
VERSION_TEXT_LIMITS = {"step": 200, "error": None, "label": 100, "engine": 100, "engine_version": 50, "reason": None,
                       "created_by_label": 200}


def _check_version(record: dict[str, Any], session_ids: set[str]) -> None:
    """A version record holds what a write here could have made, as a session record does (see
    _check_session): a crafted file failed as "DataError: value too long…" or "AttributeError: 'str'
    object has no attribute 'get'", with a worker traceback, instead of naming the field."""
    if record.get("session") not in session_ids:
        raise ImportRejected("a version belongs to no session in the file")
    if not _count(record.get("number"), INT4_MAX) or record["number"] < 1:
        raise ImportRejected("a version has no valid number")
    name = _version_name(record)
    if record["number"] > IMPORT_NUMBER_MAX:
        # The column holds up to INT4_MAX: a session imported with a version there took no write after
        # (every one failed as "integer out of range", a 500).
        raise ImportRejected(f"{name}: version numbers above {IMPORT_NUMBER_MAX} are refused, leaving room for the "
                             f"session's later writes (the most a version number can be is {INT4_MAX})")
    if not (isinstance(record.get("root"), str) and isinstance(record.get("checksum"), str)):
        raise ImportRejected(f"{name} has a malformed root or checksum")
    if record.get("kind") not in VERSION_KINDS:
        raise ImportRejected(f"{name} has an unknown kind")
    if record.get("status") != "" and record.get("status") not in SESSION_STATUSES:
        raise ImportRejected(f"{name} has an unknown status")
    if record.get("summary") is not None:
        try:
            clean_metadata(record["summary"], limit_size=False)  # an object jsonb gives back as it is (no NUL, NaN)
        except InvalidState:
            raise ImportRejected(f"{name} has a malformed summary") from None
    _check_texts(record, VERSION_TEXT_LIMITS, name)
    _check_moments(record, ("created_at",), name)
    if type(record.get("pinned")) is not bool:
        raise ImportRejected(f"{name}: pinned must be true or false")
    if not (_count(record.get("logical_size")) and _count(record.get("stored_size"))):
        raise ImportRejected(f"{name}: logical_size and stored_size must be whole numbers of bytes")
    key = record.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or "\x00" in key or len(key) > 200):
        raise ImportRejected(f"{name}: idempotency_key must be text of at most 200 characters, or null")
    try:
        clean_tags(record.get("tags"))
    except InvalidState as exc:
        raise ImportRejected(f"{name}: {exc.message}") from None
    parent = record.get("parent")
    if parent is not None and not (isinstance(parent, dict) and isinstance(parent.get("session"), str)
                                   and _count(parent.get("number"), INT4_MAX)):
        raise ImportRejected(f"{name}: parent must be null or {{session, number}}")


def _version_name(record: dict[str, Any]) -> str:
    return f"version {record['number']} of session {str(record['session'])[:64]!r}"


INT4_MAX, INT8_MAX = 2**31 - 1, 2**63 - 1  # the largest a version number's and a size's columns hold
IMPORT_NUMBER_MAX = 2_000_000_000  # the highest version number an import takes: ~147 million writes' room above it


def _count(value: Any, most: int = INT8_MAX) -> bool:
    """A whole number from 0 to `most` (and not a boolean, which Python counts as one)."""
    return type(value) is int and 0 <= value <= most


def _check_texts(record: dict[str, Any], limits: dict[str, int | None], name: str) -> None:
    for field, limit in limits.items():
        value = record.get(field)
        if not isinstance(value, str) or "\x00" in value or (limit is not None and len(value) > limit):
            raise ImportRejected(f"{name}: {field} must be text" + (f" of at most {limit} characters" if limit else ""))


def _check_moments(record: dict[str, Any], fields: tuple[str, ...], name: str) -> None:
    for field in fields:
        value = record.get(field)
        try:
            valid = value is None or (isinstance(value, str) and parse_datetime(value) is not None)
        except ValueError:  # well formed, but no such moment ("2026-13-45T…")
            valid = False
        if not valid:
            raise ImportRejected(f"{name}: {field} must be an ISO 8601 date and time, or null")


def transfer_import_run(
    *, project: Project, path: Path, job: Job | None = None, actor: User = None, actor_label: str = "",
    progress: ProgressFn = _no_progress, skip_existing: bool = False,
) -> dict[str, Any]:
    """Import an export file into `project` (verified first; all or nothing).

    A session whose external id the project has already refuses the import, naming it; with
    `skip_existing` it is left out instead (the result's `skipped`), so a project's export brings
    back the sessions deleted since into the project it came from.

    With `job`, the job is finished in the same transaction that stores the data, so a redelivered
    task never imports twice.
    """
    with _NodeSpill() as nodes:
        header, sessions, versions = _read_file(Path(path), nodes, progress)
        verified_nodes = _verify(header, sessions, nodes, versions, progress)
        with transaction.atomic():
            if job is not None:
                jobs.job_hold(job=job)  # a superseded attempt must not import what the owner imports too
            store.project_write_lock(project.pk)
            # Only the nodes some version spells are stored (verified or nothing).
            # Progress goes on from where verifying left it (see _read_file).
            stored = _StoreProgress(progress, nodes.count() + len(versions))
            result = _store_import(project, sessions, nodes.batches(verified_nodes), versions, actor, actor_label, stored,
                                   skip_existing=skip_existing)
            if job is not None:
                jobs.job_finish(job=job, result=result)
    return result


def _verify(
    header: dict[str, Any], sessions: list[dict], nodes: _NodeSpill, versions: list[dict], progress: ProgressFn
) -> set[bytes]:
    """Check the file's records against its header and each other, and every state against its
    checksum (ImportRejected naming the first problem). Returns the digests of the nodes in use."""
    for record in sessions:
        _check_session(record)
    session_ids = {record["id"] for record in sessions}
    if len(session_ids) != len(sessions) or len(sessions) != header.get("sessions"):
        raise ImportRejected("the session records do not match the header")
    # What the database's unique constraints would refuse is refused here, named: it failed as
    # "IntegrityError: duplicate key value violates unique constraint…", a traceback as the job's error.
    twice = sorted(name for name, count in Counter(record["external_id"] for record in sessions).items() if count > 1)
    if twice:
        raise ImportRejected(f"two sessions in the file have the same external id {twice[0]!r}", external_ids=twice)
    node_count = nodes.count()
    if len(versions) != header.get("versions") or node_count != header.get("nodes"):
        raise ImportRejected("the version or node records do not match the header")
    progress(node_count)
    verified_nodes: set[bytes] = set()
    verified_states: set[tuple[str, str, int]] = set()
    seen_numbers: set[tuple[str, int]] = set()
    seen_keys: set[tuple[str, str]] = set()
    done = node_count
    for record in versions:
        _check_version(record, session_ids)
        key = (record["session"], record["number"])
        if key in seen_numbers:
            raise ImportRejected(f"{_version_name(record)} appears twice")
        seen_numbers.add(key)
        if record["idempotency_key"] is not None:
            if (record["session"], record["idempotency_key"]) in seen_keys:
                raise ImportRejected(f"{_version_name(record)} has the idempotency key {record['idempotency_key']!r} "
                                     "of another version of its session: a session's keys are unique")
            seen_keys.add((record["session"], record["idempotency_key"]))
        if record["logical_size"] > settings.STATE_MAX_BYTES:
            # Refused before its tree is assembled: a few KB of nodes that name each other can spell
            # a state of any size (each level doubling it), and assembling it took the worker's memory.
            raise ImportRejected(
                f"{_version_name(record)} is a state of {record['logical_size']} bytes, over STATE_MAX_BYTES "
                f"({settings.STATE_MAX_BYTES}) of this install (raise it here to import it)"
            )
    _check_lineage(versions)
    for record in versions:
        state_key = (record["root"], record["checksum"], record["logical_size"])
        if state_key not in verified_states:
            try:
                root = bytes.fromhex(record["root"])
            except (TypeError, ValueError):
                raise ImportRejected(f"{_version_name(record)} has a malformed root") from None
            text = _verified_text(root, nodes, verified_nodes, most=record["logical_size"], name=_version_name(record))
            if canonical.checksum(text) != record["checksum"] or len(text) != record["logical_size"]:
                raise ImportRejected(
                    f"{_version_name(record)} fails its checksum: the file is corrupt"
                )
            verified_states.add(state_key)
        done += 1
        progress(done)
    return verified_nodes


def _check_lineage(versions: list[dict]) -> None:
    """ImportRejected for a version whose parent is not an earlier version: within its session one with
    a lower number (a version is written on top of what is there; a rewind or data fix names an earlier
    one), and across sessions (a fork's first version names its source) no chain of parents that comes
    back to where it began. A version that was its own parent, or one of a cycle, imported, and the next
    trim or retention run of its session looped for good in compaction.remove_versions, holding the
    session's lock and a worker. (A parent the file does not hold is left out, as before.)"""
    in_file = {(record["session"], record["number"]): record for record in versions}

    def parent_of(key: tuple[str, int]) -> tuple[str, int] | None:
        parent = in_file[key].get("parent")
        target = (parent["session"], parent["number"]) if parent else None
        return target if target in in_file else None

    for record in versions:
        parent = record.get("parent")
        if parent and parent["session"] == record["session"] and parent["number"] >= record["number"]:
            raise ImportRejected(f"{_version_name(record)} names version {parent['number']} of its session as its "
                                 "parent: its parent must be an earlier version")
    # Across sessions: follow each chain once (finished ones are not walked again), so this is linear.
    finished: set[tuple[str, int]] = set()
    for start in in_file:
        path: list[tuple[str, int]] = []
        on_path: set[tuple[str, int]] = set()
        key: tuple[str, int] | None = start
        while key is not None and key not in finished:
            if key in on_path:
                raise ImportRejected(f"{_version_name(in_file[key])}: its parent must be an earlier version, but its "
                                     "parents (across sessions) lead back to itself")
            path.append(key)
            on_path.add(key)
            key = parent_of(key)
        finished.update(path)


class _StoreProgress:
    """Progress of storing an import, counted on from `start`."""

    def __init__(self, progress: ProgressFn, start: int) -> None:
        self.progress, self.done = progress, start

    def add(self, count: int) -> None:
        self.done += count
        self.progress(self.done)


def _taken(project: Project, external_ids: list[str]) -> set[str]:
    """Those of `external_ids` that sessions of the project have already."""
    taken: set[str] = set()
    for chunk in _chunks(external_ids, 1000):
        taken.update(WorkflowSession.objects.filter(project=project, external_id__in=chunk).values_list("external_id", flat=True))
    return taken


def _refuse_taken(project: Project, external_ids: list[str]) -> None:
    """ImportRejected if the project has a session with one of these external ids already."""
    taken = sorted(_taken(project, external_ids))
    if taken:
        more = f" and {len(taken) - 10} more" if len(taken) > 10 else ""
        raise ImportRejected(
            f"sessions with these external ids already exist in this project: {', '.join(taken[:10])}{more} (import "
            "with skip_existing to leave them out)",
            external_ids=taken,
        )


def _store_import(
    project: Project, sessions: list[dict], node_batches: Iterator[dict[bytes, bytes]], versions: list[dict],
    actor: User, actor_label: str, progress: _StoreProgress, *, skip_existing: bool = False,
) -> dict[str, Any]:
    skipped: list[dict[str, Any]] = []
    kept_here: dict[tuple[str, int], tuple[str, str]] = {}  # a left-out version: (its external id, checksum)
    if skip_existing:
        # (Their nodes are stored all the same, with the rest: those no version here uses are freed by
        # the project's next garbage collection.)
        taken = _taken(project, [record["external_id"] for record in sessions])
        left_out = {record["id"] for record in sessions if record["external_id"] in taken}
        counts = Counter(record["session"] for record in versions if record["session"] in left_out)
        skipped = [{"external_id": record["external_id"], "versions": counts[record["id"]]}
                   for record in sessions if record["id"] in left_out]
        external_of = {record["id"]: record["external_id"] for record in sessions if record["id"] in left_out}
        kept_here = {(record["session"], record["number"]): (external_of[record["session"]], record["checksum"])
                     for record in versions if record["session"] in left_out}
        sessions = [record for record in sessions if record["id"] not in left_out]
        versions = [record for record in versions if record["session"] not in left_out]
    external_ids = [record["external_id"] for record in sessions]
    _refuse_taken(project, external_ids)
    project_store = store.ProjectStore(project.pk)
    stored_nodes = 0
    for batch in node_batches:
        project_store.save_nodes(batch)
        stored_nodes += len(batch)
        progress.add(len(batch))
    new_sessions: dict[str, WorkflowSession] = {}
    try:
        with transaction.atomic():
            for record in sessions:
                item = WorkflowSession(project=project, **{f: record[f] for f in SESSION_FIELDS})
                item.archived_at = parse_datetime(record["archived_at"]) if record.get("archived_at") else None
                item.save()
                new_sessions[record["id"]] = item
    except IntegrityError:
        # Created since the check above, and committed meanwhile: by another import of the file, or an
        # engine writing to one of its sessions here. The job failed on the database's constraint
        # ("IntegrityError: duplicate key value...", logged as an unexpected error).
        _refuse_taken(project, external_ids)
        raise
    # The file's history is kept (kinds, reasons, authors), but who wrote a version here is whoever
    # imported it: its author reads "… (imported by …)", so a file cannot pass off its versions as
    # data fixes or rewinds made in this project (those are in this project's audit log; imports are
    # there as session.import).
    importer = actor_fields(actor, actor_label)["actor_label"]
    new_versions = []
    for record in versions:
        author = f"{record['created_by_label'] or 'system'} (imported by {importer})"
        new_versions.append(Version(
            session=new_sessions[record["session"]], root=bytes.fromhex(record["root"]),
            **{f: record[f] for f in VERSION_FIELDS if f != "created_by_label"},
            created_by_label=author[:200],
        ))
    created: list[Version] = []
    for chunk in _chunks(new_versions, 500):
        created += Version.objects.bulk_create(chunk)
        progress.add(len(chunk))
    by_key = {(record["session"], record["number"]): version for record, version in zip(versions, created, strict=True)}
    by_key.update(_versions_kept_here(project, versions, kept_here))
    outside = 0
    for record, version in zip(versions, created, strict=True):
        parent = record.get("parent")
        if parent:
            target = by_key.get((parent.get("session"), parent.get("number")))
            version.parent = target
            outside += target is None
        created_at = parse_datetime(record["created_at"]) if record.get("created_at") else None
        version.created_at = created_at or version.created_at
    if connection.vendor == "postgresql":
        rows.versions_link(created)
    else:
        Version.objects.bulk_update(created, ["parent", "created_at"], batch_size=500)
    by_session: dict[Any, list[Version]] = {}
    for version in created:
        by_session.setdefault(version.session_id, []).append(version)
    for record in sessions:
        item = new_sessions[record["id"]]
        mine = by_session.get(item.pk, [])
        head = max(mine, key=lambda v: v.number, default=None)
        item.head_number = head.number if head else 0
        item.version_count = len(mine)
        item.logical_bytes = head.logical_size if head else 0
        item.stored_bytes = sum(v.stored_size for v in mine)
        item.save(update_fields=["head_number", "version_count", "logical_bytes", "stored_bytes"])
        if record.get("created_at"):
            WorkflowSession.objects.filter(pk=item.pk).update(created_at=parse_datetime(record["created_at"]))
        audit_record(
            project=project, action="session.import", target_type="session", target_id=item.pk, session_id=item.pk,
            actor=actor, actor_label=actor_label,
            details={"external_id": item.external_id, "versions": len(mine), "source_session": record["id"]},
        )
    return {
        "sessions": [{"id": str(s.pk), "external_id": s.external_id} for s in new_sessions.values()],
        "versions": len(created), "nodes": stored_nodes, "parents_outside_export": outside,
        **({"skipped": skipped} if skip_existing else {}),
    }


def _versions_kept_here(
    project: Project, versions: list[dict], kept_here: dict[tuple[str, int], tuple[str, str]]
) -> dict[tuple[str, int], Version]:
    """The parents the imported versions name among the sessions an import left out (skip_existing),
    as the project has them: the same session (by external id) and number, with the same state. A
    restored fork of a session the project still has keeps its link to it (it came back parentless)."""
    wanted = {(record["parent"]["session"], record["parent"]["number"]) for record in versions
              if record.get("parent") and (record["parent"]["session"], record["parent"]["number"]) in kept_here}
    found: dict[tuple[str, int], Version] = {}
    for chunk in _chunks(sorted(wanted), 200):
        condition = Q()
        for key in chunk:
            condition |= Q(session__external_id=kept_here[key][0], number=key[1], checksum=kept_here[key][1])
        here = {(v.session.external_id, v.number): v
                for v in Version.objects.filter(condition, session__project=project).select_related("session")}
        for key in chunk:
            version = here.get((kept_here[key][0], key[1]))
            if version is not None:
                found[key] = version
    return found


def transfer_import_start(
    *, project: Project, source: IO[bytes] | Path, skip_existing: bool = False, actor: User = None,
    actor_label: str = "", request: RequestKey | None = None,
) -> Job:
    """Keep the uploaded file under VAR_DIR/imports and queue its verified import into `project`
    (see transfer_import_run for `skip_existing`). `request`: the starting request's idempotency key
    (see jobs.job_create); a retry keeps no copy."""
    from snapshots_app import tasks

    earlier = jobs.job_for_request(request)
    if earlier is not None:
        return earlier
    transfer_import_check(source)  # not an export: refused now, nothing kept and no job
    folder = _private_folder(imports_dir())
    target = folder / f"{project.slug}-{uuid.uuid4().hex}.ndjson"
    with _room_for(target, "upload the file again"), _private_file(target) as out:
        if isinstance(source, Path):
            with source.open("rb") as original:
                shutil.copyfileobj(original, out)
        else:
            shutil.copyfileobj(source, out)
    job = jobs.job_create(
        kind=JobKind.IMPORT, project=project, params={"file": target.name, **({"skip_existing": True} if skip_existing else {})},
        actor=actor, actor_label=actor_label,
        enqueue=lambda job_id: tasks.import_job.delay(job_id), request=request,
    )
    if job.params.get("file") != target.name:
        target.unlink(missing_ok=True)  # a concurrent retry's job won: this copy is nobody's
    return job


def import_path(job: Job) -> Path:
    return imports_dir() / Path(job.params["file"]).name


# An upload is copied to VAR_DIR/imports before its job row commits: one younger than this may be
# about to get its job, so the sweep leaves it.
UPLOAD_GRACE = timedelta(hours=1)


def transfer_files_sweep(*, now: datetime | None = None) -> dict[str, int]:
    """Delete export files older than EXPORT_KEEP_DAYS (a project's states each, kept on disk
    for good before) and uploads no unfinished import job is waiting for (a worker that died
    between an import's commit and removing its file left it). Returns how many of each went."""
    now = now or timezone.now()
    exports_before = (now - timedelta(days=settings.EXPORT_KEEP_DAYS)).timestamp()
    waiting = {
        str(params.get("file"))
        for params in Job.objects.filter(kind=JobKind.IMPORT, status__in=[JobStatus.QUEUED, JobStatus.RUNNING])
        .values_list("params", flat=True)
        if isinstance(params, dict)
    }
    uploads_before = (now - UPLOAD_GRACE).timestamp()
    removed = {"exports": 0, "uploads": 0}
    for kind, folder, expired in (
        ("exports", exports_dir(), lambda path: path.stat().st_mtime < exports_before),
        ("uploads", imports_dir(), lambda path: path.name not in waiting and path.stat().st_mtime < uploads_before),
    ):
        for path in folder.glob("*.ndjson*") if folder.is_dir() else ():
            try:
                if expired(path):
                    path.unlink()
                    removed[kind] += 1
            except FileNotFoundError:  # removed meanwhile (a session deletion, a finished import)
                continue
    if any(removed.values()):
        logger.info("transfer files: removed %s expired exports and %s orphaned uploads",
                    removed["exports"], removed["uploads"])
    return removed

"""Raw SQL for the statements on the hot paths of writes and reads, for PostgreSQL.

Measured (200 KB agent states, `make bench`): the ORM spent ~3 ms of a ~10 ms write compiling and
running lock-session, fetch-head, insert-version and save-session, and 0.6 ms of a ~2 ms read
compiling the version lookup; these statements do the same work in a fraction of that. Columns and
value conversion still come from the models' own fields, so a new field needs no change here.
SQLite (the embedded default) keeps the ORM.
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any

from django.db import connection
from django.db.models import Field, Model

from sessions_app.models import WorkflowSession
from snapshots_app import store
from snapshots_app.models import RemovedWrite, StateNode, Version

_SESSION_FIELDS: list[Field] = list(WorkflowSession._meta.concrete_fields)
_VERSION_COLUMNS: list[Field] = list(Version._meta.concrete_fields)
_VERSION_FIELDS: list[Field] = [f for f in _VERSION_COLUMNS if not f.primary_key and f.attname != "parent_id"]
_SESSION_COLUMN = [f.attname for f in _VERSION_COLUMNS].index("session_id")
_NUMBER_COLUMN = [f.attname for f in _VERSION_COLUMNS].index("number")
_CONVERTED = {id(f) for f in (*_SESSION_FIELDS, *_VERSION_COLUMNS) if hasattr(f, "from_db_value")}


def _q(name: str | None) -> str:
    assert name is not None  # concrete fields always have a column
    return connection.ops.quote_name(name)


def _from_row(model: type[Model], fields: list[Field], row: tuple[Any, ...] | list[Any]) -> Any:
    values = [
        field.from_db_value(value, None, connection) if id(field) in _CONVERTED else value  # type: ignore[attr-defined]
        for field, value in zip(fields, row, strict=True)
    ]
    return model.from_db(connection.alias, [f.attname for f in fields], values)


def _locking_select(columns: str) -> str:
    """Select `columns` of session `%s` (as `s`) under the project's shared write lock (garbage
    collection takes it exclusively) and the session's row lock, in that order."""
    return (
        f"SELECT {columns} FROM {WorkflowSession._meta.db_table} AS s CROSS JOIN LATERAL "
        f"(SELECT pg_advisory_xact_lock_shared({store.PROJECT_LOCK_CLASS}, s.project_id::integer)) AS l "
        "WHERE s.id = %s FOR UPDATE OF s"
    )


@cache
def _sql(name: str) -> str:
    """The statements, built once from the models' fields."""
    version_table = Version._meta.db_table
    if name == "session_lock":
        return _locking_select(", ".join("s." + _q(f.column) for f in _SESSION_FIELDS))
    if name == "version":
        # The root node comes along (a missing one is the read's to report), saving a read one round
        # trip. LATERAL + LIMIT: a primary-key probe, never a scan of the project's nodes (which a
        # plain join was planned as; see store._PROBE_SQL).
        return (
            f"SELECT {', '.join('v.' + _q(f.column) for f in _VERSION_COLUMNS)}, n.codec, n.data, n.seal "
            f"FROM {version_table} AS v LEFT JOIN LATERAL (SELECT s.codec, s.data, s.seal "
            f"FROM {StateNode._meta.db_table} AS s WHERE s.project_id = %s AND s.digest = v.root LIMIT 1) AS n "
            "ON true WHERE v.session_id = %s AND v.number = %s"
        )
    # Version rows with the top levels of their trees, in one round trip, with binary results (node
    # bodies as bytes): json columns come as text, as Django's fields expect. Version rows have the
    # node columns NULL, node rows the version columns.
    columns = ", ".join(
        f"v.{_q(f.column)}::text AS {_q(f.column)}" if f.get_internal_type() == "JSONField" else f"v.{_q(f.column)}"
        for f in _VERSION_COLUMNS
    )
    node_at_root = (
        f"CROSS JOIN LATERAL (SELECT * FROM {StateNode._meta.db_table} AS s WHERE s.project_id = %(project)s "
        "AND s.digest = r.root LIMIT 1) AS n"
    )
    rows_of_both = (
        "SELECT v.*, NULL::bytea, NULL::smallint, NULL::bytea, NULL::bigint FROM v UNION ALL "
        f"SELECT {', '.join(['NULL'] * len(_VERSION_COLUMNS))}, digest, codec, data, seal FROM walk"
    )
    if name == "version_tree":
        # A whole read: the version and its tree's top store.READ_LEVELS levels.
        return (
            f"WITH RECURSIVE v AS (SELECT {columns} FROM {version_table} AS v "
            "WHERE v.session_id = %(session)s AND v.number = %(number)s), "
            "walk(digest, codec, data, seal, children, level) AS ("
            f"SELECT n.digest, n.codec, n.data, n.seal, n.children, 1 FROM v AS r {node_at_root} "
            f"UNION ALL {store.WALK_DOWN_SQL}) {rows_of_both}"
        )
    if name == "version_pair_tree":
        # A diff's two ends and, when their trees differ, the nodes below the roots that the two do
        # not share (store.DIFF_DOWN_SQL), as deep as the diff's first prefetch would go.
        return (
            f"WITH RECURSIVE v AS (SELECT {columns} FROM {version_table} AS v "
            "WHERE (v.session_id = %(session)s AND v.number = %(number)s) "
            "OR (v.session_id = %(other_session)s AND v.number = %(other_number)s)), "
            "walk(digest, codec, data, seal, children, level) AS ("
            f"SELECT n.digest, n.codec, n.data, n.seal, n.children, 1 FROM (SELECT DISTINCT root FROM v) AS r "
            f"{node_at_root} WHERE (SELECT count(DISTINCT root) FROM v) = 2 "
            f"UNION ALL {store.DIFF_DOWN_SQL}) {rows_of_both}"
        )
    raise KeyError(name)


@cache
def _session_fields(names: tuple[str, ...]) -> list[Field]:
    return [WorkflowSession._meta.get_field(name) for name in names]  # type: ignore[misc]


@cache
def _insert_sql(session_fields: tuple[str, ...]) -> str:
    version_table = Version._meta.db_table
    return (
        f"WITH moved AS (UPDATE {WorkflowSession._meta.db_table} "
        f"SET {', '.join(f'{_q(f.column)} = %s' for f in _session_fields(session_fields))} WHERE id = %s) "
        f"INSERT INTO {version_table} ({', '.join(_q(f.column) for f in _VERSION_FIELDS)}, parent_id) "
        f"VALUES ({', '.join(['%s'] * len(_VERSION_FIELDS))}, "
        f"(SELECT id FROM {version_table} WHERE session_id = %s AND number = %s)) RETURNING id, parent_id"
    )


def session_lock(session_id: Any) -> WorkflowSession | None:
    """Take the project's shared write lock and the session's row lock; the locked row, or None."""
    with connection.cursor() as cursor:
        cursor.execute(_sql("session_lock"), [session_id])
        row = cursor.fetchone()
    return None if row is None else _from_row(WorkflowSession, _SESSION_FIELDS, row)


def version_insert_after_head(version: Version, session: WorkflowSession, session_fields: list[str]) -> None:
    """Insert `version` with the session's current head (number `version.number - 1`) as its parent,
    and save `session_fields` of `session`, in one statement. Fills in version.pk and parent_id."""
    updated = _session_fields(tuple(session_fields))
    session_values = [f.get_db_prep_save(f.pre_save(session, False), connection) for f in updated]
    version_values = [f.get_db_prep_save(f.pre_save(version, True), connection) for f in _VERSION_FIELDS]
    with connection.cursor() as cursor:
        cursor.execute(
            _insert_sql(tuple(session_fields)),
            [*session_values, session.pk, *version_values, session.pk, version.number - 1],
        )
        version.pk, version.parent_id = cursor.fetchone()
    version._state.adding = False
    version._state.db = connection.alias


# What the one-statement write reads back of the session it moved (besides what the caller set):
# plain columns, so no model is built and no timestamp parsed for it.
_APPEND_RETURNS = ("head_number", "version_count", "stored_bytes", "logical_bytes", "status", "last_step", "last_error")


def batch_key_prefix(key: str) -> str:
    """What the keys a batch sent with idempotency key `key` gives its versions start with: derived (a
    hash: no truncation, and no plain key a client sends by hand names one); see batch_key."""
    return f"batch:{hashlib.sha256(key.encode()).hexdigest()[:40]}:"


def batch_key(key: str | None, index: int) -> str | None:
    """The key a batch sent with idempotency key `key` gives its `index`th version."""
    return None if key is None else f"{batch_key_prefix(key)}{index}"


@cache
def _append_sql(moves: tuple[str, ...]) -> str:
    """The whole of a snapshot write as one statement (see version_append_if_head)."""
    session_table = WorkflowSession._meta.db_table
    version_table = Version._meta.db_table
    removed_table = RemovedWrite._meta.db_table
    sets = [
        "head_number = head_number + 1", "version_count = version_count + 1",
        "stored_bytes = stored_bytes + (SELECT size FROM stored)",
        *(f"{_q(f.column)} = %s" for f in _session_fields(moves)),
    ]
    values = ["(SELECT size FROM stored)" if f.attname == "stored_size" else "%s" for f in _VERSION_FIELDS]
    return (
        # The locks session_lock takes. FOR UPDATE returns the row as last committed, so the checks
        # in `ok` see the head as it is now, not as the statement's snapshot had it.
        f"WITH locked AS ({_locking_select('s.id, s.head_number, s.archived_at')}), "
        "ok AS (SELECT id FROM locked WHERE head_number = %s AND archived_at IS NULL AND NOT EXISTS "
        f"(SELECT 1 FROM {version_table} AS v WHERE v.session_id = locked.id AND v.idempotency_key IN (%s, %s)) "
        # A key whose version a trim or retention removed: the full path refuses it (services._replay).
        f"AND NOT EXISTS (SELECT 1 FROM {removed_table} AS r WHERE r.session_id = locked.id "
        "AND r.idempotency_key IN (%s, %s))), "
        f"nodes AS ({store.NODE_INSERT_SQL} WHERE EXISTS (SELECT 1 FROM ok) "
        "ON CONFLICT DO NOTHING RETURNING length(data) AS size), "
        "stored AS (SELECT COALESCE(sum(size), 0) AS size FROM nodes), "
        f"moved AS (UPDATE {session_table} SET {', '.join(sets)} WHERE id = (SELECT id FROM ok) "
        f"RETURNING id, {', '.join(_q(f.column) for f in _session_fields(_APPEND_RETURNS))}), "
        f"inserted AS (INSERT INTO {version_table} ({', '.join(_q(f.column) for f in _VERSION_FIELDS)}, parent_id) "
        f"SELECT {', '.join(values)}, (SELECT id FROM {version_table} WHERE session_id = moved.id AND number = %s) "
        "FROM moved RETURNING id, parent_id, stored_size) "
        "SELECT inserted.id, inserted.parent_id, inserted.stored_size, moved.* FROM inserted, moved"
    )


def version_append_if_head(version: Version, head: int, nodes: store.NodeRows, moves: dict[str, Any]) -> bool:
    """If the session's head is still version `head` (and it is not archived, and no version has
    `version.idempotency_key`, nor the key a batch sent with it gave its first version, nor had one a
    trim or retention removed), insert `nodes` and `version` (number head + 1, parent the head,
    stored_size the bytes the nodes really added) and move the session: its counters, and `moves`.
    One statement; True if it wrote (`version.session` then shows the move: `moves`, the counters,
    and status and last step/error as they now are), False having written nothing. Callers must
    know `head`'s tree is stored: nothing here checks the nodes it names.
    """
    fields = _session_fields(tuple(moves))
    session_values = [f.get_db_prep_save(moves[f.attname], connection) for f in fields]
    version_values = [
        f.get_db_prep_save(f.pre_save(version, True), connection) for f in _VERSION_FIELDS if f.attname != "stored_size"
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            _append_sql(tuple(moves)),
            [version.session_id, head, *([version.idempotency_key, batch_key(version.idempotency_key, 0)] * 2),
             version.session.project_id, *nodes.arrays(),
             *session_values, *version_values, head],
        )
        row = cursor.fetchone()
    if row is None:
        return False
    version.pk, version.parent_id, version.stored_size = row[:3]
    version._state.adding = False
    version._state.db = connection.alias
    session = version.session
    for name, value in moves.items():
        setattr(session, name, value)
    for name, value in zip(_APPEND_RETURNS, row[4:], strict=True):
        setattr(session, name, value)
    return True


def version_by_number(session: WorkflowSession, number: int) -> Version | None:
    """The session's version `number` (None if it has none) with `session` attached; its root node
    goes into the store's node cache on the way."""
    with connection.cursor() as cursor:
        cursor.execute(_sql("version"), [session.project_id, session.pk, number])
        row = cursor.fetchone()
    if row is None:
        return None
    width = len(_VERSION_COLUMNS)
    version = _from_row(Version, _VERSION_COLUMNS, row[:width])
    version.session = session
    codec, data, seal = row[width:]
    if data is not None:
        store.remember_node(session.project_id, bytes(version.root), codec, bytes(data), seal)
    return version


def version_pair_tree(
    first: tuple[WorkflowSession, int], second: tuple[WorkflowSession, int]
) -> tuple[Version | None, Version | None, list[store.NodeRow]]:
    """Two versions, each (session, number), and the node rows a diff of them starts with (for
    selectors.version_diff's `prefetched`), in one round trip. The sessions must be of one project."""
    (session, number), (other_session, other_number) = first, second
    with connection.cursor() as cursor:
        store.binary_results(cursor)
        cursor.execute(_sql("version_pair_tree"), {
            "session": session.pk, "number": number, "other_session": other_session.pk,
            "other_number": other_number, "project": session.project_id, "levels": store.DIFF_LEVELS + 1,
        })
        found = cursor.fetchall()
    width = len(_VERSION_COLUMNS)
    by_key = {(row[_SESSION_COLUMN], row[_NUMBER_COLUMN]): row for row in found if row[0] is not None}
    versions: list[Version | None] = []
    for wanted_session, wanted_number in (first, second):
        row = by_key.get((wanted_session.pk, wanted_number))
        version = None if row is None else _from_row(Version, _VERSION_COLUMNS, row[:width])
        if version is not None:
            version.session = wanted_session
        versions.append(version)
    return versions[0], versions[1], [row[width:] for row in found if row[0] is None]


def version_with_tree(session: WorkflowSession, number: int) -> tuple[Version | None, list[store.NodeRow]]:
    """The session's version `number` (None if it has none) and the node rows of its tree's top
    levels (for store.read_stored's `prefetched`): a whole read in one round trip, not two."""
    with connection.cursor() as cursor:
        store.binary_results(cursor)
        cursor.execute(_sql("version_tree"), {
            "session": session.pk, "number": number, "project": session.project_id, "levels": store.READ_LEVELS + 1,
        })
        found = cursor.fetchall()
    width = len(_VERSION_COLUMNS)
    if not found or found[0][0] is None:
        return None, []
    version = _from_row(Version, _VERSION_COLUMNS, found[0][:width])
    version.session = session
    return version, [row[width:] for row in found[1:]]


def versions_link(versions: list[Version], batch: int = 1000) -> None:
    """Save the parent and created_at of `versions` (an import's, made with bulk_create): one
    UPDATE ... FROM (VALUES ...) per `batch` rows. Measured on an import of 4,000 versions: 0.2 s,
    where bulk_update's CASE WHEN statements took 2.8 s, a quarter of the whole import."""
    parent = Version._meta.get_field("parent")
    created_at = Version._meta.get_field("created_at")
    statement = (
        f"UPDATE {Version._meta.db_table} AS v SET {_q(parent.column)} = x.parent, {_q(created_at.column)} = x.created_at "
        "FROM (VALUES {rows}) AS x(id, parent, created_at) WHERE v.id = x.id"
    )
    with connection.cursor() as cursor:
        for start in range(0, len(versions), batch):
            chunk = versions[start : start + batch]
            cursor.execute(
                statement.format(rows=", ".join(["(%s::bigint, %s::bigint, %s::timestamptz)"] * len(chunk))),
                [value for v in chunk for value in (v.pk, v.parent_id, created_at.get_db_prep_save(v.created_at, connection))],
            )

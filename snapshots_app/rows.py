"""Raw SQL for the statements on the hot paths of writes and reads, for PostgreSQL.

Measured (200 KB agent states, `make bench`): the ORM spent ~3 ms of a ~10 ms write compiling and
running lock-session, fetch-head, insert-version and save-session, and 0.6 ms of a ~2 ms read
compiling the version lookup; these statements do the same work in a fraction of that. Columns and
value conversion still come from the models' own fields, so a new field needs no change here.
SQLite (the embedded default) keeps the ORM.
"""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.db.models import Field, Model

from sessions_app.models import WorkflowSession
from snapshots_app.models import Version
from snapshots_app.store import PROJECT_LOCK_CLASS

_SESSION_FIELDS: list[Field] = list(WorkflowSession._meta.concrete_fields)
_VERSION_COLUMNS: list[Field] = list(Version._meta.concrete_fields)
_VERSION_FIELDS: list[Field] = [f for f in _VERSION_COLUMNS if not f.primary_key and f.attname != "parent_id"]


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _from_row(model: type[Model], fields: list[Field], row: tuple[Any, ...]) -> Any:
    values = [
        field.from_db_value(value, None, connection) if hasattr(field, "from_db_value") else value  # type: ignore[attr-defined]
        for field, value in zip(fields, row, strict=True)
    ]
    return model.from_db(connection.alias, [f.attname for f in fields], values)


def session_lock(session_id: Any) -> WorkflowSession | None:
    """Take the project's shared write lock and the session's row lock; the locked row, or None."""
    table = WorkflowSession._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join('s.' + _q(f.column) for f in _SESSION_FIELDS)} FROM {table} AS s "
            f"CROSS JOIN LATERAL (SELECT pg_advisory_xact_lock_shared({PROJECT_LOCK_CLASS}, s.project_id::integer)) AS l "
            "WHERE s.id = %s FOR UPDATE OF s",
            [session_id],
        )
        row = cursor.fetchone()
    return None if row is None else _from_row(WorkflowSession, _SESSION_FIELDS, row)


def version_insert_after_head(version: Version, session: WorkflowSession, session_fields: list[str]) -> None:
    """Insert `version` with the session's current head (number `version.number - 1`) as its parent,
    and save `session_fields` of `session`, in one statement. Fills in version.pk and parent_id."""
    version_table = Version._meta.db_table
    session_table = WorkflowSession._meta.db_table
    updated = [WorkflowSession._meta.get_field(name) for name in session_fields]
    session_values = [f.get_db_prep_save(f.pre_save(session, False), connection) for f in updated]
    version_values = [f.get_db_prep_save(f.pre_save(version, True), connection) for f in _VERSION_FIELDS]
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH moved AS (UPDATE {session_table} SET {', '.join(f'{_q(f.column)} = %s' for f in updated)} "
            "WHERE id = %s) "
            f"INSERT INTO {version_table} ({', '.join(_q(f.column) for f in _VERSION_FIELDS)}, parent_id) "
            f"VALUES ({', '.join(['%s'] * len(_VERSION_FIELDS))}, "
            f"(SELECT id FROM {version_table} WHERE session_id = %s AND number = %s)) RETURNING id, parent_id",
            [*session_values, session.pk, *version_values, session.pk, version.number - 1],
        )
        version.pk, version.parent_id = cursor.fetchone()
    version._state.adding = False
    version._state.db = connection.alias


def versions_by_number(session: WorkflowSession, numbers: list[int]) -> dict[int, Version]:
    """The session's versions with these numbers (those that exist), each with `session` attached."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(_q(f.column) for f in _VERSION_COLUMNS)} FROM {Version._meta.db_table} "
            "WHERE session_id = %s AND number = ANY(%s)",
            [session.pk, numbers],
        )
        found = [_from_row(Version, _VERSION_COLUMNS, row) for row in cursor.fetchall()]
    for version in found:
        version.session = session
    return {version.number: version for version in found}

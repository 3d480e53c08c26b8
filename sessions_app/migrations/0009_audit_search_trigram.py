"""Trigram indexes for the admin's free-text search of the audit log (AuditEventAdmin.search_fields):
a substring of an actor, a reason or an id read every event (1.65 s at 300,000 events); with one
index per searched column PostgreSQL combines them (BitmapOr) and reads only the events that have
the term's trigrams. PostgreSQL only, as 0002: the embedded SQLite default scans, fine at its scale.
The expressions are what Django's icontains compiles to: UPPER(col::text) LIKE UPPER(...)."""

from django.db import migrations

INDEXES = {
    "audit_target_id_trgm": "target_id",
    "audit_actor_label_trgm": "actor_label",
    "audit_reason_trgm": "reason",
    "audit_session_id_trgm": "session_id",
}


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, column in INDEXES.items():
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON sessions_app_auditevent "
            f"USING gin ((UPPER({column}::text)) gin_trgm_ops)"
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


class Migration(migrations.Migration):
    # CONCURRENTLY (outside a transaction): built on a large audit table, a plain CREATE INDEX blocked
    # every audited action until the four indexes were done.
    atomic = False
    dependencies = [("sessions_app", "0008_apikey_expires_at")]

    operations = [migrations.RunPython(create, drop)]

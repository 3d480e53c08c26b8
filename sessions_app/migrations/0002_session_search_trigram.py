"""Trigram indexes so the dashboard's substring search (icontains on external id / workflow) stays
fast with millions of sessions. PostgreSQL only: the embedded SQLite default scans, which is fine
at its scale. The expressions match what Django's icontains compiles to: UPPER(col::text) LIKE."""

from django.db import migrations

INDEXES = {
    "session_external_id_trgm": "external_id",
    "session_workflow_trgm": "workflow",
}


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, column in INDEXES.items():
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON sessions_app_workflowsession "
            f"USING gin ((UPPER({column}::text)) gin_trgm_ops)"
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [("sessions_app", "0001_initial")]

    operations = [migrations.RunPython(create, drop)]

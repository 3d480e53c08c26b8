"""A trigram index on the session name an audit event recorded (details->>'external_id'), for the
admin's search of the log by a session's name (AuditEventAdmin.get_search_results): beside 0009's,
so the search stays a BitmapOr of indexes. PostgreSQL only, as 0009. The expression is what Django's
icontains on the key compiles to: UPPER(details ->> 'external_id') LIKE UPPER(...)."""

from django.db import migrations

NAME = "audit_external_id_trgm"


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    schema_editor.execute(
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {NAME} ON sessions_app_auditevent "
        "USING gin ((UPPER(details ->> 'external_id')) gin_trgm_ops)"
    )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NAME}")


class Migration(migrations.Migration):
    atomic = False  # CONCURRENTLY, as 0009: audited actions go on while it builds
    dependencies = [("sessions_app", "0014_session_tagged")]

    operations = [migrations.RunPython(create, drop)]

"""The audit log's own index on project_id goes: audit_project_created (project, -created_at) serves
every lookup by project (the cascade of a project's deletion included), so it only cost a write
per audited action and its space.

Dropped CONCURRENTLY on PostgreSQL, and the foreign key left as it is: Django's AlterField drops the
constraint and adds it back, which validates the whole log while holding off every audited action."""

from django.db import migrations, models


def _project_indexes(schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "sessions_app_auditevent")
    return [name for name, facts in constraints.items()
            if facts["index"] and facts["columns"] == ["project_id"] and not facts["primary_key"]
            and not facts["unique"] and not facts["foreign_key"]]


def _concurrently(schema_editor):
    return "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""


def drop_index(apps, schema_editor):
    for name in _project_indexes(schema_editor):
        schema_editor.execute(f"DROP INDEX {_concurrently(schema_editor)}IF EXISTS {schema_editor.quote_name(name)}")


def create_index(apps, schema_editor):
    if not _project_indexes(schema_editor):
        name = schema_editor._create_index_name("sessions_app_auditevent", ["project_id"])
        schema_editor.execute(f"CREATE INDEX {_concurrently(schema_editor)}{schema_editor.quote_name(name)} "
                              "ON sessions_app_auditevent (project_id)")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sessions_app", "0012_audit_session_trim"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="auditevent",
                    name="project",
                    field=models.ForeignKey(db_index=False, on_delete=models.deletion.CASCADE,
                                            related_name="audit_events", to="sessions_app.project"),
                ),
            ],
            database_operations=[migrations.RunPython(drop_index, create_index)],
        ),
    ]

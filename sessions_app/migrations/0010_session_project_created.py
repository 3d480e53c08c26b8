"""The session list sorted by creation ("Newest", the API's ?ordering=created_at) reads a page from
an index (see WorkflowSession.Meta.indexes) instead of sorting every session of the project.

Built CONCURRENTLY on PostgreSQL: sessions are written on every snapshot, which a plain CREATE INDEX
blocked until it was done. The embedded SQLite default builds it as usual."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models
from django.db.migrations.operations import AddIndex


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            AddIndex.database_backwards(self, app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sessions_app", "0009_audit_search_trigram"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="workflowsession",
            index=models.Index(fields=["project", "-created_at", "-id"], name="session_project_created"),
        ),
    ]

"""The session list sorted by creation ("Newest", the API's ?ordering=created_at) reads a page from
an index (see WorkflowSession.Meta.indexes) instead of sorting every session of the project.

Built CONCURRENTLY on PostgreSQL: sessions are written on every snapshot, which a plain CREATE INDEX
blocked until it was done. The embedded SQLite default builds it as usual."""

from django.db import migrations, models

from config.migration_operations import AddIndexConcurrentlyOnPostgres


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

"""A GIN index on sessions' tags (see WorkflowSession.Meta.indexes): the tag filter read every
session of the project.

Built CONCURRENTLY on PostgreSQL, so writes go on while it builds (every snapshot moves its session).
Not on the embedded SQLite default, which has no GIN and scans."""

import django.contrib.postgres.indexes
from django.db import migrations

from config.migration_operations import AddPostgresIndexConcurrently


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sessions_app", "0013_audit_project_index_dropped"),
    ]

    operations = [
        AddPostgresIndexConcurrently(
            model_name="workflowsession",
            index=django.contrib.postgres.indexes.GinIndex(
                fields=["tags"], name="session_tagged", opclasses=["jsonb_path_ops"]
            ),
        ),
    ]

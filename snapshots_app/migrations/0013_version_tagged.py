"""A GIN index on versions' tags (see Version.Meta.indexes): the API's `tag` filter read the whole
versions table on every lookup, and the LangGraph saver makes one per get_tuple.

Built CONCURRENTLY on PostgreSQL, so snapshot writes go on while it builds. Not on the embedded SQLite
default, which has no GIN and scans."""

import django.contrib.postgres.indexes
from django.db import migrations

from config.migration_operations import AddPostgresIndexConcurrently


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("snapshots_app", "0012_version_timeline_filters"),
    ]

    operations = [
        AddPostgresIndexConcurrently(
            model_name="version",
            index=django.contrib.postgres.indexes.GinIndex(
                fields=["tags"], name="version_tagged", opclasses=["jsonb_path_ops"]
            ),
        ),
    ]

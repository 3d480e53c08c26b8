"""Partial indexes for the timeline's filters (versions with an error, pinned, labelled, of an
operator's kind): a filtered page reads only the versions it shows (see Version.Meta.indexes).

Built CONCURRENTLY on PostgreSQL: the versions table is the largest, and a plain CREATE INDEX there
blocked every snapshot write until the four were done. The embedded SQLite default builds them as usual."""

from django.db import migrations, models

from config.migration_operations import AddIndexConcurrentlyOnPostgres


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("snapshots_app", "0011_job_project_created"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="version",
            index=models.Index(condition=~models.Q(error=""), fields=["session", "number"], name="version_with_error"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="version",
            index=models.Index(condition=models.Q(pinned=True), fields=["session", "number"], name="version_pinned"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="version",
            index=models.Index(condition=~models.Q(label=""), fields=["session", "number"], name="version_labelled"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="version",
            index=models.Index(condition=models.Q(kind__in=("rewind", "fork", "data_fix")),
                               fields=["session", "kind", "number"], name="version_operator_kind"),
        ),
    ]

"""The audit log by time across projects and by action (see AuditEvent.Meta.indexes): the admin's
date filters and sort by date, its and the API's filter by action, and the API's list across a
member's projects read the events they show instead of walking or sorting the whole log.

Built CONCURRENTLY on PostgreSQL: a plain CREATE INDEX on a log of millions blocked every audited
action until it was done. The embedded SQLite default builds them as usual."""

from django.db import migrations, models

from config.migration_operations import AddIndexConcurrentlyOnPostgres


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sessions_app", "0010_session_project_created"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="auditevent",
            index=models.Index(fields=["-created_at", "-id"], name="audit_created"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="auditevent",
            index=models.Index(fields=["action", "project", "-created_at"], name="audit_action"),
        ),
    ]

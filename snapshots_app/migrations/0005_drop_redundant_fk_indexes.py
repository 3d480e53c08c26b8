"""Versions lose the index Django gives the session foreign key: version_unique_number
(session, number) leads with the session and serves every lookup by it, so the extra index only
cost a b-tree insert per write and its pages in storage. Only the index goes; the foreign key
constraint stays as it is (AlterField would drop it and validate it again over the whole table)."""

import django.db.models.deletion
from django.db import migrations, models

INDEX = "snapshots_app_version_session_id_02b9c431"


class Migration(migrations.Migration):
    dependencies = [("snapshots_app", "0004_statenode_children_seal")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{INDEX}"',
                    f'CREATE INDEX IF NOT EXISTS "{INDEX}" ON "snapshots_app_version" ("session_id")',
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="version",
                    name="session",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="versions",
                        to="sessions_app.workflowsession",
                    ),
                ),
            ],
        ),
    ]

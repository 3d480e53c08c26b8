"""Sessions lose the index Django gives the project foreign key: session_unique_external_id
(project, external_id) leads with the project and serves every lookup by it. Only the index goes;
the foreign key constraint stays as it is (AlterField would drop it and validate it again over the
whole table)."""

import django.db.models.deletion
from django.db import migrations, models

INDEX = "sessions_app_workflowsession_project_id_6fd3fc81"


class Migration(migrations.Migration):
    dependencies = [("sessions_app", "0002_session_search_trigram")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{INDEX}"',
                    f'CREATE INDEX IF NOT EXISTS "{INDEX}" ON "sessions_app_workflowsession" ("project_id")',
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="workflowsession",
                    name="project",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="sessions",
                        to="sessions_app.project",
                    ),
                ),
            ],
        ),
    ]

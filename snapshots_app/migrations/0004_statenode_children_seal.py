"""Nodes get their child digests bare (so PostgreSQL can walk a tree in one statement) and a seal
(for checking one node alone). Existing nodes are filled in from their encodings."""

from django.db import migrations, models


def fill(apps, schema_editor):
    from snapshots_app import store, tree

    StateNode = apps.get_model("snapshots_app", "StateNode")
    table = StateNode._meta.db_table
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT project_id, digest, codec, data FROM {table} WHERE seal IS NULL")
        rows = cursor.fetchall()
    for project_id, digest, codec, data in rows:
        raw = store.decompress(codec, bytes(data))
        StateNode.objects.filter(project_id=project_id, digest=digest).update(
            children=tree.children_of(raw), seal=tree.seal_of(raw)
        )


class Migration(migrations.Migration):

    dependencies = [
        ("snapshots_app", "0003_compression_dictionary"),
    ]

    operations = [
        migrations.AddField(model_name="statenode", name="children", field=models.BinaryField(default=b"")),
        migrations.AddField(model_name="statenode", name="seal", field=models.BigIntegerField(null=True)),
        migrations.RunPython(fill, migrations.RunPython.noop),
        migrations.AlterField(model_name="statenode", name="seal", field=models.BigIntegerField()),
    ]

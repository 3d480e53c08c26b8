"""Nodes get their child digests bare (for one-statement tree walks) and a seal (for checking one
node alone). Existing nodes are filled in from their encodings."""

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


# One round trip for a whole tree, or for the part of two trees a diff needs: breadth first, level by
# level, each level's nodes probed by primary key. With `p_b` given, a child is followed only if the
# other tree has no such child at the same depth, so subtrees the two share are never visited.
# (A shared subtree at another depth is fetched needlessly, never missed: callers fall back to
# fetching whatever a walk did not bring.) `p_data` = false leaves out the node bodies.
WALK_SQL = """
CREATE OR REPLACE FUNCTION rewind_walk(p_project bigint, p_a bytea[], p_b bytea[], p_data boolean)
RETURNS TABLE (node_digest bytea, node_codec smallint, node_data bytea, node_children bytea, node_seal bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    fa bytea[] := p_a;
    fb bytea[] := p_b;
    ca bytea[];
    cb bytea[];
    seen bytea[] := '{}';
    r record;
BEGIN
    WHILE cardinality(fa) > 0 OR cardinality(fb) > 0 LOOP
        ca := '{}';
        cb := '{}';
        FOR r IN
            SELECT w.side, n.digest, n.codec, CASE WHEN p_data THEN n.data END AS data, n.children, n.seal
            FROM (SELECT DISTINCT ON (u.d) u.d, u.side
                  FROM (SELECT x AS d, 0 AS side FROM unnest(fa) AS x
                        UNION ALL SELECT x, 1 FROM unnest(fb) AS x) AS u) AS w
            CROSS JOIN LATERAL (
                SELECT s.digest, s.codec, s.data, s.children, s.seal FROM snapshots_app_statenode AS s
                WHERE s.project_id = p_project AND s.digest = w.d LIMIT 1
            ) AS n
        LOOP
            node_digest := r.digest;
            node_codec := r.codec;
            node_data := r.data;
            node_children := r.children;
            node_seal := r.seal;
            RETURN NEXT;
            IF length(r.children) > 0 THEN
                IF r.side = 0 THEN
                    ca := ca || ARRAY(SELECT substring(r.children FROM i * 16 + 1 FOR 16)
                                      FROM generate_series(0, length(r.children) / 16 - 1) AS i);
                ELSE
                    cb := cb || ARRAY(SELECT substring(r.children FROM i * 16 + 1 FOR 16)
                                      FROM generate_series(0, length(r.children) / 16 - 1) AS i);
                END IF;
            END IF;
        END LOOP;
        seen := seen || fa || fb;
        fa := ARRAY(SELECT DISTINCT x FROM unnest(ca) AS x WHERE x <> ALL(cb) AND x <> ALL(seen));
        fb := ARRAY(SELECT DISTINCT x FROM unnest(cb) AS x WHERE x <> ALL(ca) AND x <> ALL(seen));
    END LOOP;
END
$$;
"""


def create_walk(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(WALK_SQL)


def drop_walk(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS rewind_walk(bigint, bytea[], bytea[], boolean)")


class Migration(migrations.Migration):

    dependencies = [
        ("snapshots_app", "0003_compression_dictionary"),
    ]

    operations = [
        migrations.AddField(model_name="statenode", name="children", field=models.BinaryField(default=b"")),
        migrations.AddField(model_name="statenode", name="seal", field=models.BigIntegerField(null=True)),
        migrations.RunPython(fill, migrations.RunPython.noop),
        migrations.AlterField(model_name="statenode", name="seal", field=models.BigIntegerField()),
        migrations.RunPython(create_walk, drop_walk),
    ]

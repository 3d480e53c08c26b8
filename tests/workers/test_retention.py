"""Retention rules and garbage collection, run in-process (the worker tests run the same code in Celery)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from sessions_app.models import AuditEvent
from sessions_app.selectors import removed_numbers
from sessions_app.services import session_delete
from snapshots_app import compaction
from snapshots_app.compaction import compaction_dry_run, compaction_run, retention_policy_get, retention_policy_set
from snapshots_app.models import Job, JobKind, JobStatus, StateNode, Version
from snapshots_app.services import snapshot_fork, snapshot_record, snapshot_rewind, version_label, version_pin
from tests.factories import make_session
from tests.workers.builders import bulky_state, midnight, read_all, record_history


def _numbers(session) -> list[int]:
    return sorted(Version.objects.filter(session=session).values_list("number", flat=True))


def _version(session, number: int) -> Version:
    return Version.objects.select_related("session").get(session=session, number=number)


@pytest.mark.django_db
def test_policy_keeps_newest_protected_and_one_per_day_and_never_renumbers(project, user):
    now = timezone.now()
    session = record_history(project, "run-a", 48, start=midnight(10), every=timedelta(hours=1))
    version_pin(version=_version(session, 5), pinned=True)
    version_label(version=_version(session, 7), label="known good")
    Version.objects.filter(session=session, number=9).update(error="tool call failed")
    snapshot_rewind(session=session, to_version=12, reason="retry from 12", actor=user)  # v49, parent v12
    fork = snapshot_fork(session=session, from_version=15, reason="try another prompt", actor=user)
    retention_policy_set(project=project, enabled=True, keep_last=3, keep_days=2, thin_to="day", actor=user)
    before = read_all(project)

    preview = compaction_dry_run(project=project, now=now)
    result = compaction_run(project=project, now=now)

    kept = [5, 7, 9, 12, 15, 47, 48, 49]  # protected ones fill day 1; keep_last 47-49 fill day 2
    assert _numbers(session) == kept
    assert preview.versions_removed == result["versions_removed"] == 48 + 1 - len(kept)
    assert preview.removed_numbers[str(session.pk)] == [n for n in range(1, 49) if n not in kept]
    assert _numbers(fork) == [1]
    after = read_all(project)
    assert after == {key: data for key, data in before.items() if key in after}  # survivors read back exactly
    session.refresh_from_db()
    assert session.version_count == len(kept) and session.head_number == 49
    # Lineage stays connected through removed versions: 47's parent 46 went, so it points at 15.
    assert _version(session, 47).parent.number == 15
    assert _version(session, 49).parent.number == 12
    assert _version(fork, 1).parent_id == _version(session, 15).pk
    assert result["bytes_after"] < result["bytes_before"]
    assert abs(preview.bytes_freed - result["bytes_freed"]) <= 0.02 * preview.bytes_freed
    assert preview.nodes_freed == result["nodes_freed"] > 0
    # A second run finds nothing left to do.
    again = compaction_run(project=project, now=now)
    assert again["versions_removed"] == 0 and again["nodes_freed"] == 0


@pytest.mark.django_db
def test_a_version_pinned_while_retention_runs_is_kept_and_not_reported_removed(project, user):
    """Retention re-checks each session under its lock: a version pinned after the run planned (while it
    worked through earlier sessions) stays. The job's result still listed it as removed."""
    first = record_history(project, "run-a", 8, start=midnight(10), every=timedelta(hours=1))
    second = record_history(project, "run-b", 8, start=midnight(10), every=timedelta(hours=1))
    retention_policy_set(project=project, enabled=True, keep_last=3, keep_days=0, thin_to="none", actor=user)
    calls: list[int] = []

    def progress(done, total=None, force=False):
        if not calls:  # the plan is made; no session is touched yet
            for session in (first, second):
                version_pin(version=_version(session, 2), pinned=True)
        calls.append(done)

    result = compaction_run(project=project, progress=progress)
    for session in (first, second):
        assert _numbers(session) == [2, 6, 7, 8]
        assert result["removed_numbers"][str(session.pk)] == [1, 3, 4, 5]
        event = AuditEvent.objects.get(session_id=session.pk, action="retention.remove")
        assert removed_numbers(event.details) == [1, 3, 4, 5]
    assert result["versions_removed"] == 8 and result["versions_after"] == 8


@pytest.mark.django_db
def test_a_version_whose_parent_retention_removed_is_summarised_against_its_new_parent(
    project, eager, django_capture_on_commit_callbacks
):
    """Its summary told what changed since the removed parent: the timeline showed it under another
    version, and its counts and paths were not those of the diff its row links to."""
    from snapshots_app.selectors import version_diff
    from snapshots_app.tasks import finalize_versions

    session = make_session(project, "run-a")
    for step in range(1, 49):  # a history that grows by a message a step, an hour apart
        version = snapshot_record(session=session, state={"step": step, "messages": [f"m{n}" for n in range(step)]})
        Version.objects.filter(pk=version.pk).update(created_at=midnight(10) + timedelta(hours=step - 1))
    finalize_versions(list(Version.objects.filter(session=session).values_list("id", flat=True)))
    retention_policy_set(project=project, enabled=True, keep_last=3, keep_days=2, thin_to="day")

    with django_capture_on_commit_callbacks(execute=True):
        compaction_run(project=project, now=timezone.now())

    survivors = list(Version.objects.filter(session=session, parent__isnull=False).select_related("parent", "session"))
    relinked = [version for version in survivors if version.parent.number != version.number - 1]
    assert relinked, "the policy removed no version's parent"
    for version in survivors:
        expected = version_diff(version.parent, version)
        assert version.summary is not None, f"v{version.number} has no summary"
        assert {key: version.summary[key] for key in expected.counts} == expected.counts, f"v{version.number}"
        assert version.summary["total_paths"] == len({c.get("string_path", c["path"]) for c in expected.changes})
        assert version.summary["bytes_added"] == version.logical_size - version.parent.logical_size


@pytest.mark.django_db
@pytest.mark.parametrize("recompress", [True, False], ids=["recompress", "no-recompress"])
def test_compaction_progress_only_goes_forward_to_its_end(project, recompress):
    """Retention, collection and re-encoding report on one scale: the job's percentage went back from
    100 to a few when the collection found its work, and again when re-encoding did."""
    record_history(project, "run-a", 30)
    session_delete(session=record_history(project, "gone", 5), reason="garbage to collect")
    retention_policy_set(project=project, enabled=True, keep_last=3, keep_days=0, thin_to="none")
    reports: list[tuple[int, int]] = []
    total = 0

    def progress(done: int, total_now: int | None = None, *, force: bool = False) -> None:
        nonlocal total
        total = total_now if total_now is not None else total
        reports.append((done, total))

    result = compaction_run(project=project, recompress=recompress, progress=progress)

    assert result["versions_removed"] > 0 and result["nodes_freed"] > 0
    assert len({total for _, total in reports}) == 1  # known from the start
    fractions = [done / total for done, total in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(set(fractions)) > 3  # it moved on through the phases, not only at the end


@pytest.mark.django_db
def test_hourly_thinning_keeps_the_newest_version_of_each_hour(project):
    session = record_history(project, "run-h", 12, start=midnight(5), every=timedelta(minutes=20), notes=1)
    retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=1, thin_to="hour")
    compaction_run(project=project)
    # Three versions per hour (0:00, 0:20, 0:40 ...): the newest of each hour stays.
    assert _numbers(session) == [3, 6, 9, 12]


@pytest.mark.django_db
def test_no_policy_keeps_every_version(project):
    session = record_history(project, "run-n", 6, notes=1)
    assert not retention_policy_get(project=project).enabled
    result = compaction_run(project=project)
    assert result["versions_removed"] == 0 and _numbers(session) == [1, 2, 3, 4, 5, 6]


@pytest.mark.django_db
def test_policy_change_is_validated_and_audited(project, user):
    from sessions_app.errors import InvalidState
    from sessions_app.models import AuditEvent

    with pytest.raises(InvalidState):
        retention_policy_set(project=project, enabled=True, keep_last=-1, keep_days=1, thin_to="day")
    with pytest.raises(InvalidState):
        retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=1, thin_to="week")
    retention_policy_set(project=project, enabled=True, keep_last=10, keep_days=3, thin_to="hour", actor=user)
    event = AuditEvent.objects.get(project=project, action="retention.policy")
    assert event.actor == user and event.details["after"]["keep_last"] == 10


@pytest.mark.django_db(transaction=True)
def test_gc_keeps_nodes_that_a_version_written_after_the_mark_reuses(project):
    session = record_history(project, "run-r", 5)
    retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    forced_calls = []

    def progress(done: int, total: int | None = None, *, force: bool = False) -> None:
        if force and total is not None:
            forced_calls.append(total)
            if len(forced_calls) == 2:
                # Between the mark and the sweep, a writer stores v2's state again: its nodes are
                # still there, so the writer reuses them instead of inserting them.
                snapshot_record(session=session, state=bulky_state("run-r", 2), step="again")

    result = compaction_run(project=project, progress=progress)

    assert result["versions_removed"] == 4
    assert _numbers(session) == [5, 6]
    assert read_all(project)[("run-r", 6)] == _canonical(bulky_state("run-r", 2))
    assert compaction_dry_run(project=project, apply_retention=False).nodes_freed == 0


def _canonical(state: dict) -> bytes:
    from snapshots_app import canonical

    return canonical.dumps(state)


@pytest.mark.django_db(transaction=True)
def test_deleting_a_session_frees_what_only_it_needed(project, user, eager):
    keep = record_history(project, "keep", 3)
    gone = record_history(project, "gone", 3)
    nodes_before = StateNode.objects.filter(project=project).count()

    session_delete(session=gone, reason="customer asked", actor=user)  # queues a GC, which runs as it is sent

    job = Job.objects.get(project=project, kind=JobKind.GC)
    assert job.status == JobStatus.DONE and job.result["nodes_freed"] > 0
    assert StateNode.objects.filter(project=project).count() == nodes_before - job.result["nodes_freed"]
    assert set(read_all(project)) == {("keep", 1), ("keep", 2), ("keep", 3)} and keep.pk
    assert compaction.compaction_run(project=project, apply_retention=False)["nodes_freed"] == 0


@pytest.mark.django_db
def test_maintenance_command_runs_compaction_on_demand(project):
    import json
    from io import StringIO

    from django.core.management import call_command

    session = record_history(project, "run-m", 6, notes=1)
    retention_policy_set(project=project, enabled=True, keep_last=2, keep_days=0, thin_to="none")
    out = StringIO()
    call_command("maintenance", "dry-run", project.slug, stdout=out)
    assert json.loads(out.getvalue())["versions_removed"] == 4
    out = StringIO()
    call_command("maintenance", "compact", project.slug, stdout=out)
    assert json.loads(out.getvalue())["versions_removed"] == 4
    assert _numbers(session) == [5, 6]
    removal = AuditEvent.objects.get(action="retention.remove")
    assert (removal.session_id, removal.actor_label, removed_numbers(removal.details)) == (session.pk, "manage.py", [1, 2, 3, 4])
    assert removal.details["policy"] == {"keep_last": 2, "keep_days": 0, "thin_to": "none"}


@pytest.mark.django_db
def test_recompression_with_a_project_dictionary_shrinks_storage_and_reads_stay_exact(
    project, settings, tmp_path, monkeypatch
):
    from pathlib import Path

    from snapshots_app import store, tree

    # Many small nodes (each subtree over INLINE_MAX its own node): what a dictionary helps most.
    monkeypatch.setattr(tree, "SPLIT_MIN", tree.INLINE_MAX)
    monkeypatch.setattr(tree, "RUN_LEAF_MAX", 0)
    from snapshots_app.models import CompressionDictionary
    from snapshots_app.transfer import transfer_export_run, transfer_import_run
    from tests.factories import make_project

    for index in range(3):
        record_history(project, f"run-z{index}", 30, notes=3)
    before = read_all(project)

    result = compaction_run(project=project, apply_retention=False)

    assert CompressionDictionary.objects.filter(project=project).count() == 1
    assert result["nodes_recompressed"] > 200
    assert result["bytes_saved_by_recompression"] > 0.2 * result["bytes_before"]
    assert result["bytes_after"] == result["bytes_before"] - result["bytes_saved_by_recompression"]
    assert StateNode.objects.filter(project=project, codec=store.CODEC_ZSTD_DICT).count() == result["nodes_recompressed"]
    store.node_lru.clear()
    assert read_all(project) == before
    # Idempotent: a second run reuses the dictionary and finds nothing left to re-encode.
    again = compaction_run(project=project, apply_retention=False)
    assert again["nodes_recompressed"] == 0 and CompressionDictionary.objects.filter(project=project).count() == 1
    # Exports decode re-encoded nodes like any others.
    settings.VAR_DIR = tmp_path
    copy = make_project("copy")
    transfer_import_run(project=copy, path=Path(transfer_export_run(project=project)["path"]))
    assert read_all(copy) == before


@pytest.mark.django_db
def test_a_rewind_and_its_target_survive_every_run(project, user):
    session = record_history(project, "run-r", 20, start=midnight(3))
    rewind = snapshot_rewind(session=session, to_version=7, reason="back to 7", actor=user)  # v21
    for step in range(3):  # v22..v24: the rewind is no longer the head
        snapshot_record(session=session, state=bulky_state("run-r", 100 + step))
    retention_policy_set(project=project, enabled=True, keep_last=2, keep_days=0, thin_to="day", actor=user)

    for _ in range(2):  # the second run must not find the target unprotected
        compaction_run(project=project)
        assert {7, 21} <= set(_numbers(session))
    assert _version(session, rewind.number).parent.number == 7


@pytest.mark.django_db
def test_a_damaged_node_does_not_stop_compaction(project, settings):
    from django.db import connection

    from snapshots_app import store, tree

    settings.COMPACTION_RECOMPRESS = True
    session = record_history(project, "run-d", 12, start=midnight(3))
    head = Version.objects.get(session=session, number=12)
    victim = next(iter(tree.reachable([bytes(head.root)], store.ProjectStore(project.pk, use_cache=False).nodes)
                       - {bytes(head.root)}))
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE snapshots_app_statenode SET data = overlay(data placing '\\xff'::bytea from 20 for 1) "
            "WHERE project_id = %s AND digest = %s",
            [project.pk, victim],
        )
    damaged = bytes(StateNode.objects.get(project=project, digest=victim).data)
    retention_policy_set(project=project, enabled=True, keep_last=2, keep_days=0, thin_to="none")
    store.node_lru.clear()

    preview = compaction_dry_run(project=project)
    result = compaction_run(project=project)

    assert preview.versions_removed == result["versions_removed"] == 10
    assert result["nodes_freed"] > 0
    assert _numbers(session) == [11, 12]
    # Left as it is (never repaired or re-encoded silently), for the scrub to report.
    assert bytes(StateNode.objects.get(project=project, digest=victim).data) == damaged


@pytest.mark.django_db
def test_a_session_tagged_keep_all_keeps_every_version(project):
    from sessions_app.services import session_update

    kept = record_history(project, "run-k", 6, start=midnight(3))
    session_update(session=kept, tags=[compaction.KEEP_ALL_TAG])
    thinned = record_history(project, "run-t", 6, start=midnight(3))
    retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    compaction_run(project=project)
    assert _numbers(kept) == [1, 2, 3, 4, 5, 6] and _numbers(thinned) == [6]


@pytest.mark.django_db
def test_an_archived_session_keeps_its_whole_history(project, user):
    """Archiving "keeps the whole history" (its confirm page says so; pins and labels, which would
    protect versions, are refused while it lasts), yet the next compaction thinned it as any other."""
    from sessions_app.services import session_archive, session_unarchive

    archived = record_history(project, "run-archived", 6, start=midnight(3))
    session_archive(session=archived, reason="kept as the incident's record", actor=user)
    thinned = record_history(project, "run-live", 6, start=midnight(3))
    retention_policy_set(project=project, enabled=True, keep_last=1, keep_days=0, thin_to="none")

    preview = compaction_dry_run(project=project)
    result = compaction_run(project=project)

    assert _numbers(archived) == [1, 2, 3, 4, 5, 6] and _numbers(thinned) == [6]
    assert preview.versions_removed == result["versions_removed"] == 5
    assert str(archived.pk) not in preview.removed_numbers
    assert not AuditEvent.objects.filter(action="retention.remove", session_id=archived.pk).exists()
    # Archived after a run planned its removals, before it removes them: kept too.
    late = record_history(project, "run-late", 3, start=midnight(3))
    plan = compaction.retention_plan(project=project)
    session_archive(session=late, actor=user)
    assert compaction._retention_apply_session(project.pk, late.pk, plan.remove[late.pk],
                                               retention_policy_get(project=project), compaction._Remover()) == []
    assert _numbers(late) == [1, 2, 3]
    session_unarchive(session=archived, actor=user)  # back under the policy
    compaction_run(project=project)
    assert _numbers(archived) == [6]


@pytest.mark.django_db
def test_a_trim_over_a_cycle_of_parents_already_stored_ends_and_leaves_no_parent(project, user):
    """An import took versions that were each other's parents (it refuses them now): a trim or
    retention run over them looped for good in remove_versions, holding the session's lock."""
    import signal

    from snapshots_app.services import session_trim

    session = make_session(project, "looped")
    for step in range(4):
        snapshot_record(session=session, state={"step": step})
    two, three = _version(session, 2), _version(session, 3)
    Version.objects.filter(pk=two.pk).update(parent=three)  # 2 -> 3 -> 2, and 4 -> 3
    session.refresh_from_db()

    def stuck(*_):
        raise TimeoutError("the trim is still walking parents after 10 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    try:
        outcome = session_trim(session=session, keep=[1, 4], reason="tidy", actor=user)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    assert outcome.removed == [2, 3]
    assert _numbers(session) == [1, 4]
    assert _version(session, 4).parent is None

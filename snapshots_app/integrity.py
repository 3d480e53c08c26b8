"""Integrity scrub: re-read stored versions from the database alone and record every failure.

The scrub never repairs anything: a failure becomes an IntegrityProblem row (shown in the admin
and on the session page) for a person to look at. With a budget it verifies a rolling window of
versions per run, continuing where the previous scrub of the same scope stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from sessions_app import errors, events
from sessions_app.models import Project, WorkflowSession
from sessions_app.selectors import number_runs
from sessions_app.services import RequestKey, User, audit_record, require_reason
from snapshots_app import jobs, store
from snapshots_app.compaction import ProgressFn, _no_progress
from snapshots_app.models import IntegrityProblem, Job, JobKind, Version

logger = logging.getLogger(__name__)

CHUNK = 200


def _scope(project_id: int | None) -> QuerySet[Version]:
    versions = Version.objects.select_related("session")
    if project_id is not None:
        versions = versions.filter(session__project_id=project_id)
    return versions.order_by("id")


def _last_cursor(project_id: int | None) -> int:
    last = (
        jobs.rolling_scrubs()
        .filter(**({"project_id": project_id} if project_id is not None else {"project__isnull": True}))
        .order_by(*jobs.NEWEST_FIRST)
        .values_list("result", flat=True)
        .first()
    )
    return int(last["cursor"]) if last else 0


def _window(project_id: int | None, budget: int | None) -> tuple[list[int], int]:
    """Ids of the versions to verify, and the cursor the next run starts after."""
    scope = _scope(project_id)
    if not budget:
        ids = list(scope.values_list("id", flat=True))
        return ids, 0
    cursor = _last_cursor(project_id)
    ids = list(scope.filter(id__gt=cursor).values_list("id", flat=True)[:budget])
    if len(ids) < budget:
        # Wrap around: the window continues from the oldest version.
        ids += [i for i in scope.filter(id__lte=cursor).values_list("id", flat=True)[: budget - len(ids)]]
    next_cursor = ids[-1] if ids and len(ids) == budget else 0
    return ids, next_cursor


def id_runs(ids: Iterable[int]) -> list[int | list[int]]:
    """Ascending ids, written short for a job's params: a run of consecutive ids as [first, last]
    (a select-all of a project's versions is a few runs, not a list of every id)."""
    return [first if first == last else [first, last] for first, last in number_runs(ids)]


def ids_of_runs(runs: Iterable[int | list[int]]) -> list[int]:
    return [i for run in runs for i in (range(run[0], run[1] + 1) if isinstance(run, list) else (run,))]


def integrity_scrub_run(
    *,
    project: Project | None = None,
    budget: int | None = None,
    versions: list[int] | None = None,
    job: Job | None = None,
    progress: ProgressFn = _no_progress,
) -> dict[str, Any]:
    """Verify versions (all of a project, or of every project when `project` is None; or only the
    ones whose ids are `versions`, within that scope).

    `budget` limits how many versions one run verifies (None or 0: all). Returns counts and the
    versions that failed; a run over chosen versions leaves the rolling window where it was (its
    result has no `cursor`).
    """
    project_id = project.pk if project is not None else None
    if versions is not None:
        ids, next_cursor = sorted(set(versions)), None
    else:
        ids, next_cursor = _window(project_id, budget)
    progress(0, len(ids), force=True)
    outcomes: dict[tuple[int, bytes, str], str | None] = {}
    failed: list[dict[str, Any]] = []
    done = gone = 0
    for start in range(0, len(ids), CHUNK):
        # (Within the project: the ids were chosen by whoever started the run.)
        for version in _scope(project_id).filter(id__in=ids[start : start + CHUNK]):
            # Versions sharing a root and checksum (rewinds, forks) read back identically: verify once.
            key = (version.session.project_id, bytes(version.root), version.checksum)
            if key not in outcomes:
                outcomes[key] = _verify(version)
            problem = outcomes[key]
            if problem is not None:
                if integrity_problem_record(version=version, detail=problem, job=job) is None:
                    gone += 1  # removed while it was read (see integrity_problem_record)
                else:
                    failed.append({"session": str(version.session_id), "external_id": version.session.external_id,
                                   "version": version.number, "detail": problem[:300]})
            done += 1
        progress(done)
    # `verified`: read back exactly; `failed`: did not (it counted both as verified: "1,500 verified,
    # 2 failed" of 1,500 versions); `checked`: both (versions removed while read are in neither).
    checked = done - gone
    result = {"checked": checked, "verified": checked - len(failed), "failed": len(failed), "problems": failed[:100]}
    return result if next_cursor is None else {**result, "cursor": next_cursor}


def _verify(version: Version) -> str | None:
    try:
        store.read_canonical(version, use_cache=False)
    except errors.IntegrityProblem as exc:
        return exc.message
    return None


@transaction.atomic
def integrity_problem_record(*, version: Version, detail: str, job: Job | None = None) -> IntegrityProblem | None:
    """Record (or refresh) the open problem of a version that failed verification; None if the
    version is gone: removed (by retention, or with its session) while it was read, its nodes collected
    under the reader, which failed on a missing node. That is no problem, and is not recorded: it was
    logged as one, and the insert then failed on the version's foreign key, failing the scrub's job.
    (Locked, the version stays until this commits; while it is there its nodes are never collected.
    The lock is one a deletion waits for, not a new version pointing at it as its parent.)"""
    if Version.objects.select_for_update(no_key=True).filter(pk=version.pk).values_list("pk", flat=True).first() is None:
        return None
    open_problem = IntegrityProblem.objects.select_for_update().filter(version=version, resolved_at__isnull=True)
    problem = open_problem.first()
    if problem is None:
        try:
            with transaction.atomic():
                problem = IntegrityProblem.objects.create(
                    project_id=version.session.project_id, session_id=version.session_id, version=version,
                    version_number=version.number, detail=detail, found_by=job,
                )
        except IntegrityError:
            # Another scrub (or a finalize) recorded it at this moment: refresh that one. This job
            # failed on the constraint, leaving the rest of its window unverified.
            problem = open_problem.get()
        else:
            payload = {"session": str(version.session_id), "version": version.number, "problem": problem.pk,
                       "detail": detail[:300]}
            project_id, session_id = version.session.project_id, version.session_id
            events.publish_after_commit(project_id, "integrity.problem", payload, session_id=session_id)
            logger.error("integrity problem: %s", detail)
            return problem
    problem.detail = detail
    problem.found_by = job or problem.found_by
    problem.save(update_fields=["detail", "found_by", "last_seen_at"])
    return problem


@transaction.atomic
def integrity_problem_resolve(
    *, problem: IntegrityProblem, resolution: str, actor: User = None, actor_label: str = ""
) -> IntegrityProblem:
    """Close a problem after a person dealt with it, e.g. restored the damaged rows from a backup.
    The version is verified again first, from the database: while it still fails, StillDamaged and
    the problem stays open (the data itself is never touched here). Audited."""
    resolution = require_reason(resolution, name="resolution")  # how it was resolved: the audit event's reason
    problem = IntegrityProblem.objects.select_for_update().select_related("version__session").get(pk=problem.pk)
    if problem.resolved_at is None:
        still = _verify(problem.version)
        if still is not None:
            raise errors.StillDamaged(
                f"version {problem.version_number} of {problem.version.session.external_id} still fails "
                f"verification ({still}); restore its data first, or delete the session"
            )
        problem.resolved_at = timezone.now()
        problem.resolution = resolution
        problem.save(update_fields=["resolved_at", "resolution"])  # last_seen_at stays when it was last seen
        audit_record(
            project=problem.project, action="integrity.resolve", target_type="version", target_id=problem.version_id,
            session_id=problem.session_id, reason=problem.resolution, actor=actor, actor_label=actor_label,
            details={"version": problem.version_number, "detail": problem.detail[:500]},
        )
    return problem


def integrity_problems(
    *, project: Project, session: WorkflowSession | None = None, open_only: bool = True
) -> QuerySet[IntegrityProblem]:
    """Problems of a project (or one session), newest first, for the admin and the session page."""
    problems = IntegrityProblem.objects.filter(project=project).select_related("session")
    if session is not None:
        problems = problems.filter(session=session)
    if open_only:
        problems = problems.filter(resolved_at__isnull=True)
    return problems.order_by("-last_seen_at", "-id")


def integrity_scrub_start(
    *, project: Project | None = None, budget: int | None = None, actor: User = None, actor_label: str = "",
    request: RequestKey | None = None,
) -> Job:
    """Queue a scrub of one project (or all projects). `budget` None = settings.INTEGRITY_SCRUB_BUDGET, 0 = all.
    `request`: the starting request's idempotency key (see jobs.job_create)."""
    from snapshots_app import tasks

    if budget is None:
        budget = int(getattr(settings, "INTEGRITY_SCRUB_BUDGET", 0))
    return jobs.job_create(
        kind=JobKind.SCRUB, project=project, params={"budget": budget}, actor=actor, actor_label=actor_label,
        enqueue=lambda job_id: tasks.integrity_scrub_job.delay(job_id), request=request,
    )


def integrity_verify_start(*, versions: QuerySet[Version], actor: User = None, actor_label: str = "") -> list[Job]:
    """Queue the verification of these versions (an admin's select-all of thousands): one scrub job
    per project they belong to, with their ids in its params, so a request that chose 50,000
    versions answers at once and the work shows its progress under Jobs. The caller checks the
    role; the job verifies only versions of its own project."""
    from snapshots_app import tasks

    by_project: dict[int, list[int]] = {}
    for version_id, project_id in versions.order_by("id").values_list("id", "session__project_id").iterator(10_000):
        by_project.setdefault(project_id, []).append(version_id)
    projects = Project.objects.in_bulk(list(by_project))
    return [
        jobs.job_create(
            kind=JobKind.SCRUB, project=projects[project_id],
            params={"budget": 0, "selected": len(ids), "versions": id_runs(ids)}, actor=actor, actor_label=actor_label,
            enqueue=lambda job_id: tasks.integrity_scrub_job.delay(job_id),
        )
        for project_id, ids in sorted(by_project.items())
    ]

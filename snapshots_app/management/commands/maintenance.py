"""Run the workers' jobs on demand: compaction (or its dry run), integrity scrub, export, import.

By default the work runs here, in this process, printing progress; with --queue it is handed to
the Celery workers as a job (its progress then shows live in the UI).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app.errors import StateStoreError
from sessions_app.models import Project, WorkflowSession
from snapshots_app import compaction, integrity, jobs, tasks, transfer
from snapshots_app.models import JobKind, JobStatus


def _not_negative(raw: str) -> int:
    """--budget: a negative one made a job that failed with a traceback ("Negative indexing...")."""
    try:
        number = int(raw)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a count of versions (0 or more; 0 = all)")
    return number


class Command(BaseCommand):
    help = "Compact, dry-run, scrub, export or import now (or --queue it for the workers)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["compact", "dry-run", "gc", "scrub", "export", "import"])
        parser.add_argument("project", help="project slug")
        parser.add_argument("--session", help="export: only this session (external id)")
        parser.add_argument("--skip-damaged", action="store_true",
                            help="export of a project: leave out sessions with an open integrity problem")
        parser.add_argument("--file", help="import: the NDJSON export file")
        parser.add_argument("--skip-existing", action="store_true",
                            help="import: leave out sessions whose external id the project has already")
        parser.add_argument("--budget", type=_not_negative, default=0,
                            help="scrub: verify at most this many versions (0 = all)")
        parser.add_argument("--queue", action="store_true", help="hand the job to the Celery workers instead")

    def handle(self, *args: Any, **options: Any) -> None:
        project = Project.objects.filter(slug=options["project"]).first()
        if project is None:
            raise CommandError(f"no project with slug {options['project']!r}")
        session = None
        if options["session"]:
            session = WorkflowSession.objects.filter(project=project, external_id=options["session"]).first()
            if session is None:
                raise CommandError(f"no session {options['session']!r} in {project.slug}")
        try:
            result = self._run(options["action"], project, session, options)
        except StateStoreError as exc:
            raise CommandError(exc.message) from None
        finally:
            self._end_progress()
        self.stdout.write(json.dumps(result, indent=2, default=str))

    def _run(self, action: str, project: Project, session: WorkflowSession | None, options: dict) -> Any:
        queue = options["queue"]
        if action == "dry-run":
            if queue:  # (it ran here, saying nothing of the --queue asked for)
                raise CommandError("a dry run changes nothing and prints its plan here: run it without --queue")
            return compaction.compaction_dry_run(project=project).as_dict()
        if action in ("compact", "gc"):
            if queue:
                return {"job": compaction.compaction_start(project=project, apply_retention=action == "compact",
                                                           actor_label="manage.py").pk}
            return compaction.compaction_run(project=project, apply_retention=action == "compact",
                                             progress=self._progress, actor_label="manage.py")
        if action == "scrub":
            if queue:
                return {"job": integrity.integrity_scrub_start(project=project, budget=options["budget"],
                                                               actor_label="manage.py").pk}
            if options["budget"]:
                # A budgeted run continues where the last one stopped, which it learns from finished
                # scrub jobs: so this run is recorded as one too (run here, not queued).
                job = jobs.job_create(kind=JobKind.SCRUB, project=project, params={"budget": options["budget"]},
                                      actor_label="manage.py", enqueue=lambda job_id: None)
                tasks.integrity_scrub_job(job.pk)
                job.refresh_from_db()
                return job.result if job.status == JobStatus.DONE else {"job": job.pk, "error": job.error}
            return integrity.integrity_scrub_run(project=project, progress=self._progress)
        if action == "export":
            skip_damaged = options["skip_damaged"]
            if queue:
                return {"job": transfer.transfer_export_start(project=project, session=session, skip_damaged=skip_damaged,
                                                              actor_label="manage.py").pk}
            return transfer.transfer_export_run(project=project, session=session, skip_damaged=skip_damaged,
                                                progress=self._progress)
        if not options["file"]:
            raise CommandError("import needs --file")
        path = Path(options["file"])
        if not path.is_file():
            raise CommandError(f"no file {str(path)!r}")
        skip_existing = options["skip_existing"]
        if queue:
            return {"job": transfer.transfer_import_start(project=project, source=path, skip_existing=skip_existing,
                                                          actor_label="manage.py").pk}
        return transfer.transfer_import_run(project=project, path=path, actor_label="manage.py", progress=self._progress,
                                            skip_existing=skip_existing)

    def _progress(self, done: int, total: int | None = None, *, force: bool = False) -> None:
        if total is not None:
            self._total = total
        self.stderr.write(f"\r{done}/{getattr(self, '_total', 0)}", style_func=str, ending="")  # plain, not error red
        self.stderr.flush()
        self._progress_shown = True

    def _end_progress(self) -> None:
        # The progress line is redrawn in place ("\r"); end it, so that the result (stdout) or the
        # error does not continue it ("46/46{" or "23/46CommandError: ...").
        if getattr(self, "_progress_shown", False):
            self.stderr.write("", style_func=str)
            self._progress_shown = False

"""Admin for versions, integrity problems and jobs, plus the project actions that need the state
store (compaction, export, integrity). Versions are never edited in place: a data fix records a
new head of kind data_fix through snapshots_app.services.snapshot_data_fix, audited."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from typing import Any

import orjson
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.views.main import SEARCH_VAR
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.text import smart_split, unescape_string_literal

from sessions_app.admin import ProjectAdmin as BaseProjectAdmin
from sessions_app.admin import (
    ProjectListFilter,
    ProjectScopedAdmin,
    ReadOnlyAdmin,
    admin_projects,
    may_change,
    pasted_uuid,
    require_role,
)
from sessions_app.errors import IntegrityProblem as IntegrityError
from sessions_app.errors import InvalidState, StateStoreError
from sessions_app.forms import form_problems
from sessions_app.models import Project, Role, WorkflowSession
from sessions_app.selectors import number_ranges
from snapshots_app import canonical, compaction, integrity, selectors, services, transfer
from snapshots_app.diff import DiffResult, PatchError, diff_values, value_at
from snapshots_app.forms import DataFixForm
from snapshots_app.jobs import job_condition
from snapshots_app.jsonview import join_pointer, pretty
from snapshots_app.models import IntegrityProblem, Job, JobKind, JobStatus, RetentionPolicy, Version
from snapshots_app.views import diff_display

# A state larger than this (bytes of canonical JSON) is not put in the data fix page whole unless
# asked: a 5 MB textarea makes a browser crawl, and one field is what a fix usually changes.
WHOLE_STATE_EDIT_MAX = 1_000_000
# Links to parts listed at most (a list of 100,000 items is not 100,000 links): the rest by their path.
PARTS_SHOWN = 1_000
# Versions verified in the admin's request (a page's worth: ~1 ms each), while their states come to at most
# VERIFY_BYTES_IN_REQUEST (50 versions of a 10 MB state took 17 s); a larger selection is a job.
VERIFY_IN_REQUEST = 100
VERIFY_BYTES_IN_REQUEST = 64 * 1024 * 1024
# A versions search naming at most this many sessions lists theirs by id (get_search_results).
SEARCH_SESSIONS_BY_ID = 100


@admin.register(Version)
class VersionAdmin(ReadOnlyAdmin):
    project_lookup = "session__project"
    list_display = ["__str__", "session_link", "number", "kind", "step", "status", "logical_size", "pinned", "label",
                    "created_at", "data_fix_link"]
    list_filter = ["kind", "pinned", "status", ("session__project", ProjectListFilter)]
    # Only the session: a substring search over every version's step/label would scan the table.
    search_fields = ["session__external_id"]
    list_select_related = ["session__project"]
    ordering = ["-id"]  # the primary key index: the model's (session, -number) order would sort every row
    exclude = ["root", "session"]  # (session_link names it, with a link to its timeline)
    readonly_fields = ["session_link", "data_fix_link"]
    actions = ["data_fix", "verify_integrity", "pin", "unpin"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Version]:
        return super().get_queryset(request).defer("summary")

    def get_ordering(self, request: HttpRequest) -> Any:
        # A search lists the versions of the sessions it finds, each session's newest first: the order of
        # version_unique_number, which reads a page of them (see get_search_results).
        if request.GET.get(SEARCH_VAR, "").strip():
            return ["-session_id", "-number"]
        return self.ordering

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        # A pasted id and the searched external id both name sessions: found among the sessions first (by
        # their indexes), then their versions by version_unique_number. As an OR across the join (the external
        # id or the version's session_id), PostgreSQL joined every version to every session, page and count:
        # 30 ms at 26,000 versions, growing with the table. Named by their ids (when a search finds a few
        # sessions, as it mostly does), their versions come in that index's order: a page of a session of
        # 200,000 versions is read, not all of them sorted by id (348 ms).
        words = [unescape_string_literal(word) if word[0] in "\"'" and word[0] == word[-1] and len(word) > 1 else word
                 for word in smart_split(search_term)]
        if not words:
            return queryset, False
        session_id = pasted_uuid(search_term)
        named = Q(*(Q(external_id__icontains=word) for word in words))
        sessions = WorkflowSession.objects.filter(named | Q(pk=session_id) if session_id is not None else named)
        found = list(sessions.values_list("pk", flat=True)[: SEARCH_SESSIONS_BY_ID + 1])
        if len(found) > SEARCH_SESSIONS_BY_ID:
            return queryset.filter(session__in=sessions), False
        return queryset.filter(session_id__in=found), False

    @admin.display(description="Session")
    def session_link(self, obj: Version) -> str:
        url = reverse("snapshots:session", kwargs={"session_id": obj.session_id})
        return format_html('<a href="{}#v-{}">{}</a>', url, obj.number, obj.session.external_id)

    @admin.display(description="Data fix")
    def data_fix_link(self, obj: Version) -> str:
        return format_html('<a href="{}">fix from this version…</a>', reverse("admin:snapshots_app_version_data_fix",
                                                                          args=[obj.pk]))

    def has_data_fix_permission(self, request: HttpRequest) -> bool:
        # "Change" of a version means recording a corrected new version; the row itself never changes.
        return request.user.has_perm("snapshots_app.change_version")

    def get_urls(self) -> list:
        return [
            path("<int:version_id>/data-fix/", self.admin_site.admin_view(self.data_fix_view),
                 name="snapshots_app_version_data_fix"),
            *super().get_urls(),
        ]

    @admin.action(description="Data fix from the selected version…", permissions=["data_fix"])
    def data_fix(self, request: HttpRequest, queryset: QuerySet[Version]) -> HttpResponse | None:
        chosen = list(queryset.values_list("pk", flat=True)[:2])
        if len(chosen) != 1:
            messages.warning(request, "Select exactly one version to start a data fix from.")
            return None
        return redirect(reverse("admin:snapshots_app_version_data_fix", args=[chosen[0]]))

    @admin.action(description="Verify integrity (read from the database, bypassing caches)", permissions=["view"])
    def verify_integrity(self, request: HttpRequest, queryset: QuerySet[Version]) -> None:
        selected = queryset.order_by()
        # It records the problems it finds: the operator role, as the API's scrub asks.
        require_role(request, selected.values_list("session__project_id", flat=True).distinct(), Role.OPERATOR)
        picked = list(selected.values_list("pk", "logical_size")[: VERIFY_IN_REQUEST + 1])
        ids = [pk for pk, _ in picked]
        if len(ids) > VERIFY_IN_REQUEST or sum(size for _, size in picked) > VERIFY_BYTES_IN_REQUEST:
            # A select-all of thousands: verified by the workers (a 50,000-version request timed out).
            queued = integrity.integrity_verify_start(versions=selected, actor=request.user)
            links = format_html_join(", ", '<a href="{}">job {}</a> ({} version(s) of {})', (
                (reverse("admin:snapshots_app_job_change", args=[job.pk]), job.pk, job.params["selected"], job.project)
                for job in queued
            ))
            messages.success(request, format_html(
                "Verifying {} version(s) in the background: {}. Follow the progress under "
                '<a href="{}">Jobs</a>; what fails appears under <a href="{}">Integrity problems</a>.',
                sum(job.params["selected"] for job in queued), links,
                reverse("admin:snapshots_app_job_changelist"), reverse("admin:snapshots_app_integrityproblem_changelist"),
            ))
            return
        outcome = integrity.integrity_scrub_run(versions=ids)
        bad = [f"{problem['external_id']} v{problem['version']}" for problem in outcome["problems"]]
        if bad:
            messages.error(request, f"{outcome['failed']} of {outcome['checked']} failed verification: "
                                    f"{', '.join(bad[:20])}")
        else:
            messages.success(request, f"All {outcome['verified']} version(s) verified against their checksums.")

    @admin.action(description="Pin (retention keeps them)", permissions=["data_fix"])
    def pin(self, request: HttpRequest, queryset: QuerySet[Version]) -> None:
        self._pin(request, queryset, True)

    @admin.action(description="Unpin", permissions=["data_fix"])
    def unpin(self, request: HttpRequest, queryset: QuerySet[Version]) -> None:
        self._pin(request, queryset, False)

    def _pin(self, request: HttpRequest, queryset: QuerySet[Version], pinned: bool) -> None:
        selected = queryset.order_by()
        operated = admin_projects(request, Role.OPERATOR).values_list("pk", flat=True)
        outcome = services.versions_pin(versions=selected.filter(session__project__in=operated), pinned=pinned,
                                        actor=request.user)
        not_operated = selected.exclude(session__project__in=operated).values_list("session__project__slug")
        refused = outcome.refused + Counter({f"pinning in {slug} needs the operator role": count
                                             for slug, count in not_operated.annotate(count=Count("pk"))})
        done = "pinned" if pinned else "unpinned"
        if outcome.done or outcome.unchanged:
            messages.success(request, " ".join(
                ([f"{done.capitalize()} {outcome.done} version(s)."] if outcome.done else [])
                + ([f"{outcome.unchanged} were {done} already: left as they were."] if outcome.unchanged else [])
            ))
        if refused:
            messages.error(request, f"{refused.total()} refused: {'; '.join(sorted(refused)[:5])}")

    def data_fix_view(self, request: HttpRequest, version_id: int) -> HttpResponse:
        """Edit a version's state as JSON (or one part of it: `path`, a JSON pointer), see the diff
        against the head, give a reason, record it. A state above WHOLE_STATE_EDIT_MAX is not put
        in the page whole unless asked (`whole=1`): its top-level parts are offered instead."""
        if not self.has_data_fix_permission(request):
            raise PermissionDenied
        version = self.get_queryset(request).select_related("session__project").filter(pk=version_id).first()
        if version is None:
            if request.method == "POST" and request.POST.get("state"):
                # Removed while the fix was being written (a trim, retention, the session's deletion): a
                # bare 404 lost the edit. The text sent comes back, to start again from another version.
                return TemplateResponse(request, "admin/snapshots_app/version/data_fix_gone.html", {
                    **self.admin_site.each_context(request), "opts": self.model._meta,
                    "title": "The version of this data fix is no longer there", "text": request.POST["state"],
                    "path": request.POST.get("path", ""), "reason": request.POST.get("reason", ""),
                }, status=404)
            raise Http404("no such version")
        session = version.session
        require_role(request, [session.project_id], Role.OPERATOR)
        try:
            base = selectors.version_state(version)
        except IntegrityError as exc:  # a damaged version cannot be the base of a fix
            messages.error(request, f"{exc.message}. Start the data fix from another version.")
            return redirect(reverse("admin:snapshots_app_version_changelist"))
        head = selectors.head_version(session)
        pointer = (request.POST if request.method == "POST" else request.GET).get("path", "")
        error, warning, result, parts, previewed, unchanged = "", "", None, [], "", False
        archived = ""
        if session.archived_at is not None:  # (said at the last click only, after the whole edit)
            archived = (f"{session.external_id} is archived: recording a fix is refused until it is unarchived (on its "
                        "session page, by an operator).")
        parts_more, parts_size = 0, 0
        text = request.POST.get("state") if request.method == "POST" else None
        if text is None:
            value, size = base, version.logical_size
            if pointer:
                try:
                    value = value_at(base, pointer)
                except PatchError as exc:
                    error, pointer = f"{pointer}: {exc}", ""
                else:
                    size = len(orjson.dumps(value))
            if size > WHOLE_STATE_EDIT_MAX and isinstance(value, (dict, list)) and request.GET.get("whole") != "1":
                # A large part (a 15 MB list of documents) is split in its turn, as the state is.
                keys = sorted(value) if isinstance(value, dict) else range(len(value))
                parts = [(str(key), join_pointer(pointer, key)) for key in islice(keys, PARTS_SHOWN)]
                parts_more, parts_size = len(value) - len(parts), size
            elif size > WHOLE_STATE_EDIT_MAX:
                # Compact, not indented: a 7.6 MB state was 19 MB of indented text, past what a POST may
                # carry (REQUEST_MAX_BYTES), so its edit was refused and lost.
                text = canonical.dumps(value).decode()
            else:
                text = pretty(value)
        reason = request.POST.get("reason", "")
        form = DataFixForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and not form.is_valid():
            error = " ".join(form_problems(form))
        elif request.method == "POST":
            try:
                prepared = services.state_prepare(services.state_with_value(base, pointer, form.cleaned_data["state"]))
                previewed = prepared.checksum
                # Only what the page showed is recorded: this very state, diffed against this head.
                # Otherwise (the head moved since the page was loaded, the text was edited after its
                # diff was shown, nothing was previewed) the page shows the diff as it is now instead.
                expected = form.cleaned_data["expected_version"]
                if expected != session.head_number:
                    error = (f"The head is now v{session.head_number}"
                             + ("" if expected is None else f", not v{expected} as when this page was loaded")
                             + f": the diff below is against v{session.head_number}. Check it before recording.")
                elif "apply" in request.POST and form.cleaned_data["previewed"] != prepared.checksum:
                    error = "This state's diff against the head was not shown yet: check it below before recording."
                elif "apply" in request.POST:
                    fixed = services.snapshot_data_fix(
                        session=session, state=prepared, based_on=version.number,
                        reason=form.cleaned_data["reason"], expected_version=expected, edited=pointer or None,
                        actor=request.user,
                    )
                    if fixed.number == expected:  # the head's state already: the service recorded nothing
                        messages.warning(request, f"No change: this is the state of v{fixed.number}, the head of "
                                                  f"{session.external_id}, already. Nothing was recorded.")
                        return redirect(request.get_full_path())
                    messages.success(request, f"Recorded version {fixed.number} (data fix) of {session.external_id}.")
                    return redirect(reverse("snapshots:session", kwargs={"session_id": session.pk}))
                unchanged = head is not None and head.checksum == prepared.checksum
                # (Only for a page that shows it: a recorded fix needs no diff.)
                try:
                    head_value = orjson.loads(selectors.version_state_bytes(head)) if head else {}
                except IntegrityError as exc:
                    # A damaged head is when a fix is needed most: say what recording does, not only the damage.
                    warning = (f"{exc.message}. The diff against it cannot be shown: recording this state makes a "
                               "new head on top of it (the damaged version is kept as it is, for its integrity problem).")
                else:
                    result = diff_values(head_value, prepared.value)
                    if expected is not None and expected != session.head_number and error:
                        error += _undoes(session, expected, head_value, result)
            except StateStoreError as exc:
                error = exc.message
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Data fix of {session.external_id} from version {version.number}" + (f", at {pointer}" if pointer else ""),
            "version": version, "session": session, "head": head, "text": text, "reason": reason, "error": error,
            "warning": warning, "archived": archived, "path": pointer, "parts": parts, "parts_more": parts_more, "parts_size": parts_size, **diff_display(result), "mode": "inline", "previewed": previewed,
            "unchanged": unchanged, "engine_active": selectors.engine_active(session),
        }
        return TemplateResponse(request, "admin/snapshots_app/version/data_fix.html", context,
                                status=400 if error else 200)


def _undoes(session: WorkflowSession, expected: int, head_value: Any, result: DiffResult) -> str:
    """" It would undo what was written since vN: /a, /b." for a fix previewed against a head that moved."""
    undone = selectors.changes_undoing(session, expected, head_value, result)
    if not undone:
        return ""
    more = f" and {len(undone) - 10} more" if len(undone) > 10 else ""
    return f" It would undo what was written since v{expected}: {', '.join(undone[:10])}{more}."


@admin.register(IntegrityProblem)
class IntegrityProblemAdmin(ReadOnlyAdmin):
    list_display = ["session", "version_number", "detail", "first_seen_at", "last_seen_at", "resolved_at",
                    "resolve_link"]
    list_filter = [("resolved_at", admin.EmptyFieldListFilter), ("project", ProjectListFilter)]
    search_fields = ["session__external_id", "detail"]
    list_select_related = ["session"]

    @admin.display(description="Resolve")
    def resolve_link(self, obj: IntegrityProblem) -> str:
        if obj.resolved_at is not None:
            return "—"
        url = reverse("admin:snapshots_app_integrityproblem_resolve", args=[obj.pk])
        return format_html('<a href="{}">resolve…</a>', url)

    def get_urls(self) -> list:
        return [
            path("<int:problem_id>/resolve/", self.admin_site.admin_view(self.resolve_view),
                 name="snapshots_app_integrityproblem_resolve"),
            *super().get_urls(),
        ]

    def has_resolve_permission(self, request: HttpRequest) -> bool:
        # Rows stay read-only; "change" of a problem means closing it with a resolution.
        return request.user.has_perm("snapshots_app.change_integrityproblem")

    def resolve_view(self, request: HttpRequest, problem_id: int) -> HttpResponse:
        """Verify the version again and close the problem with a resolution (audited)."""
        if not self.has_resolve_permission(request):
            raise PermissionDenied
        problem = get_object_or_404(self.get_queryset(request).select_related("session"), pk=problem_id)
        require_role(request, [problem.project_id], Role.OPERATOR)
        error, resolution = "", request.POST.get("resolution", "")
        if request.method == "POST":
            try:
                integrity.integrity_problem_resolve(problem=problem, resolution=resolution, actor=request.user)
            except StateStoreError as exc:
                error = exc.message
            else:
                messages.success(request, f"Resolved the problem of v{problem.version_number} of "
                                          f"{problem.session.external_id}: it verifies again.")
                return redirect(reverse("admin:snapshots_app_integrityproblem_changelist"))
        context = {
            **self.admin_site.each_context(request), "opts": self.model._meta, "title": "Resolve an integrity problem",
            "problem": problem, "resolution": resolution, "error": error,
        }
        return TemplateResponse(request, "admin/snapshots_app/integrityproblem/resolve.html", context,
                                status=400 if error else 200)


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "kind", "status", "condition", "project", "done", "total", "created_by_label",
                    "finished_at"]
    list_filter = ["kind", "status", ("project", ProjectListFilter)]
    list_select_related = ["project"]
    # The primary key index: the model's (-created_at, -id) order has no index of its own, so every
    # page view and filter click sorted the whole table (a job per project each hour, from the scrub).
    ordering = ["-id"]
    exclude = ["params", "result"]
    readonly_fields = ["condition", "shown_params", "shown_result"]

    def get_ordering(self, request: HttpRequest) -> Any:
        # One project's jobs: newest first by job_project_created. Walking the primary key instead
        # read every other project's jobs too, all of them for a project with fewer than a page.
        if request.GET.get("project__id__exact"):
            return ["-created_at", "-id"]
        return self.ordering

    @admin.display(description="Condition")
    def condition(self, obj: Job) -> str:
        """A running job whose worker was killed looked like any other, its progress frozen: say which."""
        return job_condition(obj) or ""

    @admin.display(description="Params")
    def shown_params(self, obj: Job) -> str:
        return format_html("<pre>{}</pre>", pretty(obj.public_params))

    @admin.display(description="Result")
    def shown_result(self, obj: Job) -> str:
        """Its totals first, runs of version numbers as ranges (a large compaction's 10,485 removed
        numbers were as many lines, above its totals), and an export's file as a link to download."""
        result = obj.public_result
        if not isinstance(result, dict):
            return format_html("<pre>{}</pre>", pretty(result))
        nested = {key: value for key, value in result.items() if isinstance(value, (dict, list))}
        shown = {**{key: value for key, value in result.items() if key not in nested},
                 **{key: _as_ranges(value) for key, value in nested.items()}}
        text = json.dumps(shown, ensure_ascii=False, indent=2)
        if obj.kind == JobKind.EXPORT and obj.status == JobStatus.DONE and "file" in result:
            try:
                transfer.export_file(job=obj)
            except InvalidState as exc:  # swept (EXPORT_KEEP_DAYS), or its session deleted
                return format_html("<p>{}.</p><pre>{}</pre>", exc.message[:1].upper() + exc.message[1:], text)
            # The API's download, which takes this browser session: the project's operators may have it.
            return format_html('<p><a href="{}">Download {}</a></p><pre>{}</pre>',
                               reverse("api-job-file", args=[obj.pk]), result["file"], text)
        return format_html("<pre>{}</pre>", text)


def _as_ranges(value: Any) -> Any:
    """Lists of version numbers (also by session) as their runs: "v1\u2013v40, v42"."""
    if isinstance(value, dict):
        return {key: _as_ranges(item) for key, item in value.items()}
    if isinstance(value, list) and len(value) > 3 and all(type(item) is int for item in value):
        return number_ranges(sorted(value), shown=50)
    return value


class RetentionPolicyForm(forms.ModelForm):
    # The service's bounds (the column's would take 2 billion, which the service then refused: a 500).
    keep_last = forms.IntegerField(min_value=0, max_value=compaction.RETENTION_KEEP_MAX,
                                   help_text=RetentionPolicy._meta.get_field("keep_last").help_text)
    keep_days = forms.IntegerField(min_value=0, max_value=compaction.RETENTION_KEEP_MAX,
                                   help_text=RetentionPolicy._meta.get_field("keep_days").help_text)

    # A policy is applied by the next compaction (daily, or one an admin runs), and what it removes is gone
    # for good: a typo in keep_last saved at once. A policy that would remove versions now is saved only
    # once the page has said how many and this is ticked.
    confirmed = forms.BooleanField(required=False, label="Save it anyway",
                                   help_text="Asked when the policy would remove versions: the page says how many.")

    class Meta:
        model = RetentionPolicy
        fields = ["project", "enabled", "keep_last", "keep_days", "thin_to"]

    def clean(self) -> Any:
        cleaned = super().clean() or {}
        project = cleaned.get("project") or getattr(self.instance, "project", None)
        asked = {name: cleaned.get(name) for name in ("enabled", "keep_last", "keep_days", "thin_to")}
        if self.errors or project is None or not asked["enabled"] or cleaned.get("confirmed"):
            return cleaned
        if self.instance.pk is not None and not (set(self.changed_data) & set(asked)):
            return cleaned
        outlook = compaction.retention_outlook(project=project, policy=RetentionPolicy(project=project, **asked))
        if outlook.versions_removed == 0:
            return cleaned
        if outlook.versions_removed is None:
            counted = (f"{project.slug} holds {outlook.versions_total:,} versions, too many to count here: run "
                       "the Projects list's “Compaction: dry run” action to see how many this policy removes")
        else:
            counted = (f"under this policy the next compaction would remove {outlook.versions_removed:,} of "
                       f"{outlook.versions_total:,} versions, in {outlook.sessions_touched:,} session(s) of {project.slug}")
        raise forms.ValidationError(
            f"Nothing was saved: {counted}. Compaction runs daily (and whenever an admin runs it), and what it "
            "removes cannot be brought back. Tick “Save it anyway” to save this policy."
        )


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(ProjectScopedAdmin):
    """Each project's retention policy, as the API's /retention-policy/: its members read it, its admins
    set it (through compaction.retention_policy_set, audited as retention.policy). It is turned off
    (`enabled`), never deleted: a deletion would keep no record of the policy that stood."""

    form = RetentionPolicyForm
    list_display = ["project", "enabled", "keep_last", "keep_days", "thin_to", "updated_at", "updated_by_label"]
    list_filter = ["enabled", ("project", ProjectListFilter)]
    search_fields = ["project__slug", "project__name"]
    list_select_related = ["project"]
    autocomplete_fields = ["project"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return ["project", "in_words", "updated_at", "updated_by_label"] if obj is not None else []

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = ["project", "enabled", "keep_last", "keep_days", "thin_to", "confirmed"]
        return [*fields, "in_words", "updated_at", "updated_by_label"] if obj is not None else fields

    @admin.display(description="In words")
    def in_words(self, obj: RetentionPolicy) -> str:
        return obj.in_words

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_change_permission(request, obj)
        return allowed and (obj is None or may_change(request, obj.project_id, Role.ADMIN))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: RetentionPolicy, form: Any, change: bool) -> None:
        require_role(request, [obj.project_id], Role.ADMIN)
        policy = compaction.retention_policy_set(
            project=obj.project, enabled=obj.enabled, keep_last=obj.keep_last, keep_days=obj.keep_days,
            thin_to=obj.thin_to, actor=request.user,
        )
        obj.pk, obj.updated_at, obj.updated_by_label = policy.pk, policy.updated_at, policy.updated_by_label


admin.site.unregister(Project)


@admin.register(Project)
class ProjectAdmin(BaseProjectAdmin):
    """The project list with the state-store actions (run by the workers, results under Jobs)."""

    actions = ["compaction_preview", "compaction_queue", "export_queue", "export_healthy_queue", "scrub_queue"]

    def has_maintain_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("snapshots_app.add_job")

    @admin.action(description="Compaction: dry run (what retention and GC would free)", permissions=["view"])
    def compaction_preview(self, request: HttpRequest, queryset: QuerySet[Project]) -> None:
        projects = list(queryset)
        # The operator role, as the API's dry run asks: it walks the whole project.
        require_role(request, [project.pk for project in projects], Role.OPERATOR)
        for project in projects:
            preview = compaction.compaction_dry_run(project=project)
            messages.info(
                request,
                f"{project.slug}: would remove {preview.versions_removed} of {preview.versions_total} versions "
                f"(retention {'on' if preview.policy_enabled else 'off'}) and free {preview.nodes_freed} nodes, "
                f"{preview.bytes_freed} of {preview.bytes_total} bytes.",
            )

    def _administered(self, request: HttpRequest, queryset: QuerySet[Project], role: str = Role.ADMIN) -> list[Project]:
        """The selected projects where the user has `role` (a compaction the admin role, an export or scrub
        the operator role, as the API asks); all or none."""
        projects = list(queryset)
        require_role(request, [project.pk for project in projects], role)
        return projects

    @admin.action(description="Compaction: run now (queued)…", permissions=["maintain"])
    def compaction_queue(self, request: HttpRequest, queryset: QuerySet[Project]) -> TemplateResponse | None:
        """Asks first, as a deletion does: the run applies each project's retention policy, and the
        versions it removes are gone for good. The page says, per project, how many that would be now
        (or, for projects too large to count in a request, the policy in words)."""
        projects = self._administered(request, queryset)
        if request.POST.get("post") != "yes":
            budget, outlooks = compaction.RETENTION_COUNTED_MAX, []
            for project in sorted(projects, key=lambda project: project.slug):
                outlook = compaction.retention_outlook(project=project, count_max=budget)
                if outlook.versions_removed is not None and outlook.policy.enabled:
                    budget -= outlook.versions_total
                outlooks.append(outlook)
            return TemplateResponse(request, "admin/snapshots_app/project/compaction_confirmation.html", {
                **self.admin_site.each_context(request), "opts": self.model._meta, "title": "Run compaction now",
                "outlooks": outlooks, "removing": any(o.versions_removed or o.versions_removed is None
                                                      for o in outlooks if o.policy.enabled),
                "counted_max": compaction.RETENTION_COUNTED_MAX, "action_checkbox_name": ACTION_CHECKBOX_NAME,
            })
        jobs = [compaction.compaction_start(project=project, actor=request.user) for project in projects]
        messages.success(request, f"Queued {len(jobs)} compaction job(s): see Jobs for progress.")
        return None

    @admin.action(description="Export (queued; the file is listed under Jobs)", permissions=["maintain"])
    def export_queue(self, request: HttpRequest, queryset: QuerySet[Project]) -> None:
        jobs = [transfer.transfer_export_start(project=project, actor=request.user)
                for project in self._administered(request, queryset, Role.OPERATOR)]
        messages.success(request, f"Queued {len(jobs)} export job(s): see Jobs for the files.")

    @admin.action(description="Export, leaving out sessions with an open integrity problem (queued)",
                  permissions=["maintain"])
    def export_healthy_queue(self, request: HttpRequest, queryset: QuerySet[Project]) -> None:
        jobs = [transfer.transfer_export_start(project=project, skip_damaged=True, actor=request.user)
                for project in self._administered(request, queryset, Role.OPERATOR)]
        messages.success(request, f"Queued {len(jobs)} export job(s): see Jobs for the files and the sessions left out.")

    @admin.action(description="Verify integrity of every version (queued scrub)", permissions=["maintain"])
    def scrub_queue(self, request: HttpRequest, queryset: QuerySet[Project]) -> None:
        jobs = [integrity.integrity_scrub_start(project=project, budget=0, actor=request.user)
                for project in self._administered(request, queryset, Role.OPERATOR)]
        messages.success(request, f"Queued {len(jobs)} integrity scrub(s): problems appear under Integrity problems.")

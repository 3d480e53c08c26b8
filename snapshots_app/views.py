"""Dashboard pages for a session's versions: timeline, state viewer, diff, path history, rewind,
fork, pin and label. Thin: selectors read, services write; domain errors become messages."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from functools import wraps
from typing import Any

import orjson
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from config.files import file_download
from sessions_app import selectors as session_selectors
from sessions_app import services as session_services
from sessions_app.errors import (
    IdempotencyKeyReused,
    IntegrityProblem,
    InvalidState,
    NotFound,
    StateStoreError,
    VersionConflict,
)
from sessions_app.forms import form_problems
from sessions_app.models import Role, WorkflowSession
from sessions_app.selectors import role_allows, session_for_member
from sessions_app.strict_json import ascii_int
from sessions_app.views import render_fragment, wants_fragment
from snapshots_app import jsonview, selectors, services, transfer
from snapshots_app.diff import DiffResult
from snapshots_app.forms import ForkForm, GotoForm, MarkForm, ReasonForm, RewindForm, TimelineFilterForm, TrimForm
from snapshots_app.models import TIMELINE_KINDS, Version, VersionKind

DIFF_SHOWN = 500
# htmx error answers are text (static/js/app.js shows them with textContent): as text/html, a form
# error echoing the submitted value ("Select a valid choice. <img ...>") would be markup.
PLAIN_TEXT = "text/plain; charset=utf-8"
VALUE_SHOWN = 20_000


def _member_session(request: HttpRequest, session_id: Any) -> tuple[WorkflowSession, str]:
    try:
        return session_for_member(user=request.user, session_id=session_id)
    except NotFound:
        raise Http404("no such session") from None


class _NoSuchVersion(Exception):
    """A version address (path or `from`/`to`) naming no version of a session the user may read."""

    def __init__(self, session: WorkflowSession, number: Any) -> None:
        super().__init__(number)
        self.session, self.number = session, number


def _version(session: WorkflowSession, number: Any) -> Version:
    try:
        return selectors.version_for_session(session, number)
    except NotFound:
        raise _NoSuchVersion(session, number) from None


def _no_such_version(exc: _NoSuchVersion) -> tuple[str, int]:
    """What a page says of a version that is not there, and its status: the generic 404 ("it may
    have been deleted, or it belongs to a project you are not a member of") left an operator with a
    link from before a retention run, or a mistyped `to=`, guessing which part was wrong."""
    name, raw = exc.session.external_id, str(exc.number).strip()
    number = ascii_int(raw.removeprefix("-"))
    if number is None:
        return f"“{raw[:50]}” is not a version number: versions are numbered 1, 2, 3…", 400
    number = -number if raw.startswith("-") else number
    span = selectors.version_span(exc.session)
    if span is None:
        return f"{name} has no versions yet.", 404
    oldest, newest = span
    if number < 1:
        return f"{name} has no version {number}: versions are numbered from 1 (its newest is v{newest}).", 404
    if number > newest:
        return f"{name} has no version {number}: its newest is v{newest}.", 404
    kept = f" (the oldest version kept is v{oldest})" if number < oldest else ""
    return f"{name} has no version {number} any more: retention or a trim removed it{kept}.", 404


DAMAGED = (
    "{problem}. Nothing else of the session is changed by it: other versions that do not share the damaged "
    "part still open, rewind and fork. An integrity scrub (admin: Integrity problems) lists every version it affects."
)


def _explains_unshown_versions(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Answer a version address that names no version, or a version whose stored state fails its
    checksum, with a page of its session saying so (the latter was a bare "Server error")."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except _NoSuchVersion as exc:
            session = exc.session
            heading, (message, status) = "No such version", _no_such_version(exc)
        except IntegrityProblem as exc:
            session, _ = _member_session(request, kwargs["session_id"])
            heading, message, status = "A damaged version", DAMAGED.format(problem=exc.message[:1].upper() + exc.message[1:]), exc.status
        if wants_fragment(request):
            return HttpResponse(message, status=status, content_type=PLAIN_TEXT)
        return render(request, "snapshots_app/version_unshown.html",
                      {"session": session, "project": session.project, "heading": heading, "message": message},
                      status=status)

    return wrapper


def _require_operator(role: str) -> None:
    if not role_allows(role, Role.OPERATOR):
        raise PermissionDenied("operators only: viewers can read but not change sessions")


def _base(session: WorkflowSession, role: str) -> dict[str, Any]:
    return {"session": session, "project": session.project, "role": role,
            "can_operate": role_allows(role, Role.OPERATOR), "can_administer": role_allows(role, Role.ADMIN)}


def _timeline_at(session: WorkflowSession, number: int) -> str:
    """The (unfiltered) timeline with version `number` in it, scrolled to its row: the page that starts
    at it when the newest page cannot hold it. A version page's and a diff's way back pointed at #v-N on
    the newest page, where an older version is not, and landed at its top."""
    before = selectors.timeline_page_showing(session, number)
    page = "" if before is None else f"?before={before}"
    return reverse("snapshots:session", kwargs={"session_id": session.pk}) + f"{page}#v-{number}"


# -- timeline ----------------------------------------------------------------------------------------


@login_required
def session_detail(request: HttpRequest, session_id: Any) -> HttpResponse:
    session, role = _member_session(request, session_id)
    form = TimelineFilterForm(request.GET)
    filters = form.filters()
    # An address the timeline cannot follow lists nothing, saying why, with the filters that were fine.
    problems = form_problems(form) if form.errors else []
    before = None if problems else form.cleaned_data["before"]
    versions = [] if problems else selectors.timeline_page(session, before=before, filters=filters)
    context = {
        **_base(session, role),
        "versions": versions,
        "before": before,
        "next_before": versions[-1].number if len(versions) == selectors.TIMELINE_PAGE else None,
        "filters": filters,
        "address_problems": problems,
        "kinds": [(kind, selectors.TimelineFilters(kind=kind).described) for kind in TIMELINE_KINDS],
        "problems": selectors.integrity_problems(session),
        "forked_from": _forked_from(session),
    }
    if context["can_operate"] and before is None:  # (an older page's rows show no exports)
        context["exports"] = selectors.session_exports(session)
    # htmx asks for the rows of an older page ("Older versions": `before`), or for the whole timeline,
    # socket included, when the filters change (the filter form).
    fragment = "snapshots_app/partials/_timeline_rows.html" if before is not None else "snapshots_app/partials/_timeline.html"
    response = render_fragment(request, "snapshots_app/session.html", fragment, context, status=400 if problems else 200)
    if wants_fragment(request) and before is None:
        # The address the filter form's answer puts in the bar: the filters as the page's links spell
        # them, not the form's fields (an unticked box's nothing, "?kind=" for any kind).
        response["HX-Push-Url"] = request.path + (f"?{filters.query}" if filters.query else "")
    return response


@login_required
@require_GET
def timeline_goto(request: HttpRequest, session_id: Any) -> HttpResponse:
    """The timeline's "Go to" box: to a version's row, or the row of the version a moment ago, on
    whichever page of the timeline holds it (a shared #v-308 of an older page landed nowhere)."""
    session, _ = _member_session(request, session_id)
    form = GotoForm(request.GET)
    if not form.is_valid():
        messages.error(request, " ".join(form_problems(form)))
        return redirect("snapshots:session", session_id=session.pk)
    number, moment, asked = form.cleaned_data["at"]
    found = selectors.version_at_or_before(session, number=number, moment=moment)
    if found is None:
        span = selectors.version_span(session)
        if span is None:
            messages.error(request, "This session has no versions yet.")
            return redirect("snapshots:session", session_id=session.pk)
        first = span[0]  # the oldest kept
        if moment is not None and first == 1:
            # Not "a trim or retention may have removed older ones": v1 is there, and came later.
            written = selectors.version_get(session=session, number=1).created_at.astimezone(UTC)
            messages.info(request, f"The session had no version yet at {asked}: its first, v1, was written at "
                                   f"{written:%Y-%m-%d %H:%M:%S} (UTC).")
        else:
            messages.info(request, f"No version kept is {'as old as' if moment is None else 'from before'} {asked} "
                                   f"(a trim or retention may have removed older ones): v{first} is the oldest kept.")
        return redirect(_timeline_at(session, first))
    if moment is not None:
        messages.info(request, f"v{found} is the version the session had at {asked}.")
    elif found != number:
        messages.info(request, f"There is no {asked} (a number past the head, or removed by a trim or retention): "
                               f"v{found} is the one before it.")
    return redirect(_timeline_at(session, found))


@login_required
@require_GET
def session_audit(request: HttpRequest, session_id: Any) -> HttpResponse:
    """Who rewound, forked, fixed, pinned, archived this session, when and why, newest first: the admin's
    audit log was the only place, and most operators have no admin."""
    session, role = _member_session(request, session_id)
    before, cursor_problem = _cursor(request)
    page = session_selectors.SESSION_AUDIT_PAGE
    events = [] if cursor_problem else session_selectors.session_audit(session, before=before, limit=page)
    context = {
        **_base(session, role), "before": before, "cursor_problem": cursor_problem,
        "events": [(event, session_selectors.audit_change(event)) for event in events],
        "older": events[-1].pk if len(events) == page else None,
    }
    return render(request, "snapshots_app/audit.html", context, status=400 if cursor_problem else 200)


def _forked_from(session: WorkflowSession) -> dict[str, Any] | None:
    """The fork source named in the session's metadata, only when it is a session of the same project.

    Metadata is engine-supplied (PATCH, import): a value that is not a UUID must not break the page
    (it made {% url %} raise, a 500 for every member), and one naming another project's session is no lineage."""
    forked_from = session.metadata.get("forked_from") if isinstance(session.metadata, dict) else None
    if not isinstance(forked_from, dict):
        return None
    try:
        source = uuid.UUID(str(forked_from.get("session")))
    except ValueError:
        return None
    name = WorkflowSession.objects.filter(pk=source, project_id=session.project_id).values_list("external_id", flat=True).first()
    if name is None:
        return None
    return {"session": source, "name": name, "version": forked_from.get("version")}


def _cursor(request: HttpRequest) -> tuple[int | None, str]:
    """An "older" link's `before=` and, when it is not a whole number, what is wrong with it (the page
    then lists nothing and says so: `?before=abc` showed the newest page as if it were the older one)."""
    raw = request.GET.get("before", "")
    number = ascii_int(raw)
    if raw and number is None:
        return None, f"“{raw[:40]}” is not a place in this list: follow the page's own “Older” link, or start from the newest."
    return number, ""


def _int(raw: Any) -> int | None:
    try:
        return int(raw) if raw not in (None, "") else None
    except (TypeError, ValueError):
        return None


# -- version viewer ----------------------------------------------------------------------------------


@login_required
@_explains_unshown_versions
def version_detail(request: HttpRequest, session_id: Any, number: int) -> HttpResponse:
    session, role = _member_session(request, session_id)
    version = _version(session, number)
    pointer = request.GET.get("pointer", "")
    offset = max(_int(request.GET.get("offset")) or 0, 0)  # a negative offset would slice from the end
    query = request.GET.get("q", "").strip()
    state = selectors.version_state(version)
    context: dict[str, Any] = {**_base(session, role), "version": version, "pointer": pointer, "query": query,
                               "timeline_at": _timeline_at(session, version.number)}
    if version.kind == VersionKind.DATA_FIX and not wants_fragment(request):
        context["fixed_from"] = selectors.data_fix_base(version)
    status = 200
    try:
        value = jsonview.resolve(state, pointer)
    except jsonview.PointerError as exc:
        if wants_fragment(request):
            raise Http404(str(exc)) from None
        # A part this version lacks (a pointer carried over from another version's address): the generic
        # 404 said the whole page might be deleted or another project's. Say which part, show the state.
        context.update(missing=pointer, missing_why=str(exc), pointer="")
        pointer, value, status = "", state, 404
    entries, next_offset = jsonview.level(value, pointer, offset=offset)
    kind = jsonview.kind_of(value)
    context.update(
        entries=entries,
        next_offset=next_offset,
        kind=kind,
        # A string reads as its text (a traceback's lines as lines, not one line of "\n"), a page at a time.
        text=jsonview.text_page(value, offset) if kind == "string" else None,
        scalar=None if entries or kind in ("object", "array", "string") else jsonview.pretty(value),
        crumbs=_crumbs(pointer),
    )
    if query:
        context["results"], context["results_cut"] = jsonview.search(state, query)
    if wants_fragment(request):
        # The search form always sends q: emptied, its answer empties the results (not a tree level).
        template = "snapshots_app/partials/_search_results.html" if "q" in request.GET else "snapshots_app/partials/_tree_level.html"
        return render(request, template, context)
    return render(request, "snapshots_app/version.html", context, status=status)


def _crumbs(pointer: str) -> list[tuple[str, str]]:
    crumbs = [("state", "")]
    current = ""
    for token in jsonview.parse_pointer(pointer):
        current = jsonview.join_pointer(current, token)
        crumbs.append((token, current))
    return crumbs


@login_required
@_explains_unshown_versions
def version_raw(request: HttpRequest, session_id: Any, number: int) -> HttpResponse:
    session, _ = _member_session(request, session_id)
    version = _version(session, number)
    response = HttpResponse(selectors.version_state_bytes(version), content_type="application/json")
    # Named as the operator knows the session (the engine's id), not by our key: a folder of
    # downloads read "1b843c40-…-v326.json". Characters no file name may hold somewhere (path separators,
    # control characters, Windows' <>:"|?*) become "_", and a long id is cut (file names stop at 255 bytes).
    name = re.sub(r'[\x00-\x1f\x7f/\\<>:"|?*]', "_", session.external_id)[:120]
    response["Content-Disposition"] = content_disposition_header(True, f"{name}-v{version.number}.json")
    return response


# -- diff --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShownChange:
    path: str
    string_path: str
    inner_path: str
    context: str
    kind: str
    old: str
    new: str
    pieces: list[tuple[str, str]] | None


# What the old and new values of one diff page show together: 500 changes of values at VALUE_SHOWN
# each would be 20 MB of HTML. Past it, each value shows its first VALUE_SHOWN_PAST_BUDGET characters.
PAGE_VALUES_SHOWN = 1_000_000
VALUE_SHOWN_PAST_BUDGET = 300


class _Room:
    """The characters of values a diff page may still show (PAGE_VALUES_SHOWN)."""

    def __init__(self) -> None:
        self.left = PAGE_VALUES_SHOWN

    def text(self, value: Any) -> str:
        text = jsonview.pretty(value)
        limit = max(VALUE_SHOWN_PAST_BUDGET, min(VALUE_SHOWN, self.left))
        self.left -= min(len(text), limit)
        return text if len(text) <= limit else text[:limit] + "\n… (cut; download the raw JSON for all of it)"


def shown_changes(changes: list[dict[str, Any]]) -> list[ShownChange]:
    shown = []
    budget = jsonview.TextDiffBudget()  # for the whole page: 500 long strings must not take half a minute
    room = _Room()
    for change in changes[:DIFF_SHOWN]:
        string_path = change.get("string_path", "")
        full = string_path + change["path"] if string_path else change["path"]
        old, new = change.get("old"), change.get("new")
        long_text = change["kind"] == "changed" and jsonview.is_long_text(old, new)
        pieces = None
        if long_text:
            old_text, new_text = str(old), str(new)  # (both strings: is_long_text says so)
            if len(old_text) + len(new_text) <= room.left:
                # A text diff spells both strings (side by side, each whole); shown instead of old/new.
                pieces = jsonview.collapse_unchanged(jsonview.text_diff(old_text, new_text, budget))
                room.left -= len(old_text) + len(new_text)
        shown.append(ShownChange(
            path=full or "/",
            string_path=string_path,
            inner_path=change["path"],
            context=full.rsplit("/", 1)[0] or "/",
            kind=change["kind"],
            old=room.text(old) if "old" in change and pieces is None else "",
            new=room.text(new) if "new" in change and pieces is None else "",
            pieces=pieces,
        ))
    return shown


def diff_display(result: DiffResult | None, offset: int = 0) -> dict[str, Any]:
    """What the one diff fragment (_diff_body.html) shows of a diff, wherever it appears (diff page,
    rewind confirmation, admin data fix): DIFF_SHOWN changes from `offset` on, saying which when there
    are more (the diff page links the pages before and after), and the JSON Patch only whole (a cut
    patch is not JSON)."""
    if result is None:
        return {"changes": [], "counts": None, "total": 0, "cut": False, "patch": "", "patch_size": 0}
    total = len(result.changes)
    offset = min(max(0, offset), (total - 1) // DIFF_SHOWN * DIFF_SHOWN if total else 0)  # (a page that exists)
    changes = shown_changes(result.changes[offset : offset + DIFF_SHOWN])
    patch = orjson.dumps(result.patch)  # (measured for its size even when not shown: orjson, not json)
    return {
        "changes": changes, "counts": result.counts, "total": total, "cut": total > DIFF_SHOWN,
        "shown_from": offset + 1, "shown_to": offset + len(changes),
        "prev_offset": max(0, offset - DIFF_SHOWN) if offset else None,
        "next_offset": offset + DIFF_SHOWN if offset + DIFF_SHOWN < total else None,
        "patch": patch.decode() if len(patch) <= VALUE_SHOWN else "", "patch_size": len(patch),
    }


@login_required
@_explains_unshown_versions
def version_diff(request: HttpRequest, session_id: Any) -> HttpResponse:
    session, role = _member_session(request, session_id)
    to_version = _version(session, request.GET.get("to") or session.head_number)
    from_session = session
    if request.GET.get("from_session") and request.GET["from_session"] != str(session.pk):
        try:
            from_session, _ = session_for_member(user=request.user, session_id=request.GET["from_session"])
        except NotFound:
            # Said of the session this page is about ("Nothing here at /sessions/<it>/diff/: it may have
            # been deleted"), the 404 sent the reader looking at the wrong session.
            explained = (f"There is no session {request.GET['from_session'][:80]!r} to compare {session.external_id} "
                         "with: it may have been deleted, or it belongs to a project you are not a member of.")
            return render(request, "404.html", {"request_path": request.path, "explained": explained}, status=404)
        if from_session.project_id != session.project_id:
            # As the API answers it (400): both sessions are the reader's, so a 404 saying one "may have been
            # deleted, or belongs to a project you are not a member of" was untrue.
            explained = (f"{from_session.external_id} is in {from_session.project.name} and {session.external_id} in "
                         f"{session.project.name}: versions of different projects cannot be compared, as nothing is "
                         "shared across projects.")
            return render(request, "snapshots_app/diff_refused.html", {"session": session, "explained": explained},
                          status=400)
    from_version, removed = None, None
    if request.GET.get("from"):
        from_version = _version(from_session, request.GET["from"])
    elif from_session is session:
        # The previous version is the newest one below, not number - 1: retention may have removed
        # the versions between (a "vs previous" link to one of them was a 404 saying nothing).
        from_version = selectors.version_before(session, to_version.number)
        below = from_version.number if from_version is not None else 0
        removed = (below + 1, to_version.number - 1) if below < to_version.number - 1 else None
    if from_version is None:
        # A session's first version: against what it came from (a fork's source), else itself.
        parent = to_version.parent
        from_version = _version(parent.session, parent.number) if parent else to_version
        from_session = from_version.session if parent else from_session
    mode = "side" if request.GET.get("mode") == "side" else "inline"
    result = selectors.version_diff(from_version, to_version)
    shown = diff_display(result, offset=_int(request.GET.get("offset")) or 0)
    on_page = f"&offset={shown['shown_from'] - 1}" if shown.get("shown_from", 1) > 1 else ""
    context = {
        **_base(session, role),
        "from_version": from_version,
        "to_version": to_version,
        "from_session": from_session,
        "removed": removed,
        **shown,
        "mode": mode,
        "timeline_at": _timeline_at(session, to_version.number),
        "query_inline": _diff_query(from_session, from_version, to_version, "inline") + on_page,
        "query_side": _diff_query(from_session, from_version, to_version, "side") + on_page,
        "query_page": _diff_query(from_session, from_version, to_version, mode),
    }
    return render_fragment(request, "snapshots_app/diff.html", "snapshots_app/partials/_diff_body.html", context)


def _diff_query(from_session: WorkflowSession, a: Version, b: Version, mode: str) -> str:
    return f"from_session={from_session.pk}&from={a.number}&to={b.number}&mode={mode}"


# -- path history ------------------------------------------------------------------------------------


@login_required
@_explains_unshown_versions
def path_history(request: HttpRequest, session_id: Any) -> HttpResponse:
    session, role = _member_session(request, session_id)
    pointer = request.GET.get("path", "").strip()
    before, cursor_problem = _cursor(request)
    # A path typed without its leading "/" ("counters/tokens") is no JSON pointer: it was listed as
    # absent from every version, as if the value had never existed. Say so, and offer the path meant.
    problem = pointer and not pointer.startswith("/")
    points = (selectors.path_history(session, pointer, before=before)
              if pointer and not problem and not cursor_problem else [])
    # Older versions are there to show unless the oldest shown is the oldest kept (v1, or after a
    # retention run the oldest it left: "Older versions" there led to an empty page).
    older = bool(points) and selectors.version_before(session, points[0].number) is not None
    context = {**_base(session, role), "pointer": pointer, "points": points, "problem": problem, "older": older,
               "cursor_problem": cursor_problem,
               "changes": [(p, p.shown) for p in reversed(points) if p.changed or p is points[0]],
               "chart": _chart(points), "nowhere": bool(points) and not any(p.present for p in points)}
    return render(request, "snapshots_app/history.html", context, status=400 if problem or cursor_problem else 200)


def _chart(points: list[selectors.PathPoint]) -> dict[str, Any] | None:
    """An inline SVG polyline of a numeric value over versions (None unless it is numeric)."""
    numeric = [(p.number, p.value) for p in points
               if p.present and isinstance(p.value, (int, float)) and not isinstance(p.value, bool)]
    if len(numeric) < 2:
        return None
    width, height, pad = 600, 160, 8
    low, high = min(v for _, v in numeric), max(v for _, v in numeric)
    first, last = numeric[0][0], numeric[-1][0]
    span_x, span_y = max(last - first, 1), (high - low) or 1

    def x(n: int) -> float:
        return round(pad + (n - first) / span_x * (width - 2 * pad), 1)

    def y(v: float) -> float:
        return round(height - pad - (v - low) / span_y * (height - 2 * pad), 1)

    return {"width": width, "height": height, "low": low, "high": high, "first": first, "last": last,
            "points": " ".join(f"{x(n)},{y(v)}" for n, v in numeric),
            "dots": [(x(n), y(v), n, v) for n, v in numeric]}


# -- rewind, fork, pin, label (operators) ------------------------------------------------------------




@login_required
@require_http_methods(["GET", "POST"])
@_explains_unshown_versions
def rewind_confirm(request: HttpRequest, session_id: Any, number: int) -> HttpResponse:
    """GET shows what the head will become; POST rewinds (audited by the service)."""
    session, role = _member_session(request, session_id)
    _require_operator(role)
    target = _version(session, number)
    error, status, sent_before = "", 200, False
    form = RewindForm(request.POST if request.method == "POST" else None)
    head = selectors.head_version(session)
    if target.number == session.head_number:  # a new head equal to the head would record nothing new
        error, status = f"v{target.number} is the head already: there is nothing to rewind to.", 400
    elif head is not None and _rewinds_to_itself(head, target) and not _acted_before(session, request):
        # A rewind repeated from Back (the page reloads with a new request key) wrote the same head again.
        error = (f"The head, v{head.number}, already has v{target.number}'s state, status, step and error: a rewind "
                 "would write nothing new, so none is offered.")
        status = 409 if request.method == "POST" else 200
    elif session.archived_at is not None:
        # Said before a reason is written (the page stays reachable: a tab opened before the archiving,
        # a bookmark), not after; the service refuses it all the same.
        error, status = "This session is archived: it takes no writes. Unarchive it on the session page to rewind it.", 409
    elif request.method == "POST" and not form.is_valid():
        error, status = " ".join(form_problems(form)), 400
    elif request.method == "POST":
        try:
            version = services.snapshot_rewind(
                session=session, to_version=target.number, reason=form.cleaned_data["reason"],
                expected_version=form.cleaned_data["expected_version"], actor=request.user,
                idempotency_key=form.cleaned_data["request_key"] or None,
            )
        except IdempotencyKeyReused:
            error, status, sent_before = FORM_SENT_BEFORE, 409, True
            session, role = _member_session(request, session_id)
        except VersionConflict as exc:
            # In the page's words, not the API's ("expected head version 6 but the head is 7"): the page
            # below now shows what the rewind does from the new head.
            error, status = (f"v{exc.details['head']} was written since this page was shown: nothing was rewound. "
                             "Check what the head becomes from it, below, and confirm again."), exc.status
            session, role = _member_session(request, session_id)
        except StateStoreError as exc:
            error, status = exc.message, exc.status
            session, role = _member_session(request, session_id)
        else:
            messages.success(request, f"Rewound to version {target.number}: the new head is version {version.number}.")
            return redirect("snapshots:session", session_id=session.pk)
        head = selectors.head_version(session)  # (it may have moved: the refusal above read it again)
    refused = (target.number == session.head_number or session.archived_at is not None
               or (head is not None and _rewinds_to_itself(head, target)))
    result, damaged = None, ""
    if head is not None and not refused:
        try:
            result = selectors.version_diff(head, target)
        except IntegrityProblem as exc:
            # A damaged head is when a rewind is needed most: the page still offers it, without the
            # diff (it was a "Server error", so a rewind from here could not be done at all).
            damaged = exc.message
            if exc.details.get("version") == target.number and exc.details.get("session") == str(session.pk):
                refused, status = True, exc.status
                error = f"v{target.number} cannot be read ({exc.message}): a head rewound to it could not be read either."
    context = {
        **_base(session, role), "target": target, "head": head, "error": error, **diff_display(result), "mode": "inline",
        "refused": refused, "engine_active": selectors.engine_active(session), "damaged": damaged,
        "reason": request.POST.get("reason", ""), "request_key": _request_key(request, fresh=sent_before),
        "timeline_at": _timeline_at(session, target.number), "target_problem": selectors.open_integrity_problem(target),
    }
    return render(request, "snapshots_app/confirm_rewind.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
@_explains_unshown_versions
def fork_confirm(request: HttpRequest, session_id: Any, number: int) -> HttpResponse:
    session, role = _member_session(request, session_id)
    _require_operator(role)
    source = _version(session, number)
    error, status, sent_before = "", 200, False
    form = ForkForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and not form.is_valid():
        error, status = " ".join(form_problems(form)), 400
    elif request.method == "POST":
        try:
            fork = services.snapshot_fork(
                session=session, from_version=source.number, reason=form.cleaned_data["reason"], actor=request.user,
                external_id=form.cleaned_data["external_id"] or None, idempotency_key=form.cleaned_data["request_key"] or None,
            )
        except IdempotencyKeyReused:
            error, status, sent_before = FORM_SENT_BEFORE, 409, True
        except StateStoreError as exc:
            error, status = exc.message, exc.status
        else:
            messages.success(request, f"Forked version {source.number} of {session.external_id} into this session.")
            return redirect("snapshots:session", session_id=fork.pk)
    context = {**_base(session, role), "source": source, "error": error, "request_key": _request_key(request, fresh=sent_before),
               "reason": request.POST.get("reason", ""), "external_id": request.POST.get("external_id", ""),
               "timeline_at": _timeline_at(session, source.number), "target_problem": selectors.open_integrity_problem(source)}
    return render(request, "snapshots_app/confirm_fork.html", context, status=status)


def _acted_before(session: WorkflowSession, request: HttpRequest) -> bool:
    """Whether this POST repeats one that wrote (a double click): the service gives its first answer."""
    key = request.POST.get("request_key", "") if request.method == "POST" else ""
    return bool(key) and selectors.written_with_key(session, key)


def _rewinds_to_itself(head: Version, target: Version) -> bool:
    """Whether a rewind to `target` would write a head the same as `head` in everything it copies
    (services.copied_fields). One that changes any of them (back to an earlier step of an unchanged
    state) is still offered."""
    return all(getattr(head, name) == value for name, value in services.copied_fields(target).items())


# Back on a confirm page whose form already acted, then sent with other values: nothing is done (the
# key is the first action's), and the page, now current, gets a new key to act again on purpose.
FORM_SENT_BEFORE = (
    "This form was already sent, with other values, and acted then; nothing more was done now. "
    "The page now shows the session as it is: send the form again to act again."
)


def _request_key(request: HttpRequest, *, fresh: bool = False) -> str:
    """The key a confirm page's form sends back: a new one when the page opens (or `fresh`), the same
    one when it is shown again with an error. Each request carrying it acts at most once (a double
    click, or a resend after a lost answer, gets the first answer)."""
    return (not fresh and request.POST.get("request_key")) or f"ui-{uuid.uuid4().hex}"


@login_required
@require_POST
@_explains_unshown_versions
def version_mark(request: HttpRequest, session_id: Any, number: int) -> HttpResponse:
    """Pin / unpin or label a version from the timeline; answers htmx with the updated row."""
    session, role = _member_session(request, session_id)
    _require_operator(role)
    version = _version(session, number)
    form = MarkForm(request.POST)
    if not form.is_valid():
        problem = " ".join(form_problems(form))
        if wants_fragment(request):
            return HttpResponse(problem, status=400, content_type=PLAIN_TEXT)
        # The timeline again, saying what was wrong and of which version (its rows all have the form):
        # nothing was changed.
        messages.error(request, f"v{version.number} was not changed. {problem}")
        response = session_detail(request, session.pk)
        response.status_code = 400
        return response
    try:
        if "pinned" in request.POST:
            version = services.version_pin(version=version, pinned=form.cleaned_data["pinned"] == "1", actor=request.user)
        if "label" in request.POST:
            version = services.version_label(version=version, label=form.cleaned_data["label"], actor=request.user)
    except StateStoreError as exc:
        if wants_fragment(request):
            return HttpResponse(exc.message, status=exc.status, content_type=PLAIN_TEXT)
        messages.error(request, exc.message)
    if wants_fragment(request):
        version = selectors.timeline_page(session, before=version.number + 1, limit=1)[0]
        # A label edit answers with the label form still open, so the keyboard stays in it.
        return render(request, "snapshots_app/partials/_version_row.html",
                      {**_base(session, role), "v": version, "labeling": "label" in request.POST})
    # Back to a timeline page that shows the version, whose row says what became of it: not always the
    # newest page (#v-N led nowhere once the version was older than its 50 rows), and unfiltered (a filter
    # it left, unpinned on "pinned", would hide it).
    return redirect(_timeline_at(session, version.number))


@login_required
@require_http_methods(["GET", "POST"])
def archive_confirm(request: HttpRequest, session_id: Any) -> HttpResponse:
    """GET shows what archiving does, warning while an engine may still write to the session; POST
    archives (audited by the service). Archiving twice changes nothing: a double click, or a page
    another operator beat to it, says so."""
    session, role = _member_session(request, session_id)
    _require_operator(role)
    error, status = "", 200
    form = ReasonForm(request.POST if request.method == "POST" else None)
    if session.archived_at is not None:
        archived = f"This session is archived already (since {session.archived_at:%Y-%m-%d %H:%M}): nothing was changed."
        if request.method == "POST":
            messages.info(request, archived)
            return redirect("snapshots:session", session_id=session.pk)
        error, status = archived, 409
    elif request.method == "POST" and not form.is_valid():
        error, status = " ".join(form_problems(form)), 400
    elif request.method == "POST":
        session_services.session_archive(session=session, reason=form.cleaned_data["reason"], actor=request.user)
        messages.success(request, "Archived: the history is kept and new writes are refused.")
        return redirect("snapshots:session", session_id=session.pk)
    context = {
        **_base(session, role), "error": error, "refused": session.archived_at is not None,
        "engine_active": selectors.engine_active(session),
        "reason": request.POST.get("reason", ""),
    }
    return render(request, "snapshots_app/confirm_archive.html", context, status=status)


TRIM_KEEP_DEFAULT = 100


@login_required
@require_http_methods(["GET", "POST"])
def trim_confirm(request: HttpRequest, session_id: Any) -> HttpResponse:
    """GET says what a trim keeps; POST removes every version but the newest N and those retention
    would keep (project admins, as the API's trim; audited by the service). The head the page showed
    is the expected version: a write since then is a conflict, not a trim of versions nobody saw."""
    session, role = _member_session(request, session_id)
    if not role_allows(role, Role.ADMIN):
        raise PermissionDenied("project admins only: a trim removes history")
    error, status = "", 200
    form = TrimForm(request.POST if request.method == "POST" else None)
    refused = session.archived_at is not None or session.head_number == 0
    if session.archived_at is not None:
        error, status = "This session is archived: it keeps its whole history. Unarchive it on the session page to trim it.", 409
    elif session.head_number == 0:
        error, status = "This session has no versions yet: there is nothing to trim.", 409
    elif request.method == "POST" and not form.is_valid():
        error, status = " ".join(form_problems(form)), 400
    elif request.method == "POST":
        keep = selectors.newest_version_numbers(session, form.cleaned_data["keep_newest"])
        try:
            outcome = services.session_trim(
                session=session, keep=keep, reason=form.cleaned_data["reason"],
                expected_version=form.cleaned_data["expected_version"], actor=request.user,
            )
        except VersionConflict as exc:
            error, status = (f"v{exc.details['head']} was written since this page was shown, so the newest versions are "
                             "not the ones you saw: nothing was removed. Look again, then trim."), exc.status
            session, role = _member_session(request, session_id)
        except StateStoreError as exc:
            error, status = exc.message, exc.status
            session, role = _member_session(request, session_id)
        else:
            messages.success(request, _trimmed(outcome))
            return redirect("snapshots:session", session_id=session.pk)
    asked = request.POST.get("keep_newest") if request.method == "POST" else request.GET.get("keep_newest")
    keep_newest = _int(asked)
    if keep_newest is None or not 1 <= keep_newest <= services.MAX_TRIM_KEEP:
        keep_newest = None if asked else TRIM_KEEP_DEFAULT
    context = {
        **_base(session, role), "error": error, "refused": refused,
        "reason": request.POST.get("reason", ""), "keep_newest": asked or TRIM_KEEP_DEFAULT,
        "max_keep": services.MAX_TRIM_KEEP,
        "preview": _trim_preview(session, keep_newest) if not refused and keep_newest else None,
    }
    if wants_fragment(request) and request.method == "GET":  # the number typed changed: what goes then
        return render(request, "snapshots_app/partials/_trim_preview.html", context)
    return render(request, "snapshots_app/confirm_trim.html", context, status=status)


@dataclass(frozen=True)
class TrimPreview:
    keep_newest: int
    removed: int
    removed_ranges: str
    newest: str
    protected: str


def _trim_preview(session: WorkflowSession, keep_newest: int) -> TrimPreview:
    """What a trim keeping the newest `keep_newest` would remove and keep besides, as the page shows it
    before the irreversible click (it said only "keep the newest N")."""
    newest = selectors.newest_version_numbers(session, keep_newest)
    plan = selectors.trim_plan(session, set(newest))
    ranges = session_selectors.number_ranges
    return TrimPreview(keep_newest=keep_newest, removed=len(plan.removed), removed_ranges=ranges(plan.removed),
                       newest=ranges(sorted(newest)), protected=ranges(sorted(plan.protected)))


def _trimmed(outcome: services.TrimOutcome) -> str:
    if not outcome.removed:
        return "Nothing was removed (every version is one you kept or one a trim keeps besides), and nothing was recorded."
    protected = len(outcome.protected)
    return (f"Removed {len(outcome.removed):,} version{'s' if len(outcome.removed) != 1 else ''}; "
            f"{len(outcome.kept):,} kept"
            + (f", {protected:,} of them older ones that are pinned, labelled, forked from or restored by a kept rewind"
               if protected else "") + ".")


@login_required
@require_POST
def session_unarchive(request: HttpRequest, session_id: Any) -> HttpResponse:
    """Accept writes again (one click: it takes nothing away); operators, audited."""
    session, role = _member_session(request, session_id)
    _require_operator(role)
    form = ReasonForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(form_problems(form)))
    else:
        session_services.session_unarchive(session=session, reason=form.cleaned_data["reason"], actor=request.user)
        messages.success(request, "Unarchived: the session accepts writes again.")
    return redirect("snapshots:session", session_id=session.pk)


# -- exports -----------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def session_export(request: HttpRequest, session_id: Any) -> HttpResponse:
    """POST queues an export of this session (operators, as the API's); its progress and download link
    appear on the session page, live. GET is that page's exports section, as it is now."""
    session, role = _member_session(request, session_id)
    _require_operator(role)
    if request.method == "GET":
        return render(request, "snapshots_app/partials/_exports.html",
                      {"session": session, "exports": selectors.session_exports(session)})
    if session.head_number == 0:
        messages.error(request, "This session has no versions yet: there is nothing to export.")
    else:
        job, new = transfer.transfer_session_export_start(session=session, actor=request.user)
        if new:
            messages.success(request, "Export started: its progress, then its download link, show under the "
                                      "session's header.")
        else:
            messages.info(request, f"Export #{job.pk} of this session is still under way: its download link shows "
                                   "under the session's header when it is done.")
    return redirect(reverse("snapshots:session", kwargs={"session_id": session.pk}) + "#exports")


@login_required
@require_GET
def export_download(request: HttpRequest, session_id: Any, job_id: int) -> HttpResponseBase:
    """A finished export of this session, as the file (operators: it holds every state)."""
    session, role = _member_session(request, session_id)
    _require_operator(role)
    job = selectors.session_export_job(session, job_id)
    if job is None:
        raise Http404("no such export of this session")
    try:
        path = transfer.export_file(job=job)
    except InvalidState as exc:
        messages.error(request, f"Export #{job.pk}: {exc.message}.")
        return redirect(reverse("snapshots:session", kwargs={"session_id": session.pk}) + "#exports")
    return file_download(request, path, "application/x-ndjson")

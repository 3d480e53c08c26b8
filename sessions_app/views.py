"""Dashboard pages for projects and sessions. Thin: selectors read, services write."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render

from config.middleware import on_this_site
from sessions_app.forms import SESSION_SORT_CHOICES, SessionFilterForm, form_problems
from sessions_app.models import SessionStatus
from sessions_app.selectors import LIVE_TOP_SORTS, projects_for_user, session_list


def render_fragment(
    request: HttpRequest, page: str, fragment: str, context: dict[str, Any], *, status: int = 200
) -> HttpResponse:
    """The whole page for plain and boosted requests; only the fragment for htmx requests that
    target part of the page (links keep a real href, so every page also works without htmx)."""
    template = fragment if wants_fragment(request) else page
    return render(request, template, context, status=status)


def wants_fragment(request: HttpRequest) -> bool:
    """An htmx request that swaps part of a page (boosted ones replace the whole page)."""
    htmx = getattr(request, "htmx", None)
    return bool(htmx and not htmx.boosted)


@login_required
def session_list_view(request: HttpRequest) -> HttpResponse:
    projects = list(projects_for_user(request.user))
    slug = request.GET.get("project")
    project = next((p for p in projects if p.slug == slug), None) if slug else (projects[0] if projects else None)
    if project is None and slug:
        # It showed the first project's sessions under that link, as if they were the ones it named.
        explained = (f"You have no project {slug[:80]!r}: it does not exist, or you are not a member of it. "
                     "Nothing is listed for it.")
        return render(request, "404.html", {"request_path": request.path, "explained": explained}, status=404)
    form = SessionFilterForm(request.GET)
    if form.is_valid():
        filters, after, problems = form.filters(), form.cleaned_data["after"], []
    else:
        # Nothing is listed for a query the database cannot run (a NUL byte, February 30th): say what is
        # wrong, and keep showing the filters that were fine.
        filters, after, problems = form.filters(), "", form_problems(form)
    sessions, next_cursor = (
        session_list(project=project, filters=filters, after=after) if project and not problems else ([], "")
    )
    query = request.GET.copy()
    query.pop("after", None)
    if project:
        query["project"] = project.slug
    context = {
        "projects": projects,
        "project": project,
        "sessions": sessions,
        "filters": filters,
        "statuses": SessionStatus.choices,
        "sorts": SESSION_SORT_CHOICES,
        "next_cursor": next_cursor,
        "base_query": query.urlencode(),
        # Sessions go on top live only where they belong: on the first page in the order of latest
        # activity or newest first (the socket's address carries the filters they must match).
        "live_top": filters.sort in LIVE_TOP_SORTS and not after and not problems,
        "live_query": live_query(query),
        "is_next_page": bool(after),
        "problems": problems,
    }
    fragment = "sessions_app/partials/_session_rows.html" if after else "sessions_app/partials/_session_table.html"
    return render_fragment(request, "sessions_app/list.html", fragment, context, status=400 if problems else 200)


def live_query(query: QueryDict) -> str:
    """The session list socket's query for a list page's address query: its filters, on top."""
    live = query.copy()
    live.pop("project", None)
    live["top"] = "1"
    return live.urlencode()


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW. A form from a page loaded before its user signed in again (in another tab,
    or after the sign-in expired) carries a token that no longer counts. Django's own page answered
    it in developer's words ("CSRF verification failed. Request aborted."), outside the layout, with
    no way back; an htmx action showed its stylesheet as the reason. Nothing was done either way."""
    from django.middleware.csrf import REASON_NO_CSRF_COOKIE

    if reason == REASON_NO_CSRF_COOKIE:
        message = ("Your browser sent this form without this site's cookie (are cookies blocked for it?): "
                   "nothing was changed.")
    elif reason.startswith(("Origin checking failed", "Referer checking failed")):
        message = ("Your browser says this form came from another address than this site's: nothing was "
                   "changed. (A service reached through a proxy needs its address in CSRF_TRUSTED_ORIGINS.)")
    else:
        message = ("This page was loaded before you last signed in (perhaps in another tab), so its form "
                   "no longer counts: nothing was changed. Reload the page and do it again.")
    if wants_fragment(request):
        return HttpResponse(message, status=403, content_type="text/plain; charset=utf-8")
    back = request.headers.get("Referer", "")
    if not on_this_site(request, back):
        back = ""
    return render(request, "403_csrf.html", {"message": message, "back": back}, status=403)

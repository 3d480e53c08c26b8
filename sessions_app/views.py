"""Dashboard pages for projects and sessions. Thin: selectors read, services write."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from sessions_app.models import SessionStatus
from sessions_app.selectors import SESSION_SORTS, SessionFilters, projects_for_user, session_list


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


def _when(raw: str, *, end_of_day: bool = False) -> datetime | None:
    raw = raw.strip()
    if not raw:
        return None
    moment = parse_datetime(raw)
    if moment is None:
        day = parse_date(raw)
        if day is None:
            return None
        moment = datetime.combine(day, time.min)
        if end_of_day:
            moment += timedelta(days=1)
    return moment if timezone.is_aware(moment) else timezone.make_aware(moment)


def filters_from(request: HttpRequest) -> SessionFilters:
    get = request.GET
    status = get.get("status", "")
    sort = get.get("sort", "-updated")
    return SessionFilters(
        q=get.get("q", "").strip()[:200],
        status=status if status in SessionStatus.values else "",
        workflow=get.get("workflow", "").strip()[:200],
        tag=get.get("tag", "").strip()[:64],
        has_error=get.get("has_error", "") if get.get("has_error") in ("yes", "no") else "",
        updated_from=_when(get.get("updated_from", "")),
        updated_to=_when(get.get("updated_to", ""), end_of_day=True),
        sort=sort if sort in SESSION_SORTS else "-updated",
    )


@login_required
def session_list_view(request: HttpRequest) -> HttpResponse:
    projects = list(projects_for_user(request.user))
    slug = request.GET.get("project")
    project = next((p for p in projects if p.slug == slug), projects[0] if projects else None)
    filters = filters_from(request)
    after = request.GET.get("after", "")
    sessions, next_cursor = session_list(project=project, filters=filters, after=after) if project else ([], "")
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
        "sorts": [("-updated", "Recently updated"), ("updated", "Least recently updated"),
                  ("-created", "Newest"), ("external_id", "External id")],
        "next_cursor": next_cursor,
        "base_query": query.urlencode(),
        # New sessions are prepended live only where they belong: the unfiltered first page.
        "live_new": not filters.active and not after,
        "is_next_page": bool(after),
    }
    fragment = "sessions_app/partials/_session_rows.html" if after else "sessions_app/partials/_session_table.html"
    return render_fragment(request, "sessions_app/list.html", fragment, context)

"""Dashboard pages for projects and sessions. Thin: selectors read, services write."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from sessions_app.models import WorkflowSession
from sessions_app.selectors import projects_for_user


@login_required
def session_list(request: HttpRequest) -> HttpResponse:
    projects = list(projects_for_user(request.user))
    slug = request.GET.get("project")
    project = next((p for p in projects if p.slug == slug), projects[0] if projects else None)
    sessions = (
        WorkflowSession.objects.filter(project=project).order_by("-updated_at", "-id")[:50] if project else []
    )
    return render(request, "sessions_app/list.html", {"projects": projects, "project": project, "sessions": sessions})

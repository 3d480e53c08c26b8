"""Reads of projects, memberships and sessions."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from sessions_app.models import ROLE_RANK, Membership, Project, Role


def projects_for_user(user: Any) -> QuerySet[Project]:
    if not getattr(user, "is_authenticated", False):
        return Project.objects.none()
    return Project.objects.filter(memberships__user=user).order_by("name")


def membership_role(user: Any, project: Project) -> str | None:
    if not getattr(user, "is_authenticated", False):
        return None
    membership = Membership.objects.filter(project=project, user=user).only("role").first()
    return membership.role if membership else None


def role_allows(role: str | None, needed: str) -> bool:
    return role is not None and ROLE_RANK[Role(role)] >= ROLE_RANK[Role(needed)]

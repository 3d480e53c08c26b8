"""Create a project (and make users members of it) from the command line: a fresh deployment's
first step, before any API key can exist. Audited, as the admin's project and member forms are."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils.text import slugify

from sessions_app.models import Project, Role
from sessions_app.services import membership_set, project_create


class Command(BaseCommand):
    help = "Create a project (idempotent) and give existing users a role in it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="the project's slug, e.g. support-bots")
        parser.add_argument("--name", help="display name (default: from the slug)")
        parser.add_argument("--admin", action="append", default=[], metavar="USERNAME", help="make this user an admin")
        parser.add_argument("--operator", action="append", default=[], metavar="USERNAME", help="… an operator")
        parser.add_argument("--viewer", action="append", default=[], metavar="USERNAME", help="… a viewer")

    def handle(self, *args: Any, **options: Any) -> None:
        slug = options["slug"]
        if slugify(slug) != slug:
            raise CommandError(f"{slug!r} is not a slug: use lowercase letters, digits and hyphens (e.g. {slugify(slug)!r})")
        User = get_user_model()
        grants = [(name, role) for role in (Role.ADMIN, Role.OPERATOR, Role.VIEWER) for name in options[role.value]]
        users = {name: User.objects.filter(username=name).first() for name, _ in grants}
        missing = sorted(name for name, user in users.items() if user is None)
        if missing:
            raise CommandError(f"no user {', '.join(missing)} (create it first: manage.py createsuperuser, or the admin)")
        with transaction.atomic():
            project = Project.objects.filter(slug=slug).first()
            created = project is None
            if project is None:
                project = project_create(name=options["name"] or slug.replace("-", " ").title(), slug=slug,
                                         actor_label="manage.py create_project")
            for name, role in grants:
                membership_set(project=project, user=users[name], role=role, actor_label="manage.py create_project")
        self.stdout.write(f"{'created' if created else 'exists:'} project {project.slug} ({project.name})")
        for name, role in grants:
            self.stdout.write(f"  {name}: {role.value}")

"""Create a project (and make users members of it) from the command line: a fresh deployment's
first step, before any API key can exist. Audited, as the admin's project and member forms are."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils.text import slugify

from sessions_app.errors import StateStoreError
from sessions_app.models import Project, Role
from sessions_app.services import membership_set, project_create

SLUG_MAX = Project._meta.get_field("slug").max_length or 100
NAME_MAX = Project._meta.get_field("name").max_length or 200


class Command(BaseCommand):
    help = "Create a project (idempotent) and give existing users a role in it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="the project's slug, e.g. support-bots")
        parser.add_argument("--name", help="display name (default: from the slug)")
        parser.add_argument("--admin", action="append", default=[], metavar="USERNAME", help="make this user an admin")
        parser.add_argument("--operator", action="append", default=[], metavar="USERNAME", help="… an operator")
        parser.add_argument("--viewer", action="append", default=[], metavar="USERNAME", help="… a viewer")

    def handle(self, *args: Any, **options: Any) -> None:
        slug, name = options["slug"], options["name"]
        if not slug or slugify(slug) != slug or len(slug) > SLUG_MAX:
            raise CommandError(f"{slug!r} is not a slug: 1-{SLUG_MAX} lowercase letters, digits and hyphens"
                               + (f" (e.g. {slugify(slug)[:SLUG_MAX]!r})" if slugify(slug) else ""))
        if name is not None and not 0 < len(name.strip()) <= NAME_MAX:
            raise CommandError(f"--name must be 1-{NAME_MAX} characters")
        User = get_user_model()
        grants = [(user, role) for role in (Role.ADMIN, Role.OPERATOR, Role.VIEWER) for user in options[role.value]]
        twice = sorted({user for user, _ in grants if sum(1 for other, _ in grants if other == user) > 1})
        if twice:
            raise CommandError(f"one role per user: {', '.join(twice)} given more than one")
        users = {username: User.objects.filter(username=username).first() for username, _ in grants}
        missing = sorted(username for username, user in users.items() if user is None)
        if missing:
            raise CommandError(f"no user {', '.join(missing)} (create it first: manage.py createsuperuser, or the admin)")
        try:
            with transaction.atomic():
                project = Project.objects.filter(slug=slug).first()
                created = project is None
                if project is None:
                    project = project_create(name=(name or slug.replace("-", " ").title())[:NAME_MAX].strip(),
                                             slug=slug, actor_label="manage.py create_project")
                for username, role in grants:
                    membership_set(project=project, user=users[username], role=role,
                                   actor_label="manage.py create_project")
        except StateStoreError as exc:  # e.g. demoting the project's last admin: refused, nothing changed
            raise CommandError(exc.message) from None
        self.stdout.write(f"{'created' if created else 'exists:'} project {project.slug} ({project.name})")
        if not created and name is not None and name.strip() != project.name:
            self.stdout.write("  (its name is kept: rename it in the admin)")
        for username, role in grants:
            self.stdout.write(f"  {username}: {role.value}")

"""Create a project API key and print it. The key is shown this once; only its hash is stored."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app.errors import InvalidState
from sessions_app.models import Project
from sessions_app.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a project and print it (shown once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="project slug")
        parser.add_argument("--name", required=True, help="a name to recognise the key by, e.g. the engine host")
        parser.add_argument("--scopes", default="read,write", help="comma-separated: read, write, admin")

    def handle(self, *args: Any, **options: Any) -> None:
        project = Project.objects.filter(slug=options["project"]).first()
        if project is None:
            raise CommandError(f"no project with slug {options['project']!r}")
        try:
            api_key, token = api_key_create(
                project=project, name=options["name"], scopes=options["scopes"], actor_label="manage.py create_api_key"
            )
        except InvalidState as exc:
            raise CommandError(exc.message) from None
        self.stderr.write(f"API key {api_key.name!r} for project {project.slug} ({', '.join(api_key.scopes)}); store it now:")
        self.stdout.write(token)

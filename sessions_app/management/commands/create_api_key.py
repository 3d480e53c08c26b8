"""Create a project API key and print it. The key is shown this once; only its hash is stored."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from sessions_app.errors import InvalidState
from sessions_app.models import Project
from sessions_app.services import DEFAULT_EXPIRY, api_key_create


class Command(BaseCommand):
    help = "Create an API key for a project and print it (shown once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="project slug")
        parser.add_argument("--name", required=True, help="a name to recognise the key by, e.g. the engine host")
        parser.add_argument("--scopes", default="read,write", help="comma-separated: read, write, admin")
        parser.add_argument(
            "--expires-in-days", type=int, default=None, metavar="DAYS",
            help="the key stops working after this many days; 0 = never (default: API_KEY_DEFAULT_LIFETIME_DAYS)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        project = Project.objects.filter(slug=options["project"]).first()
        if project is None:
            raise CommandError(f"no project with slug {options['project']!r}")
        days = options["expires_in_days"]
        if days is not None and not 0 <= days <= 36500:
            raise CommandError("--expires-in-days must be from 0 (never) to 36500")
        expires_at = DEFAULT_EXPIRY if days is None else (timezone.now() + timedelta(days=days) if days else None)
        try:
            api_key, token = api_key_create(
                project=project, name=options["name"], scopes=options["scopes"], expires_at=expires_at,
                actor_label="manage.py create_api_key",
            )
        except InvalidState as exc:
            raise CommandError(exc.message) from None
        expiry = f"expires {api_key.expires_at:%Y-%m-%d %H:%M} UTC" if api_key.expires_at else "never expires"
        self.stderr.write(
            f"API key {api_key.name!r} for project {project.slug} ({', '.join(api_key.scopes)}; {expiry}); store it now:"
        )
        self.stdout.write(token)

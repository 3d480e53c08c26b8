"""Turn configuration and connectivity failures into one clear line instead of a traceback wall.

Operators meet these first (a typo in DATABASE_URL, a database that is down); the message must say
what is wrong and where, and the exit status must be non-zero.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def describe_startup_error(exc: BaseException) -> str | None:
    """A one-line description for errors that mean "the environment is wrong", else None."""
    from django.core.exceptions import ImproperlyConfigured
    from django.db import OperationalError

    if isinstance(exc, ImproperlyConfigured):
        return f"configuration error: {exc}"
    if isinstance(exc, OperationalError):
        from django.db import connection

        settings_dict = connection.settings_dict
        where = f"{settings_dict.get('ENGINE', '?').rsplit('.', 1)[-1]} database {settings_dict.get('NAME')!s}"
        if settings_dict.get("HOST"):
            where += f" at {settings_dict['HOST']}:{settings_dict.get('PORT') or 'default port'}"
        from sessions_app.errors import first_line

        return f"database unreachable: {where}: {first_line(exc)}"
    return None


def run_with_clear_errors(argv: Sequence[str]) -> None:
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(list(argv))
    except Exception as exc:  # re-raised below unless it is an environment problem
        message = describe_startup_error(exc)
        if message is None:
            raise
        print(f"session-rewind: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def settings_or_exit() -> None:
    """Load the settings now, exiting with one line if the environment is wrong: for the entry
    points that are not manage.py (the ASGI app under uvicorn, the Celery worker and beat), which
    would otherwise show a traceback, or start and fail on every request."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        settings.INSTALLED_APPS  # noqa: B018 - touching a setting loads the module
    except ImproperlyConfigured as exc:
        print(f"session-rewind: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None

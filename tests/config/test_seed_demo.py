"""The demo data `make run` loads: its login's password is published in README."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from sessions_app.models import Project, WorkflowSession


@pytest.mark.django_db
def test_seed_demo_refuses_a_real_database_unless_told_it_is_a_throwaway_one():
    """Run in a shell where DATABASE_URL names a real database, it made `operator` / `rewind-demo` a
    superuser there. (The suite runs on PostgreSQL: DATABASE_URL is set.)"""
    with pytest.raises(CommandError, match="password is published"):
        call_command("seed_demo", stdout=StringIO())
    assert not get_user_model().objects.exists() and not Project.objects.exists()

    out = StringIO()
    call_command("seed_demo", on_real_database=True, stdout=out)
    assert "operator / rewind-demo" in out.getvalue()
    assert get_user_model().objects.get(username="operator").is_superuser
    assert WorkflowSession.objects.filter(project__slug="demo").count() == 4  # three seeded and a fork
    # Each seeded conversation is its own: none reads as "Stored: 0 bytes" because it repeats another's states.
    seeded = WorkflowSession.objects.filter(project__slug="demo").exclude(external_id__endswith="-alt")
    assert all(session.stored_bytes > 0 for session in seeded)

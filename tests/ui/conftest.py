"""Fixtures for the dashboard tests: a project with an operator and a viewer, a session with history."""

from __future__ import annotations

from typing import Any

import pytest

from config.celery import app as celery_app
from sessions_app.models import Role
from sessions_app.services import membership_set
from snapshots_app.services import snapshot_record
from tests.factories import make_project, make_session, make_user

PASSWORD = "pw-for-tests-1"


@pytest.fixture(autouse=True)
def _finalize_in_process():
    """Run the finalize task in-process, so summaries exist without a worker (and nothing is queued)."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def operator(db):
    return make_user("olga")


@pytest.fixture
def viewer(db):
    return make_user("victor")


@pytest.fixture
def team(db, operator, viewer):
    project = make_project("acme")
    membership_set(project=project, user=operator, role=Role.OPERATOR)
    membership_set(project=project, user=viewer, role=Role.VIEWER)
    return project


def record_history(session: Any, count: int, *, start: int = 1) -> list[Any]:
    versions = []
    for step in range(start, start + count):
        versions.append(snapshot_record(
            session=session,
            state={"counters": {"steps": step, "tokens": 100 * step}, "pointer": f"step-{step}",
                   "notes": "line one\nline two\n" + f"step {step} says hello", "queue": list(range(step % 3))},
            step=f"step-{step}", status="running",
        ))
    return versions


@pytest.fixture
def story(team, django_capture_on_commit_callbacks):
    session = make_session(team, "run-42", workflow="research", tags=["nightly"])
    with django_capture_on_commit_callbacks(execute=True):
        record_history(session, 5)
    session.refresh_from_db()
    return session

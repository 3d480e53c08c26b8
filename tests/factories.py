"""Small builders for test data, going through the services like real callers do."""

from __future__ import annotations

import hashlib
from typing import Any

from django.contrib.auth import get_user_model

from sessions_app.models import Project, Role, WorkflowSession
from sessions_app.services import membership_set, project_create, session_get_or_create


def make_user(username: str, *, password: str = "pw-for-tests-1", staff: bool = False) -> Any:
    User = get_user_model()
    return User.objects.create_user(username, password=password, is_staff=staff)


def make_project(slug: str, *, owner: Any = None, role: str = Role.ADMIN) -> Project:
    project = project_create(name=slug.title(), slug=slug)
    if owner is not None:
        membership_set(project=project, user=owner, role=role)
    return project


def make_session(project: Project, external_id: str, **kwargs: Any) -> WorkflowSession:
    session, _ = session_get_or_create(project=project, external_id=external_id, **kwargs)
    return session


def agent_state(step: int, *, history: int = 0, message_size: int = 200) -> dict[str, Any]:
    """A realistic agent context after `step` steps."""
    return {
        "messages": [
            {"role": "user" if i % 2 else "assistant", "content": f"message {i} " + _text(i, message_size), "i": i}
            for i in range(history + step)
        ],
        "counters": {"steps": step, "tokens": 1000 + step * 37},
        "pointer": f"step-{step}",
        "queue": [f"task-{j}" for j in range(step % 4)],
        "error": None,
    }


def _text(seed: int, size: int) -> str:
    """Deterministic text that compresses about as well as prose (not like "xxxx")."""
    words = []
    counter = 0
    while sum(len(w) + 1 for w in words) < size:
        digest = hashlib.sha256(f"{seed}-{counter}".encode()).hexdigest()
        words.extend(digest[i : i + 2 + int(digest[i], 16) % 7] for i in range(0, 56, 8))
        counter += 1
    return " ".join(words)[:size]

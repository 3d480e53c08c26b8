"""API test helpers: clients holding a real API key of a project, as engines call the API."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from sessions_app.services import api_key_create
from tests.factories import make_project, make_session


class KeyClient(APIClient):
    """An APIClient that speaks JSON and carries `Authorization: Bearer <key>`."""

    def __init__(self, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if token:
            self.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")

    def generic(self, method: str, path: str, data: Any = "", content_type: str = "application/json", **extra: Any):
        return super().generic(method, path, data, content_type, **extra)

    def _encode_json(self, data: Any, content_type: str) -> Any:
        return super()._encode_json(data, "application/json") if content_type == "application/json" else data


def key_client(project: Any, scopes: str = "read,write") -> KeyClient:
    _, token = api_key_create(project=project, name=f"{scopes} key", scopes=scopes)
    client = KeyClient(token)
    client.token = token  # type: ignore[attr-defined]
    return client


@pytest.fixture
def writer(project):
    return key_client(project, "read,write")


@pytest.fixture
def reader(project):
    return key_client(project, "read")


@pytest.fixture
def admin_key(project):
    return key_client(project, "admin")


@pytest.fixture
def other_project(db):
    return make_project("globex")


@pytest.fixture
def other_session(other_project):
    return make_session(other_project, "theirs-1")

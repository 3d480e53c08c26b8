"""A real server for the client: pytest-django's live_server (PostgreSQL under `make test`) and an API
key made through the services, as `manage.py create_api_key` does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from session_rewind_client import AsyncClient, Client, RetryPolicy

from sessions_app.models import Project
from sessions_app.services import api_key_create
from tests.factories import make_project


@dataclass
class LiveApi:
    url: str
    key: str
    project: Project

    def client(self, **kwargs) -> Client:
        kwargs.setdefault("api_key", self.key)
        return Client(self.url, retry=RetryPolicy(max_retries=2, backoff=0.01), **kwargs)

    def aclient(self, **kwargs) -> AsyncClient:
        kwargs.setdefault("api_key", self.key)
        return AsyncClient(self.url, retry=RetryPolicy(max_retries=2, backoff=0.01), **kwargs)

    def hooked_client(self, *, on_request: Any = None, on_response: Any = None, max_retries: int = 2) -> Client:
        """A client whose httpx transport calls `on_request(request)` before each request is sent and
        `on_response(response)` after each answer, retries included."""
        hooks = {"request": [on_request] if on_request else [], "response": [on_response] if on_response else []}
        http = httpx.Client(base_url=f"{self.url}/api/v1/", headers={"Authorization": f"Bearer {self.key}"},
                            event_hooks=hooks)
        return Client(http=http, retry=RetryPolicy(max_retries=max_retries, backoff=0.01))

    def counted_client(self) -> tuple[Client, list[str]]:
        """A client, and the list of every request it sends ("GET /api/v1/sessions/…"), retries included."""
        sent: list[str] = []
        client = self.hooked_client(on_request=lambda request: sent.append(f"{request.method} {request.url.path}"))
        return client, sent

    def counted_aclient(self) -> tuple[AsyncClient, list[str]]:
        """As `counted_client`, for asyncio (make it inside the loop that uses it)."""
        sent: list[str] = []

        async def count(request: httpx.Request) -> None:
            sent.append(f"{request.method} {request.url.path}")

        http = httpx.AsyncClient(base_url=f"{self.url}/api/v1/", headers={"Authorization": f"Bearer {self.key}"},
                                 event_hooks={"request": [count]})
        return AsyncClient(http=http, retry=RetryPolicy(max_retries=2, backoff=0.01)), sent

    def key_with(self, scopes: str) -> str:
        _, token = api_key_create(project=self.project, name=f"{scopes} key", scopes=scopes)
        return token


@pytest.fixture
def live_api(live_server, transactional_db, settings) -> LiveApi:
    # The conformance suite alone makes about a thousand requests with one key: on a fast machine
    # that would meet the default per-key rate limit, which is not what these tests are about.
    settings.API_RATE_LIMIT = "100000/min"
    project = make_project("acme-live")
    _, token = api_key_create(project=project, name="client tests", scopes="read,write,admin")
    return LiveApi(url=live_server.url, key=token, project=project)


@pytest.fixture
def rewind(live_api):
    with live_api.client() as client:
        yield client

"""Shared fixtures. `make test` runs everything against real PostgreSQL and Redis."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from django.core.cache import cache

from snapshots_app import store
from tests.factories import make_project, make_session, make_user


def pytest_configure(config: pytest.Config) -> None:
    """The suite runs on the real services only: on the embedded SQLite default, tests that are
    about PostgreSQL (its locks, the one-statement write, the connection pool) or share a database
    across threads fail for reasons that say nothing about the code. Stop before that, and say how.
    (`make run`'s SQLite path is tested in a child process: tests/workers/test_compaction_embedded.py.)"""
    if not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")) or not os.environ.get("REDIS_URL"):
        raise pytest.UsageError(
            "the suite runs against PostgreSQL and Redis: run `make test` (ARGS=... selects tests), "
            "or set DATABASE_URL=postgres://... and REDIS_URL=redis://... as the Makefile does"
        )


def pytest_report_header(config: pytest.Config) -> str:
    return f"database: {os.environ['DATABASE_URL']}; redis: {os.environ['REDIS_URL']}"


def clear_cache() -> None:
    """Forget our cache keys only: flushing the Redis database would also drop Celery's queues.
    After-commit work still queued (warming the head cache) is let finish first, or it could fill
    the cache again right after."""
    from django.conf import settings

    from sessions_app import background

    background.drain(30)

    if settings.REDIS_URL:
        client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        keys = list(client.scan_iter(f"{settings.CACHES['default']['KEY_PREFIX']}:*", count=1000))
        if keys:
            client.delete(*keys)
    else:
        cache.clear()
    store.node_lru.clear()


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing():
    """Test users' passwords are hashed cheaply (tests/hashers.py says why and what still holds)."""
    from django.test import override_settings

    with override_settings(PASSWORD_HASHERS=["tests.hashers.FastPBKDF2PasswordHasher"]):
        yield


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Every test starts with cold caches, so none can pass on another test's cached pieces."""
    clear_cache()
    store.head_shapes.clear()
    store.digest_memo.clear()
    yield
    store.node_lru.clear()


@pytest.fixture
def user(db):
    return make_user("alice")


@pytest.fixture
def project(db, user):
    return make_project("acme", owner=user)


@pytest.fixture
def session(project):
    return make_session(project, "run-1")



def statements_run(action: Callable[[], Any]) -> list[tuple[str, Any]]:
    """(sql, params) of every statement `action` runs on the default connection. The test client's
    requests empty the log CaptureQueriesContext reads (Django resets it as a request starts)."""
    from django.db import connection

    statements: list[tuple[str, Any]] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        statements.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        action()
    return statements


def query_plan(sql: str, params: Any = None, *, priced_out: tuple[str, ...] = ("seqscan",)) -> str:
    """PostgreSQL's plan for `sql` (a query a test captured, with its `params` if it has placeholders)
    with the planner's `priced_out` methods (`enable_seqscan`, ...) turned off: on a test's few rows
    the planner rightly reads a whole table, so this shows whether an index serves the query's
    conditions (and its order) at all."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        for method in priced_out:
            cursor.execute(f"SET LOCAL enable_{method} = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())

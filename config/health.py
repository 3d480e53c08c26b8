"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up and serving; says nothing about its dependencies."""
    return JsonResponse({"status": "ok"})


# How long /readyz waits for the database's answer. A hung server (stopped, or behind a proxy that
# stopped forwarding) accepts the connection and never answers: the probe waited with it, for as long
# as the hang lasted, and a load balancer's own timeout then told it nothing.
DATABASE_ANSWER_SECONDS = 3.0


def _check_database() -> str:
    """The database answers a query within DATABASE_ANSWER_SECONDS. Asked from a thread of its own
    (with a connection of its own, from the pool if there is one, given back after): one that does not
    answer leaves that thread waiting, not the probe."""
    answer: list[Any] = []
    answered = threading.Event()

    def ask() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
            answer.append(connection.vendor)
        except Exception as exc:  # noqa: BLE001 - reported by _outcome, in the probe's thread
            answer.append(exc)
        finally:
            connection.close()
            answered.set()

    threading.Thread(target=ask, name="readyz-database", daemon=True).start()
    if not answered.wait(DATABASE_ANSWER_SECONDS):
        raise TimeoutError(f"the database did not answer within {DATABASE_ANSWER_SECONDS:g} s (down, hung, or every "
                           "pooled connection busy)")
    if isinstance(answer[0], Exception):
        raise answer[0]
    return str(answer[0])


class BrokerMayDropMessages(Exception):
    """The broker's Redis evicts keys when full: a queued job's message can vanish without a word."""


def _ping_redis(url: str, *, broker: bool = False) -> str:
    import redis

    # Both timeouts: a Redis that is stopped (not gone) accepts the connection and never answers.
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        # A write, not PING: a Redis at its maxmemory (policy noeviction) answers PING and refuses every
        # write, so job messages, live updates and the cache all fail while a PING said "ok".
        client.set("session-rewind:readyz", b"1", ex=60)
        if broker:
            memory: dict[str, Any] = client.info("memory")  # type: ignore[assignment]  # (sync client)
            policy = memory.get("maxmemory_policy", "noeviction")
            if memory.get("maxmemory") and policy != "noeviction":
                raise BrokerMayDropMessages(
                    f"maxmemory-policy is {policy}: when full, Redis evicts queued job messages; "
                    "give the broker a Redis with noeviction (CELERY_BROKER_URL)"
                )
    finally:
        client.close()
    return "ok"


def _check_redis() -> str:
    if not settings.REDIS_URL:
        return "embedded (not configured)"
    return _ping_redis(settings.REDIS_URL)


def _check_broker() -> str:
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return "eager (tasks run in-process)"
    if settings.CELERY_BROKER_URL.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return _ping_redis(settings.CELERY_BROKER_URL, broker=True)
    from config.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
    return "ok"


CHECKS = {"database": _check_database, "redis": _check_redis, "broker": _check_broker}
# What a web process cannot serve without. Without Redis it still takes writes and serves reads (the
# cache is an accelerator; live updates and task messages are caught up later), so Redis and the
# broker being down makes it "degraded", still 200: answering 503 took every web process out of its
# load balancer at once during a Redis outage, refusing the writes they would have taken.
ESSENTIAL = {"database"}


def _outcome(check: Any) -> tuple[bool, str]:
    try:
        return True, check()
    except Exception as exc:  # noqa: BLE001 - any failure is reported by name
        return False, f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """200 when the database answers (`status` "ok", or "degraded" naming Redis or the broker in
    `failed` when either does not); 503 "unavailable" when the database does not."""
    with ThreadPoolExecutor(max_workers=len(CHECKS) - 1) as pool:
        # Side by side: a hung Redis costs the probe one timeout (2 s), not one per check.
        others = {name: pool.submit(_outcome, check) for name, check in CHECKS.items() if name != "database"}
        outcomes = {"database": _outcome(_check_database)} | {name: future.result() for name, future in others.items()}
    failed = [name for name in CHECKS if not outcomes[name][0]]
    unavailable = any(name in ESSENTIAL for name in failed)
    body = {"status": "unavailable" if unavailable else "degraded" if failed else "ok", "failed": failed,
            "checks": {name: outcome[1] for name, outcome in outcomes.items()}}
    return JsonResponse(body, status=503 if unavailable else 200)

"""What follows a committed write, off the writer's thread: the live event reaches listeners
through the real Redis channel layer, and the head cache is warmed; a burst of writes is announced
once more, for all of its versions."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import close_old_connections

from config.celery import app as celery_app
from sessions_app import background
from sessions_app.events import session_group
from snapshots_app import store
from snapshots_app.services import snapshot_record
from tests.factories import make_project, make_session

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def queued_not_eager():
    """As in production: finalize is queued for workers, so the side effects go to the background thread."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = False
    yield
    celery_app.conf.task_always_eager = previous


def _record(session, state, **metadata):
    try:
        return snapshot_record(session=session, state=state, **metadata)
    finally:
        close_old_connections()  # a thread of asyncio's pool: its connection would outlive the test


def test_version_created_reaches_a_listener_and_the_head_cache_is_warmed(queued_not_eager):
    session = make_session(make_project("acme"), "run-1")
    layer = get_channel_layer()

    async def listen() -> dict:
        channel = await layer.new_channel()
        await layer.group_add(session_group(session.pk), channel)
        try:
            await asyncio.to_thread(_record, session, {"pointer": "step-1"}, step="plan")
            return await asyncio.wait_for(layer.receive(channel), timeout=5)
        finally:
            await layer.group_discard(session_group(session.pk), channel)

    message = async_to_sync(listen)()
    assert message["event"] == "version.created"
    assert message["payload"]["version"] == 1 and message["payload"]["step"] == "plan"
    assert background.drain(5)
    version = session.versions.get(number=1)
    assert cache.get(store._head_cache_key(version.session_id, version.number)) == b'{"pointer":"step-1"}'


def test_a_burst_of_writes_is_announced_once_more_with_its_range_and_the_newest_head(queued_not_eager, settings):
    settings.SESSION_NOTIFY_INTERVAL_MS = 60_000  # v2..v4 wait for the interval, or for drain()
    session = make_session(make_project("acme"), "run-1")
    layer = get_channel_layer()

    async def listen() -> list[dict]:
        channel = await layer.new_channel()
        await layer.group_add(session_group(session.pk), channel)
        try:
            for number in range(1, 5):
                await asyncio.to_thread(_record, session, {"n": number})
            assert await asyncio.to_thread(background.drain, 5)
            received = []
            while len(received) < 2:
                message = await asyncio.wait_for(layer.receive(channel), timeout=5)
                if message["event"] == "version.created":  # (a worker may be finalizing meanwhile)
                    received.append(message["payload"])
            return received
        finally:
            await layer.group_discard(session_group(session.pk), channel)

    first, burst = async_to_sync(listen)()
    assert (first["first"], first["version"]) == (1, 1)
    assert (burst["first"], burst["version"], burst["head"]) == (2, 4, 4)
    assert cache.get(store._head_cache_key(session.pk, 4)) == b'{"n":4}'
    assert cache.get(store._head_cache_key(session.pk, 3)) is None  # only the newest

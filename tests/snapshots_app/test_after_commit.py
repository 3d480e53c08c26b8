"""What follows a committed write, off the writer's thread: the live event reaches listeners
through the real Redis channel layer, and the head cache is warmed."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import cache

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


def test_version_created_reaches_a_listener_and_the_head_cache_is_warmed(queued_not_eager):
    session = make_session(make_project("acme"), "run-1")
    layer = get_channel_layer()

    async def listen() -> dict:
        channel = await layer.new_channel()
        await layer.group_add(session_group(session.pk), channel)
        try:
            await asyncio.to_thread(snapshot_record, session=session, state={"pointer": "step-1"}, step="plan")
            return await asyncio.wait_for(layer.receive(channel), timeout=5)
        finally:
            await layer.group_discard(session_group(session.pk), channel)

    message = async_to_sync(listen)()
    assert message["event"] == "version.created"
    assert message["payload"]["version"] == 1 and message["payload"]["step"] == "plan"
    assert background.drain(5)
    version = session.versions.get(number=1)
    assert cache.get(store._head_cache_key(version.pk)) == b'{"pointer":"step-1"}'

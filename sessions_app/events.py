"""Live-update events, broadcast over the channel layer to everyone watching a project.

Announce after commit only (`publish_after_commit`): a consumer must never announce a row that a
rollback then removes, and the send happens on the background thread, so a slow or hung Redis
never holds up the request or task that wrote (each send gives up after PUBLISH_TIMEOUT seconds).
Payloads carry ids and small display fields, never state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer

from sessions_app import background

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 2.0  # seconds: live updates are best effort, and Redis may have stopped answering
publish_failures = background.OutageLog(logger, "live updates (channel layer)")


def project_group(project_id: int) -> str:
    return f"project-{project_id}"


def session_group(session_id: Any) -> str:
    return f"session-{session_id}"


def publish(project_id: int, event: str, payload: dict[str, Any], *, session_id: Any = None) -> None:
    """Send `event` to the project's group (and the session's, if given). Never raises: live updates
    are best effort, and losing one must not fail the write that caused it."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "rewind.event", "event": event, "payload": payload}
    groups = [project_group(project_id)] if session_id is None else [project_group(project_id), session_group(session_id)]

    async def send_all() -> None:
        # One hop into an event loop for both groups (see background.run_async for which loop).
        await asyncio.wait_for(asyncio.gather(*(layer.group_send(group, message) for group in groups)), PUBLISH_TIMEOUT)

    try:
        background.run_async(send_all)
    except Exception as exc:  # noqa: BLE001 - see docstring: live updates are best effort
        publish_failures.failed(exc, f"live update {event} for project {project_id} was not delivered")
    else:
        publish_failures.succeeded()


async def group_rejoin(group: str, channel: str) -> bool:
    """Add `channel` to `group` again; True if it was no longer a member.

    A consumer's membership lives in the channel layer, not in its connection: a Redis flushed,
    restarted from an old dump or evicting keys drops it without closing anything, and channels-redis
    forgets a member after `group_expiry` (a day) anyway. Such a page stays open and silently receives
    nothing, so consumers call this every REJOIN_SECONDS. Other layers only have their expiry refreshed.
    """
    layer = get_channel_layer()
    if isinstance(layer, RedisChannelLayer):
        # group_add's own two commands (channels-redis 4), keeping zadd's answer: how many were new.
        key = layer._group_key(group)
        connection = layer.connection(layer.consistent_hash(group))
        added = await connection.zadd(key, {channel: time.time()})
        await connection.expire(key, layer.group_expiry)
        return bool(added)
    if layer is not None:
        await layer.group_add(group, channel)
    return False


def publish_after_commit(project_id: int, event: str, payload: dict[str, Any], *, session_id: Any = None) -> None:
    """`publish` once the current transaction commits, on the background thread (never if it rolls back)."""
    background.after_commit(lambda: publish(project_id, event, payload, session_id=session_id))

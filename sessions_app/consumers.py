"""Live updates over WebSocket. Authenticated and authorised per project in connect; never writes."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from sessions_app import events
from sessions_app.models import Project
from sessions_app.selectors import membership_role


@database_sync_to_async
def _project_for_member(user: Any, slug: str) -> Project | None:
    project = Project.objects.filter(slug=slug).first()
    if project is None or membership_role(user, project) is None:
        return None
    return project


class ProjectEventsConsumer(AsyncJsonWebsocketConsumer):
    """Streams a project's events to its members only (ws/projects/<slug>/)."""

    group: str | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        project = await _project_for_member(user, self.scope["url_route"]["kwargs"]["project_slug"])
        if project is None:
            await self.close(code=4403)
            return
        self.group = events.project_group(project.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Clients only listen; anything they send is ignored."""

    async def rewind_event(self, message: dict[str, Any]) -> None:
        await self.send_json({"event": message["event"], "payload": message["payload"]})

"""Live updates over WebSocket for the htmx ws extension: every message is HTML whose top-level
elements carry hx-swap-oob. Authenticated and authorised per project in connect, and again for
every event (a membership revoked meanwhile, or a browser session that no longer signs its user in,
ends the stream); consumers never write."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from sessions_app import events
from sessions_app.models import Project
from sessions_app.selectors import membership_role, session_row, session_user

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
# Closes after which the htmx ws extension reconnects, and static/js/app.js then reloads the page.
CLOSE_LAYER_FAILED = 1011  # the channel layer does not answer
CLOSE_MEMBERSHIP_LOST = 1012  # the channel layer forgot this socket: events were missed
# How often a consumer makes sure it is still in its group (see events.group_rejoin): a page misses
# live events for at most this long after Redis lost its membership, and then reloads.
REJOIN_SECONDS = 30.0
# How often an open socket asks again whether its browser session still signs its user in (two
# queries): at most once per this many seconds, not for each event on a busy page.
SIGNED_IN_RECHECK_SECONDS = 5.0

logger = logging.getLogger(__name__)


@database_sync_to_async
def _project_for_member(user: Any, slug: str) -> Project | None:
    project = Project.objects.filter(slug=slug).first()
    if project is None or membership_role(user, project) is None:
        return None
    return project


class LiveConsumer(AsyncWebsocketConsumer):
    """Joins one group after authorising; subclasses turn each event into HTML (`render`), or gather
    events and hand their HTML to `deliver` themselves."""

    group: str | None = None
    _rejoin: asyncio.Task[None] | None = None

    async def authorise(self, user: Any) -> str | None:
        """The group this user may watch, or None."""
        raise NotImplementedError

    async def render(self, event: str, payload: dict[str, Any]) -> str | None:
        """HTML for the event, "" for nothing to send, None if the user may no longer watch."""
        raise NotImplementedError

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        group = await self.authorise(user)
        if group is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group = group
        await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        self._rejoin = asyncio.create_task(self._keep_membership(group))

    async def _keep_membership(self, group: str) -> None:
        """Rejoin the group every REJOIN_SECONDS. If the membership had been lost (events were missed
        meanwhile) or the layer does not answer, the socket is closed: the client reconnects and
        reloads the page, instead of listening to nothing."""
        while True:
            await asyncio.sleep(REJOIN_SECONDS)
            try:
                lost = await events.group_rejoin(group, self.channel_name)
            except Exception:
                logger.warning("live updates of %s: the channel layer does not answer; closing the socket",
                               group, exc_info=True)
                await self.close(code=CLOSE_LAYER_FAILED)
                return
            if lost:
                logger.warning("live updates of %s: the channel layer had forgotten this socket (Redis flushed "
                               "or restarted?); closing it so the page reconnects and reloads", group)
                await self.close(code=CLOSE_MEMBERSHIP_LOST)
                return

    def _stop_rejoining(self) -> None:
        if self._rejoin is not None:
            self._rejoin.cancel()
            self._rejoin = None

    def _stop_tasks(self) -> None:
        """Cancel what runs for this socket beside its messages (subclasses add theirs)."""
        self._stop_rejoining()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # However the consumer ends (an exception skips disconnect), nothing rejoins for a dead socket,
            # and it leaves its group: a page closed while an update was sent to it ends here with the
            # server's ClientDisconnected, and a member left behind stayed for the layer's group expiry
            # (a day), its process's shared queue filling with the project's events ("over capacity":
            # live pages served by that process lost theirs).
            self._stop_tasks()
            await self._leave_group()

    async def disconnect(self, code: int) -> None:
        self._stop_tasks()
        await self._leave_group()

    async def _leave_group(self) -> None:
        group, self.group = self.group, None
        if group is None:
            return
        try:
            await self.channel_layer.group_discard(group, self.channel_name)
        except Exception:  # the layer is down: the member expires with the group (group_expiry)
            logger.warning("live updates of %s: could not leave the group", group, exc_info=True)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Clients only listen; anything they send is ignored."""

    _signed_in_at = float("-inf")  # when _signed_in last said yes (time.monotonic)

    @database_sync_to_async
    def _signed_in(self) -> bool:
        """Whether the browser session the socket opened with still signs its user in. Page loads
        stop at once after a logout, a deactivation or a password change; an open socket would
        otherwise go on streaming the project's live updates."""
        session = self.scope.get("session")
        if session is None:
            return True  # a user handed over without a browser session (tests): nothing to read again
        return bool(session_user(session.session_key).pk == self.scope["user"].pk)

    async def rewind_event(self, message: dict[str, Any]) -> None:
        await self.deliver(await self.render(message["event"], message["payload"]))

    async def deliver(self, html: str | None) -> bool:
        """Send `html` ("" = nothing to send; None = the user may no longer watch: the socket is
        closed). False once the socket was closed instead."""
        # (disconnect() follows a close and leaves the group.)
        if html is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return False
        if html:
            # Checked only when there is something to send (most events send nothing to most pages),
            # and then at most once per SIGNED_IN_RECHECK_SECONDS.
            now = time.monotonic()
            if now - self._signed_in_at >= SIGNED_IN_RECHECK_SECONDS:
                if not await self._signed_in():
                    await self.close(code=CLOSE_UNAUTHENTICATED)
                    return False
                self._signed_in_at = now
            await self.send(text_data=html)
        return True


class ProjectEventsConsumer(LiveConsumer):
    """The session list of one project (ws/projects/<slug>/): new sessions and status changes."""

    # The events that change what a session list shows (a row's status, counts, step, error, age, or the
    # row itself). The rest reach the project's group too: a summary, a pin or a label (version.finalized,
    # version.updated), a job's start, progress and end, an integrity problem. Each open
    # list tab handles every event for itself, so those are dropped before any query (nothing is sent; the
    # membership is checked with the next event that shows something).
    SHOWN_EVENTS = frozenset({"session.created", "session.updated", "session.archived", "session.deleted",
                              "version.created", "versions.removed"})

    project_id: int = 0
    # The unfiltered first page (?top=1) keeps newest activity on top; filtered pages update in place.
    top = False

    async def authorise(self, user: Any) -> str | None:
        project = await _project_for_member(user, self.scope["url_route"]["kwargs"]["project_slug"])
        if project is None:
            return None
        self.project_id = project.pk
        self.top = b"top=1" in self.scope.get("query_string", b"").split(b"&")
        return events.project_group(project.pk)

    async def render(self, event: str, payload: dict[str, Any]) -> str | None:
        if event not in self.SHOWN_EVENTS:
            return ""  # (before the hop to the thread that runs every database call of the process)
        return await self._render(event, payload)

    @database_sync_to_async
    def _render(self, event: str, payload: dict[str, Any]) -> str | None:
        project = Project.objects.filter(pk=self.project_id).first()
        if project is None or membership_role(self.scope["user"], project) is None:
            return None
        if event == "session.deleted":
            return f'<tr id="s-{payload["session"]}" hx-swap-oob="delete"></tr>'
        session = session_row(project_id=project.pk, session_id=payload.get("session"))
        if session is None:
            return ""
        if event == "session.created" or self.top:
            row = render_to_string("sessions_app/partials/_session_row.html", {"s": session, "fresh": True})
            # Table rows must travel inside <tbody>: parsed bare next to one, the HTML parser drops it.
            return (f'<tbody hx-swap-oob="delete:#s-{session.pk}"></tbody>'
                    f'<tbody hx-swap-oob="afterbegin:#session-rows-live">{row}</tbody>')
        return render_to_string("sessions_app/partials/_session_row.html", {"s": session, "oob": True, "fresh": True})

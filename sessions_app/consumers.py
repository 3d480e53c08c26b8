"""Live updates over WebSocket for the htmx ws extension: every message is HTML whose top-level
elements carry hx-swap-oob. Authenticated and authorised per project in connect, and again for
every update sent (a membership revoked meanwhile, or a browser session that no longer signs its user
in, ends the stream); consumers never write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http import QueryDict
from django.template.loader import get_template, render_to_string
from redis.exceptions import RedisError

from sessions_app import background, events
from sessions_app.forms import SessionFilterForm
from sessions_app.models import Project, WorkflowSession
from sessions_app.selectors import (
    LIVE_TOP_SORTS,
    SESSION_PAGE,
    SessionFilters,
    membership_exists,
    membership_role,
    session_list,
    session_rows,
    session_rows_matching,
    session_user,
)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
# Closes after which the htmx ws extension reconnects, and static/js/app.js then reloads the page.
CLOSE_LAYER_FAILED = 1011  # the channel layer does not answer
CLOSE_MEMBERSHIP_LOST = 1012  # the channel layer forgot this socket: events were missed
CLOSE_SERVER_ERROR = 1011  # an update could not be read or rendered (as when a consumer raises)
# How often a consumer makes sure it is still in its group (see events.group_rejoin): a page misses
# live events for at most this long after Redis lost its membership, and then reloads.
REJOIN_SECONDS = 30.0
# How often an open socket asks again whether its browser session still signs its user in (two
# queries): at most once per this many seconds, not for each event on a busy page.
SIGNED_IN_RECHECK_SECONDS = 5.0

logger = logging.getLogger(__name__)
# With Redis down each socket's connect, and each open socket's receive loop, failed with a traceback
# (some 215 lines a socket, about two sockets a minute per open tab while the pages retry): one line
# says what is wrong, the rest are counted (see background.OutageLog).
layer_failures = background.OutageLog(logger, "live sockets (channel layer)")


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
        try:
            await self.channel_layer.group_add(group, self.channel_name)
        except Exception as exc:  # noqa: BLE001 - the layer (Redis) is down: the page retries, then reloads
            layer_failures.failed(exc, f"a socket for {group} was refused")
            await self.close(code=CLOSE_LAYER_FAILED)
            return
        layer_failures.succeeded()
        self.group = group
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
            except Exception as exc:  # noqa: BLE001 - the layer (Redis) is down
                layer_failures.failed(exc, f"a socket of {group} was closed: the channel layer does not answer")
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
        except RedisError as exc:  # (not OSError: a browser closing its tab is uvicorn's ClientDisconnected)
            # The channel layer stopped answering while the socket listened (or before it was accepted):
            # closed with a code the page reconnects on, not dropped with a traceback (1006).
            if self.group is not None:
                layer_failures.failed(exc, f"a socket of {self.group} was closed")
            with contextlib.suppress(Exception):  # (already closed: refused in connect, or by the client)
                await self.close(code=CLOSE_LAYER_FAILED)
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
        except Exception as exc:  # noqa: BLE001 - the layer is down: the member expires with the group (group_expiry)
            layer_failures.failed(exc, f"a socket could not leave {group}")
        else:
            layer_failures.succeeded()

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


ROW = "sessions_app/partials/_session_row.html"
ROWS = "sessions_app/partials/_session_rows.html"


# The rows an open first page (?top=1) puts on top before it is redrawn (see _on_top).
TOP_ROWS_KEPT = 2 * SESSION_PAGE


@dataclass
class _FirstPage:
    """The first page as a reload of the list's address shows it, and the cursor of the page after it."""

    sessions: list[WorkflowSession]
    next_cursor: str


def _session_id(payload: dict[str, Any]) -> str | None:
    """The event's session id in its canonical form (it goes into the HTML and a query), or None."""
    try:
        return str(uuid.UUID(str(payload.get("session"))))
    except ValueError:
        return None


class ProjectEventsConsumer(LiveConsumer):
    """The session list of one project (ws/projects/<slug>/): new sessions and status changes.

    Every open list tab handles every event of its project for itself, on the one thread that runs
    every database call of the process (page requests queue behind it). So a tab does not answer
    events one by one: it gathers the sessions they name for LIVE_LIST_BATCH_MS and then shows them
    all at once (one membership check, one query for their rows, one message), each session once, as
    it is by then. The first change after a quiet interval goes out at once.
    """

    # The events that change what a session list shows (a row's status, counts, step, error, age, or the
    # row itself). The rest reach the project's group too: a summary, a pin or a label (version.finalized,
    # version.updated), a job's start, progress and end, an integrity problem. They are dropped before
    # anything is gathered (the membership is checked with the next update sent).
    SHOWN_EVENTS = frozenset({"session.created", "session.updated", "session.archived", "session.deleted",
                              "version.created", "versions.removed"})

    project: Project | None = None
    project_id: int = 0
    # The first page of a list in the order of latest activity (?top=1 and the list's filters) puts the
    # sessions it would show on top as they change, and redraws those it no longer would in place; the
    # first page of the newest first puts new sessions it would show on top. Other pages (another sort,
    # a page loaded with "Load more") redraw the rows they show in place.
    top = False
    filters = SessionFilters()
    list_query = ""  # the list's address query (its filters and project), for a redrawn page's "Load more"
    _flusher: asyncio.Task[None] | None = None
    _flushed_at = float("-inf")  # when the last gathered changes were shown (time.monotonic)
    _ended = False  # the socket was closed: nothing more is gathered

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # session id -> the events it had (their names), in the order the sessions changed
        self._pending: dict[str, set[str]] = {}
        # (?top=1) Sessions whose rows went on top since the page loaded or was last redrawn: the rows
        # the browser holds beyond its first page. Past TOP_ROWS_KEPT the first page is redrawn whole,
        # so a tab left open on a busy project for days keeps two pages of rows, not one per new session.
        self._on_top: set[str] = set()

    async def authorise(self, user: Any) -> str | None:
        project = await _project_for_member(user, self.scope["url_route"]["kwargs"]["project_slug"])
        if project is None:
            return None
        self.project, self.project_id = project, project.pk
        query = QueryDict(self.scope.get("query_string", b"").decode("ascii", "replace"), mutable=True)
        top = query.pop("top", None) == ["1"]
        form = SessionFilterForm(query)
        # (The list page asks for a top only with filters it could list; a hand-made address that asks
        # with others gets its rows redrawn in place.)
        if top and form.is_valid() and form.filters().sort in LIVE_TOP_SORTS:
            self.top, self.filters = True, form.filters()
            query = query.copy()
            query.pop("after", None)
            query["project"] = project.slug
            self.list_query = query.urlencode()
        return events.project_group(project.pk)

    async def rewind_event(self, message: dict[str, Any]) -> None:
        if message["event"] not in self.SHOWN_EVENTS or self._ended:
            return
        session_id = _session_id(message["payload"])
        if session_id is None:
            return
        self._pending.setdefault(session_id, set()).add(message["event"])
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        """Show what was gathered, at most once per LIVE_LIST_BATCH_MS, until nothing is left."""
        try:
            while self._pending and not self._ended:
                wait = self._flushed_at + settings.LIVE_LIST_BATCH_MS / 1000 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                batch, self._pending = self._pending, {}
                try:
                    sent = await self._deliver_all(await self._render_batch(batch))
                except Exception:
                    # Run beside the consumer's messages, an error here would not end the consumer as it
                    # did in rewind_event: the page would wait for updates that no longer come.
                    logger.warning("live session list of project %s: an update failed; closing the socket",
                                   self.project_id, exc_info=True)
                    await self._give_up()
                    return
                self._flushed_at = time.monotonic()
                if not sent:
                    self._ended = True
                    self._pending.clear()
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _deliver_all(self, messages: list[str] | None) -> bool:
        """deliver() each message in turn (None: the user may no longer watch); False once one was not."""
        if messages is None:
            return await self.deliver(None)
        for html in messages:
            if not await self.deliver(html):
                return False
        return True

    async def _give_up(self) -> None:
        """Leave the group and close (the page reconnects and reloads). A page that is gone (its send
        failed) leaves at once, rather than when the server reports the disconnect."""
        self._ended = True
        self._pending.clear()
        self._flusher = None  # (not cancelled by a disconnect() arriving meanwhile: it must finish leaving)
        self._stop_rejoining()
        await self._leave_group()
        with contextlib.suppress(Exception):  # a page that is gone cannot be told
            await self.close(code=CLOSE_SERVER_ERROR)

    def _stop_tasks(self) -> None:
        super()._stop_tasks()
        self._ended = True
        self._pending.clear()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None

    async def _render_batch(self, batch: dict[str, set[str]]) -> list[str] | None:
        """The messages for the sessions in `batch` (id -> its events), None if the user may no longer watch."""
        read = await self._read_batch(batch)
        if read is None:
            return None
        # Rendered off the thread that runs the process's database calls (a page of rows takes ~8 ms),
        # which page requests wait for. The rows' templates read only the rows' own fields.
        if isinstance(read, _FirstPage):
            return [await asyncio.to_thread(self._first_page_html, read)]
        return await asyncio.to_thread(self._html, batch, *read)

    @database_sync_to_async
    def _read_batch(self, batch: dict[str, set[str]]) -> tuple[list[WorkflowSession], set[str]] | _FirstPage | None:
        """The rows of the sessions in `batch` and the ids of those that go on top, or the first page
        to show afresh, or None if the user may no longer watch."""
        if not membership_exists(user=self.scope["user"], project_id=self.project_id):
            return None
        changed = [session_id for session_id, happened in batch.items() if "session.deleted" not in happened]
        if not changed:
            return [], set()
        if not self.top or self.project is None:
            return session_rows(project_id=self.project_id, session_ids=changed), set()
        # More sessions changed than the first page holds: those beyond it belong below it, above every
        # row the page had, where no out-of-band swap can put them (the page's rows and its "Load more"
        # cursor are the browser's). The first page is shown afresh, as a reload would; so it is once
        # the rows put on top since the last redraw would make the list grow past TOP_ROWS_KEPT (pages
        # the operator loaded with "Load more" go with it, as with a reload).
        if len(changed) <= SESSION_PAGE:
            rows, matching = session_rows_matching(project_id=self.project_id, session_ids=changed, filters=self.filters)
            on_top = {str(session_id) for session_id in matching}
            if self.filters.sort == "-created":  # only new sessions belong on top
                on_top = {session_id for session_id in on_top if "session.created" in batch[session_id]}
            self._on_top.update(on_top)
            if len(self._on_top) <= TOP_ROWS_KEPT:
                return rows, on_top
        self._on_top.clear()
        return _FirstPage(*session_list(project=self.project, filters=self.filters))

    def _first_page_html(self, page: _FirstPage) -> str:
        assert self.project is not None
        rows = render_to_string(ROWS, {
            "sessions": page.sessions, "next_cursor": page.next_cursor, "filters": self.filters,
            "base_query": self.list_query,
        })
        return f'<tbody id="session-rows-live" hx-swap-oob="innerHTML">{rows}</tbody>'

    def _html(self, batch: dict[str, set[str]], rows: list[WorkflowSession], on_top_ids: set[str]) -> list[str]:
        """Two messages at most: the rows that go (or go on top), each part a <tbody>, then the rows
        redrawn in place, bare. Table rows must travel inside <tbody>: parsed bare next to one, the HTML
        parser drops them. And in one message a bare row after a <tbody> gets a <tbody> of its own, which
        htmx cannot place ("#null"), while a <tbody> after a bare row is dropped, and what it said with it."""
        row = get_template(ROW)
        on_top = [session for session in rows if str(session.pk) in on_top_ids]
        if self.filters.sort == "-created":  # (rows come newest activity first)
            on_top.sort(key=lambda session: (session.created_at, session.pk), reverse=True)
        in_place = [session for session in rows if str(session.pk) not in on_top_ids]
        # The rows of sessions that go on top are removed first (a page loaded just after a write already
        # shows them), as are those of sessions deleted meanwhile.
        kept = {str(session.pk) for session in in_place}
        parts = [f'<tbody hx-swap-oob="delete:#s-{session_id}"></tbody>' for session_id in batch if session_id not in kept]
        if on_top:  # in one block, in order
            new_rows = "".join(row.render({"s": session, "fresh": True}) for session in on_top)
            parts.append(f'<tbody hx-swap-oob="afterbegin:#session-rows-live">{new_rows}</tbody>')
        # Rows of sessions the page shows but need not move (or, on top, no longer matches) are redrawn in place.
        redrawn = "".join(row.render({"s": session, "oob": True, "fresh": True}) for session in in_place)
        return [message for message in ("".join(parts), redrawn) if message]

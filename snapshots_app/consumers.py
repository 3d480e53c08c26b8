"""Live timeline of one session (ws/sessions/<uuid>/?shown=N): new versions slide in, summaries fill in.
An event may stand for several versions written in a burst (payload `first`..`version`), and the
rows of versions this socket missed come with the next one (see `_render`).

HTML for the htmx ws extension, rendered from the same row template the page uses.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.http import QueryDict
from django.template.loader import render_to_string

from sessions_app import events
from sessions_app.consumers import LiveConsumer
from sessions_app.errors import NotFound
from sessions_app.models import Role, WorkflowSession
from sessions_app.selectors import membership_role, role_allows, session_for_member
from snapshots_app.forms import TimelineFilterForm
from snapshots_app.selectors import (
    TIMELINE_PAGE,
    TimelineFilters,
    integrity_problems,
    session_exports,
    timeline_page,
    timeline_rows,
)

ROW = "snapshots_app/partials/_version_row.html"


class SessionTimelineConsumer(LiveConsumer):
    session_id: str = ""
    # The newest version whose row the page has: the page's head when it was rendered (`?shown=`),
    # then each new version's as it is sent.
    shown: int = 0
    # What the page shows (its filters, carried by the socket's address as by the page's): new versions
    # it would not show are left out. Rows it has are redrawn whatever they become (a row that stops
    # matching stays, as it is now: it is the one the operator may be acting on).
    filters: TimelineFilters = TimelineFilters()

    async def authorise(self, user: Any) -> str | None:
        session_id = str(self.scope["url_route"]["kwargs"]["session_id"])
        head = await self._head_for_member(user, session_id)
        if head is None:
            return None
        self.session_id = session_id
        query = self.scope.get("query_string", b"").decode("latin-1")
        shown = parse_qs(query).get("shown", [""])[0]
        self.shown = min(int(shown), head) if shown.isdigit() else head
        self.filters = TimelineFilterForm(QueryDict(query)).filters()
        return events.session_group(session_id)

    @database_sync_to_async
    def _head_for_member(self, user: Any, session_id: str) -> int | None:
        try:
            session, _role = session_for_member(user=user, session_id=session_id)
        except NotFound:
            return None
        return session.head_number

    async def render(self, event: str, payload: dict[str, Any]) -> str | None:
        if event.startswith("job.") and payload.get("kind") == "export":
            return await self._render_exports()
        if event not in ("version.created", "version.finalized", "version.updated", "session.updated",
                         "session.archived", "integrity.problem"):
            return ""
        return await self._render(event, payload)

    @database_sync_to_async
    def _render_exports(self) -> str | None:
        """The session's exports, for an operator's page (a viewer's has none): progress, then the file."""
        session = WorkflowSession.objects.select_related("project").filter(pk=self.session_id).first()
        role = membership_role(self.scope["user"], session.project) if session else None
        if session is None or role is None:
            return None
        if not role_allows(role, Role.OPERATOR):
            return ""
        return render_to_string("snapshots_app/partials/_exports.html",
                                {"session": session, "exports": session_exports(session), "oob": True})

    @database_sync_to_async
    def _render(self, event: str, payload: dict[str, Any]) -> str | None:
        session = WorkflowSession.objects.select_related("project").filter(pk=self.session_id).first()
        role = membership_role(self.scope["user"], session.project) if session else None
        if session is None or role is None:
            return None
        if event == "session.archived":
            # The header and every row's actions change: the page reloads (see static/js/app.js).
            state = "archived" if session.archived_at else "unarchived"
            return render_to_string("snapshots_app/partials/_live_reload.html", {"oob": True, "reason": f"This session was {state}."})
        context = {"session": session, "can_operate": role_allows(role, Role.OPERATOR)}
        # Every event may move the session (a write's status, a PATCH): its header badge and stats follow.
        parts: list[str] = [render_to_string(f"snapshots_app/partials/{name}.html", {**context, "oob": True})
                            for name in ("_session_status", "_session_stats")]
        number = payload.get("version")
        first = payload.get("first", number)
        if isinstance(number, int) and isinstance(first, int) and event == "version.created":
            # Versions this page never got a row for: written between the page's render and this
            # socket joining its group, or announced while the socket's channel was full (the layer
            # drops the oldest events beyond CHANNELS_CAPACITY). They come with this one.
            first = min(first, self.shown + 1)
            if number - self.shown > TIMELINE_PAGE:
                # More new rows than one update carries (the newest TIMELINE_PAGE: missed ones, a batch,
                # or a burst in one notify interval): the page reloads, as a timeline with the rows
                # between missing would not say so. (Rows it has already may be redrawn: no gap.)
                missed, self.shown = number - self.shown, number  # (one typing is told; later rows slide in)
                return render_to_string("snapshots_app/partials/_live_reload.html", {
                    "oob": True, "reason": f"{missed} versions were written since this page last caught up.",
                })
        if event == "version.updated" and "count" in payload:
            # Many versions pinned or unpinned at once (an admin's selection): their rows, wherever
            # they are, or for more than a page of them a reload.
            numbers = payload.get("numbers")
            if not isinstance(numbers, list):
                done = "pinned" if payload.get("pinned") else "unpinned"
                return render_to_string("snapshots_app/partials/_live_reload.html", {
                    "oob": True, "reason": f"{payload['count']} versions were {done} since this page loaded.",
                })
            parts += [render_to_string(ROW, {**context, "v": version, "oob": True})
                      for version in timeline_rows(session, numbers[:TIMELINE_PAGE])]
        elif isinstance(number, int) and isinstance(first, int) and event.startswith("version."):
            # Versions first..number (one event may stand for several written in a burst; the newest
            # page's worth is shown), and for new ones the row below them: the previous head loses
            # its head badge and gains a rewind button.
            count = max(1, min(number - first + 1, TIMELINE_PAGE))
            below = 1 if event == "version.created" else 0
            rows = timeline_page(session, before=number + 1, limit=count + below)
            fresh = [version for version in rows if version.number > number - count]
            if event == "version.created":
                matching = [version for version in fresh if self.filters.matches(version)]
                # Delete first: a page loaded just after the commit already shows these rows.
                parts += [f'<li id="v-{version.number}" hx-swap-oob="delete"></li>' for version in matching]
                if matching:
                    new_rows = "".join(render_to_string(ROW, {**context, "v": version, "fresh": True})
                                       for version in matching)
                    parts.append(f'<ol hx-swap-oob="afterbegin:#timeline">{new_rows}</ol>')
                self.shown = max(self.shown, number)
                fresh_numbers = {version.number for version in fresh}
                parts += [render_to_string(ROW, {**context, "v": version, "oob": True})
                          for version in rows if version.number not in fresh_numbers]
            else:
                parts += [render_to_string(ROW, {**context, "v": version, "oob": True}) for version in fresh]
        elif event == "integrity.problem":
            parts.append(render_to_string("snapshots_app/partials/_problems.html",
                                          {**context, "problems": integrity_problems(session), "oob": True}))
        return "".join(parts)

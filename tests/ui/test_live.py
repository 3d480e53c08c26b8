"""Live updates through the real Redis channel layer: who may listen, and what they receive."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import urlencode

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from channels.routing import URLRouter
from django.contrib.auth.models import AnonymousUser

from config.celery import app as celery_app
from config.routing import websocket_urlpatterns
from sessions_app import background
from sessions_app.models import Membership, Role, WorkflowSession
from sessions_app.services import membership_set, session_update
from snapshots_app.services import snapshot_record
from tests.factories import make_project, make_session, make_user

pytestmark = pytest.mark.django_db(transaction=True)


class WebsocketClient(ApplicationCommunicator):
    """channels.testing's communicator needs daphne; this is the part of it these tests use."""

    def __init__(self, path: str, user: Any) -> None:
        path, _, query = path.partition("?")
        scope = {"type": "websocket", "path": path, "headers": [], "subprotocols": [], "user": user,
                 "query_string": query.encode()}
        super().__init__(URLRouter(websocket_urlpatterns), scope)

    async def connect(self, timeout: float = 5) -> tuple[bool, Any]:
        await self.send_input({"type": "websocket.connect"})
        output = await self.receive_output(timeout)
        return output["type"] == "websocket.accept", output.get("code")

    async def receive_from(self, timeout: float = 5) -> str:
        output = await self.receive_output(timeout)
        assert output["type"] == "websocket.send", output
        return output["text"]

    async def disconnect(self) -> None:
        await self.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.wait(1)


def communicator(path: str, user: Any) -> WebsocketClient:
    return WebsocketClient(path, user)


def run(coroutine_function, *args):
    return async_to_sync(coroutine_function)(*args)


async def _connects(client: WebsocketClient) -> tuple[bool, Any]:
    connected, code = await client.connect(timeout=5)
    if connected:
        await client.disconnect()
    return connected, code


@pytest.fixture(autouse=True)
def _fresh_channel_layer():
    """Each test its own channel layer object. Every test runs its consumers on an event loop of its own
    (async_to_sync), and channels_redis keeps one receive lock per layer object: one left locked by a
    consumer still receiving when an earlier test's loop ended failed every later test ("Lock ... is
    bound to a different event loop", 11 tests in one CI run). A served process has one loop."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield


@pytest.fixture
def setup():
    owner, outsider = make_user("olga"), make_user("otto")
    project, other = make_project("acme"), make_project("globex")
    membership_set(project=project, user=owner, role=Role.VIEWER)
    membership_set(project=other, user=outsider, role=Role.VIEWER)
    session = make_session(project, "run-1")
    return owner, outsider, project, other, session


def test_only_members_may_listen(setup):
    owner, outsider, _project, _, session = setup
    assert run(_connects, communicator(f"/ws/sessions/{session.pk}/", owner))[0]
    assert run(_connects, communicator("/ws/projects/acme/", owner))[0]
    assert run(_connects, communicator(f"/ws/sessions/{session.pk}/", outsider)) == (False, 4403)
    assert run(_connects, communicator("/ws/projects/acme/", outsider)) == (False, 4403)
    assert run(_connects, communicator("/ws/projects/acme/", AnonymousUser())) == (False, 4401)
    assert run(_connects, communicator("/ws/projects/nope/", owner)) == (False, 4403)


def test_new_version_arrives_as_a_timeline_row(setup):
    owner, _, _, _, session = setup

    html = first_update(f"/ws/sessions/{session.pk}/", owner, lambda: _record(session, {"pointer": "<script>x</script>"}))
    assert 'hx-swap-oob="afterbegin:#timeline"' in html and 'id="v-1"' in html and 'id="session-stats"' in html
    assert "<script>x" not in html


def test_a_burst_of_versions_arrives_as_one_update_with_every_row(setup, settings):
    # As in production (finalize queued for workers): announcements are coalesced per session, and
    # v2..v4 wait for the interval, or for drain().
    celery_app.conf.task_always_eager = False
    settings.SESSION_NOTIFY_INTERVAL_MS = 60_000
    owner, _, _, _, session = setup

    async def scenario() -> list[str]:
        client = communicator(f"/ws/sessions/{session.pk}/", owner)
        assert (await client.connect(timeout=5))[0]
        for number in range(1, 5):
            await asyncio.to_thread(_record, session, {"n": number})
        await asyncio.to_thread(background.drain, 5)
        created = []
        while len(created) < 2:
            html = await client.receive_from(timeout=5)
            if "afterbegin:#timeline" in html:  # (a worker may be filling in summaries meanwhile)
                created.append(html)
        await client.disconnect()
        return created

    first, burst = run(scenario)
    assert 'id="v-1"' in first and 'id="v-2"' not in first
    new_rows = burst[burst.index('hx-swap-oob="afterbegin:#timeline"'):]
    # v4, v3, v2 slide in newest on top, and v1 (no longer the head) is redrawn in place.
    assert new_rows.index('id="v-4"') < new_rows.index('id="v-3"') < new_rows.index('id="v-2"')
    assert 'id="v-1"' in new_rows.split("</ol>", 1)[1]


@pytest.mark.parametrize("shown", ["?shown=1", ""])
def test_rows_a_page_missed_come_with_the_next_new_version(setup, shown):
    """v2 and v3 were written after the page was rendered with v1 at its head, before its socket
    joined (or while the socket's channel was full, when the layer drops events): they used to be
    missing from the timeline until a reload. They arrive with v4, under it. A socket that does not
    say what its page shows counts from the head when it joined."""
    owner, _, _, _, session = setup
    for number in range(1, 4):
        _record(session, {"n": number})

    async def scenario() -> str:
        client = communicator(f"/ws/sessions/{session.pk}/{shown}", owner)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(_record, session, {"n": 4})
        html = await client.receive_from(timeout=5)
        while "afterbegin:#timeline" not in html:  # (a worker may be filling in summaries meanwhile)
            html = await client.receive_from(timeout=5)
        await client.disconnect()
        return html

    new_rows = run(scenario).split('hx-swap-oob="afterbegin:#timeline"', 1)[1].split("</ol>", 1)[0]
    if shown:
        assert new_rows.index('id="v-4"') < new_rows.index('id="v-3"') < new_rows.index('id="v-2"')
        assert 'id="v-1"' not in new_rows
    else:
        assert 'id="v-4"' in new_rows and 'id="v-3"' not in new_rows


def test_more_missed_versions_than_a_page_reload_the_page_instead_of_leaving_a_gap(setup):
    """A socket that missed more versions than one update carries (TIMELINE_PAGE: its channel was
    full, the layer dropped the oldest events) got the newest page's rows only: the timeline then
    read 61, 60, ... 12, 1, versions 2-11 silently missing. It is told to reload instead."""
    from snapshots_app.selectors import TIMELINE_PAGE

    owner, _, _, _, session = setup
    for number in range(1, TIMELINE_PAGE + 11):
        _record(session, {"n": number})

    html = _timeline_answer(f"/ws/sessions/{session.pk}/?shown=1", owner, _record, session, {"n": TIMELINE_PAGE + 11})
    assert 'id="live-reload"' in html and f'data-reason="{TIMELINE_PAGE + 10} versions were written' in html
    assert "afterbegin:#timeline" not in html


def test_a_batch_of_more_versions_than_a_page_reloads_the_page_instead_of_leaving_a_gap(setup, settings):
    """One update announcing more versions than a page, all new to the socket (a batch write, or a
    burst in one notify interval), drew the newest TIMELINE_PAGE only: the timeline read 61 ... 12, 1
    with versions 2-11 missing while the header counted 61."""
    from snapshots_app.selectors import TIMELINE_PAGE
    from snapshots_app.services import snapshot_record_batch

    celery_app.conf.task_always_eager = False  # as in production, announcements coalesce per session
    settings.SESSION_NOTIFY_INTERVAL_MS = 60_000
    owner, _, _, _, session = setup
    _record(session, {"n": 1})
    background.drain(5)

    def batch() -> None:
        from django.db import close_old_connections

        try:
            snapshot_record_batch(session=session, snapshots=[{"state": {"n": n}} for n in range(2, TIMELINE_PAGE + 12)])
        finally:
            close_old_connections()

    async def scenario() -> str:
        client = communicator(f"/ws/sessions/{session.pk}/?shown=1", owner)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(batch)
        await asyncio.to_thread(background.drain, 5)
        messages = [await client.receive_from(timeout=5)]
        while "live-reload" not in messages[-1]:
            messages.append(await client.receive_from(timeout=5))
        await client.disconnect()
        return messages

    *before, reload = run(scenario)
    # (A batch's first version may be announced on its own, as a row; the rest come together.)
    assert _inserted(before) <= {2}
    missed = TIMELINE_PAGE + 11 - max(_inserted(before) | {1})
    assert f'data-reason="{missed} versions were written' in reload and "afterbegin:#timeline" not in reload


def test_a_late_update_for_rows_the_page_already_has_redraws_them_without_a_reload(setup, settings):
    """A page rendered after a batch's commit has its rows; the batch's announcement, arriving after,
    must not reload it (only more new rows than an update carries do)."""
    from snapshots_app.selectors import TIMELINE_PAGE
    from snapshots_app.services import snapshot_record_batch

    celery_app.conf.task_always_eager = False
    settings.SESSION_NOTIFY_INTERVAL_MS = 60_000  # v1 is announced at once; the batch waits for drain()
    owner, _, _, _, session = setup
    _record(session, {"n": 1})
    snapshot_record_batch(session=session, snapshots=[{"state": {"n": n}} for n in range(2, TIMELINE_PAGE + 12)])

    html = _timeline_answer(f"/ws/sessions/{session.pk}/?shown={TIMELINE_PAGE + 11}", owner, background.drain, 5)
    assert "live-reload" not in html and f'id="v-{TIMELINE_PAGE + 11}"' in html


def _timeline_answer(path: str, user: Any, action: Any, *args: Any) -> str:
    """Open a timeline socket, do `action` in a thread, and return the first message that adds rows
    or reloads the page (a worker may be filling in summaries meanwhile)."""
    async def scenario() -> str:
        client = communicator(path, user)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(action, *args)
        html = await client.receive_from(timeout=5)
        while "live-reload" not in html and "afterbegin:#timeline" not in html:
            html = await client.receive_from(timeout=5)
        await client.disconnect()
        return html

    return run(scenario)


def _inserted(messages: list[str]) -> set[int]:
    """The versions whose rows these messages put on top of the timeline (not those redrawn in place)."""
    blocks = [block for message in messages for block in re.findall(r'hx-swap-oob="afterbegin:#timeline">(.*?)</ol>', message, re.S)]
    return {int(number) for block in blocks for number in re.findall(r'<li id="v-(\d+)"', block)}


def test_a_filtered_timeline_gets_only_the_new_versions_it_shows(setup):
    """A timeline showing versions with an error had every new version slide in, errors or not. Its
    socket carries the page's filters: new versions it would not show stay out, those it would show
    come in (the rows it missed before its socket joined too)."""
    owner, _, _, _, session = setup
    for number in range(1, 4):  # v2 and v3 after the pages were rendered (?shown=1), before their sockets joined
        _record(session, {"n": number}, error="boom" if number == 3 else None)
    background.drain(5)

    async def listen(client: WebsocketClient) -> list[str]:
        messages = []
        while not await client.receive_nothing(timeout=1):
            messages.append(await client.receive_from(timeout=5))
        await client.disconnect()
        return messages

    async def scenario() -> tuple[list[str], list[str]]:
        errors, everything = (communicator(f"/ws/sessions/{session.pk}/?shown=1&has_error=true", owner),
                              communicator(f"/ws/sessions/{session.pk}/?shown=1", owner))
        assert (await errors.connect(timeout=5))[0] and (await everything.connect(timeout=5))[0]
        for number in range(4, 7):
            await asyncio.to_thread(_record, session, {"n": number}, error="boom" if number == 5 else None)
        await asyncio.to_thread(background.drain, 5)
        return await listen(errors), await listen(everything)

    errors, everything = run(scenario)
    assert _inserted(everything) == {2, 3, 4, 5, 6}
    assert _inserted(errors) == {3, 5}


def _record(session, state, **kwargs):
    from django.db import close_old_connections

    try:
        return snapshot_record(session=session, state=state, **kwargs)
    finally:
        close_old_connections()


def test_session_list_gets_new_sessions_and_status_changes_only_of_its_project(setup):
    """The first page in the order of activity (?top=1) gets new sessions on top; a page in another
    order (whose rows stay where its sort put them) has its rows redrawn in place."""
    owner, _, project, other, session = setup

    async def scenario() -> list[str]:
        top, in_place = communicator("/ws/projects/acme/?top=1", owner), communicator("/ws/projects/acme/", owner)
        assert (await top.connect(timeout=5))[0] and (await in_place.connect(timeout=5))[0]
        await asyncio.to_thread(_in_thread, make_session, other, "foreign-run")
        assert await top.receive_nothing(timeout=0.5) and await in_place.receive_nothing(timeout=0.1)
        await asyncio.to_thread(_in_thread, make_session, project, "new-run")
        created = await top.receive_from(timeout=5)
        await in_place.receive_from(timeout=5)
        await asyncio.to_thread(_in_thread, lambda: session_update(session=session, status="failed"))
        updated = await in_place.receive_from(timeout=5)
        await top.disconnect()
        await in_place.disconnect()
        return [created, updated]

    created, updated = run(scenario)
    assert 'hx-swap-oob="afterbegin:#session-rows-live"' in created and "new-run" in created
    assert f'id="s-{session.pk}"' in updated and 'hx-swap-oob="true"' in updated and "status-failed" in updated


def _consumer_queries() -> Any:
    """Captures the queries of the consumers these tests run: their database calls run on this thread,
    the one that waits in run() (the connection is resolved here: not in the event loop's thread)."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    return CaptureQueriesContext(connections["default"])


def _in_thread(function, *args):
    from django.db import close_old_connections

    try:
        return function(*args)
    finally:
        close_old_connections()


def first_update(path: str, user: Any, action: Any) -> str:
    """Open a socket on `path` as `user`, do `action` (in a thread of its own, as a request or a worker
    would) and return the first message the socket gets. Events of what the test made before are
    published first (after commit, on a background thread): one arriving late was the first message."""
    background.drain(5)

    async def scenario() -> str:
        client = communicator(path, user)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(_in_thread, action)
        html = await client.receive_from(timeout=5)
        await client.disconnect()
        return html

    return run(scenario)


@pytest.mark.parametrize("path", ["/ws/sessions/{session}/", "/ws/projects/acme/?top=1", "/ws/projects/acme/"],
                         ids=["timeline", "session-list", "session-list-in-place"])
def test_revoked_membership_ends_the_stream(setup, path):
    owner, _, _project, _, session = setup

    async def scenario() -> tuple[str, Any]:
        client = communicator(path.format(session=session.pk), owner)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(_in_thread, lambda: Membership.objects.filter(user=owner).delete())
        await asyncio.to_thread(_record, session, {"secret": 1})
        output = await client.receive_output(timeout=5)
        return output["type"], output.get("code")

    assert run(scenario) == ("websocket.close", 4403)



def test_an_operator_demoted_to_viewer_while_the_timeline_is_open_gets_rows_without_actions(setup):
    """The role is read again for every update: rows sent after a demotion offer no rewind, fork, pin
    or label (the pages they lead to would refuse a viewer anyway), as a reload would show them."""
    owner, _, project, _, session = setup
    membership_set(project=project, user=owner, role=Role.OPERATOR)
    _record(session, {"step": 1})
    as_operator = first_update(f"/ws/sessions/{session.pk}/?shown=1", owner, lambda: _record(session, {"step": 2}))
    assert 'class="rewind"' in as_operator and 'class="fork"' in as_operator and "/mark/" in as_operator

    def demote_then_record() -> None:
        membership_set(project=project, user=owner, role=Role.VIEWER)
        _record(session, {"step": 3})

    as_viewer = first_update(f"/ws/sessions/{session.pk}/?shown=2", owner, demote_then_record)
    assert 'id="v-3"' in as_viewer
    assert 'class="rewind"' not in as_viewer and 'class="fork"' not in as_viewer and "/mark/" not in as_viewer

def test_an_open_session_list_spends_no_query_on_events_it_does_not_show(setup):
    """Every open session list tab handles each event of its project for itself. A job's progress, a
    summary, a pin or an integrity problem changes nothing a list shows: no query (each cost three per
    tab: the project, the membership, the session's row), nothing sent. A status change still shows,
    for two queries: the membership and the row."""
    from channels.layers import get_channel_layer
    from django.test.utils import CaptureQueriesContext

    from sessions_app import events

    owner, _, project, _, session = setup
    unseen = [("job.created", {"job": 1}), ("job.progress", {"job": 1, "done": 5, "total": 10}),
              ("job.finished", {"job": 1}), ("integrity.problem", {"session": str(session.pk), "version": 1}),
              ("version.finalized", {"session": str(session.pk), "version": 1}),
              ("version.updated", {"session": str(session.pk), "version": 1})]

    async def scenario(queries: CaptureQueriesContext) -> tuple[str, int]:
        client = communicator("/ws/projects/acme/?top=1", owner)
        assert (await client.connect(timeout=5))[0]
        before = len(queries)
        for event, payload in unseen:
            await get_channel_layer().group_send(events.project_group(project.pk),
                                                 {"type": "rewind.event", "event": event, "payload": payload})
        await asyncio.to_thread(_in_thread, lambda: session_update(session=session, status="failed"))
        html = await client.receive_from(timeout=5)  # the first message is the status change
        spent = len(queries) - before
        assert await client.receive_nothing(timeout=0.5)
        await client.disconnect()
        return html, spent

    with _consumer_queries() as queries:
        html, spent = run(scenario, queries)
    assert "status-failed" in html and spent == 2


def test_unfiltered_first_page_moves_active_sessions_to_the_top(setup):
    owner, _, _, _, session = setup

    html = first_update("/ws/projects/acme/?top=1", owner, lambda: _record(session, {"n": 1}))
    assert html.startswith(f'<tbody hx-swap-oob="delete:#s-{session.pk}">')
    assert 'hx-swap-oob="afterbegin:#session-rows-live"' in html


_LIST_SWAP = re.compile(
    r'<tbody hx-swap-oob="delete:#s-(?P<removed>[0-9a-f-]+)"></tbody>'
    r'|<tbody hx-swap-oob="afterbegin:#session-rows-live">(?P<on_top>.*?)</tbody>'
    r'|<tbody id="session-rows-live" hx-swap-oob="innerHTML">(?P<page>.*?)</tbody>'
    r'|(?P<row><tr id="s-[0-9a-f-]+"[^>]*hx-swap-oob="true">.*?</tr>)\s*', re.S)
_ROW = re.compile(r'<tr id="s-(?P<id>[0-9a-f-]+)".*?</tr>', re.S)


def _rows_after(rows: list[tuple[str, str]], message: str) -> list[tuple[str, str]]:
    """The session list's rows (id, status) once the browser has applied one live message to them, as
    htmx's out-of-band swaps do (everything the message holds must be understood)."""
    rows = list(rows)
    position = 0
    while position < len(message):
        swap = _LIST_SWAP.match(message, position)
        assert swap, message[position:position + 200]
        position = swap.end()
        if swap["removed"]:
            rows = [row for row in rows if row[0] != swap["removed"]]
        elif swap["page"] is not None:
            rows = [(row["id"], _status(row[0])) for row in _ROW.finditer(swap["page"])]
        elif swap["on_top"] is not None:
            rows = [(row["id"], _status(row[0])) for row in _ROW.finditer(swap["on_top"])] + rows
        else:
            redrawn = _ROW.match(swap["row"])
            assert redrawn
            rows = [(key, _status(swap["row"]) if key == redrawn["id"] else status) for key, status in rows]
    return rows


def _rows_after_all(rows: list[tuple[str, str]], messages: list[str]) -> list[tuple[str, str]]:
    """The session list's rows once the browser has applied each of these live messages in turn."""
    for message in messages:
        rows = _rows_after(rows, message)
    return rows


def _status(row_html: str) -> str:
    found = re.search(r'class="badge status-(\w+)"', row_html)
    assert found, row_html
    return found[1]


def _first_page(project) -> list[tuple[str, str]]:
    from sessions_app.selectors import SessionFilters, session_list

    return [(str(session.pk), session.status) for session in session_list(project=project, filters=SessionFilters())[0]]


def _every_session(project, after: str = "") -> list[tuple[str, str]]:
    """The project's sessions (id, status) in the unfiltered list's order, after the cursor `after`."""
    from sessions_app.selectors import SessionFilters, session_list

    found = session_list(project=project, filters=SessionFilters(), after=after, limit=10_000)[0]
    return [(str(session.pk), session.status) for session in found]


def _load_more_cursor(message: str) -> str:
    """The cursor of the "Load more" a redrawn first page ends with."""
    from urllib.parse import unquote

    cursor = re.findall(r'<tr class="more">.*?[?&]amp;after=([^"&]+)"', message, re.S)
    assert cursor, "the redrawn first page has no Load more"
    return unquote(cursor[0])


def _top_list_messages(user, action, *, quiet: float, path: str = "/ws/projects/acme/?top=1") -> list[str]:
    """What an open list of acme (by default the unfiltered first page) is sent while `action` runs (on
    a thread of its own), until it has been sent nothing for `quiet` seconds."""

    async def scenario() -> list[str]:
        client = communicator(path, user)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(_in_thread, action)
        messages = [await client.receive_from(timeout=5)]
        while not await client.receive_nothing(timeout=quiet):
            messages.append(await client.receive_from(timeout=5))
        await client.disconnect()
        return messages

    return run(scenario)


@pytest.mark.parametrize("sort", ["", "&sort=-updated"], ids=["default-sort", "sort-named"])
def test_a_filtered_first_page_puts_the_sessions_that_come_to_match_it_on_top(setup, sort):
    """The first page of a filtered list in the order of latest activity: a session that comes to match
    the filters goes on top, as a reload would list it; one the page shows that stops matching is
    redrawn where it is (it does not vanish under the operator's pointer); one that never matched goes
    nowhere (its in-place row finds no row to replace, and the browser drops it)."""
    owner, _, project, _, session = setup
    shown, elsewhere = make_session(project, "run-shown"), make_session(project, "run-elsewhere")
    session_update(session=shown, status="failed")

    def changes() -> None:
        from django.db import transaction

        with transaction.atomic():  # their events go out together, at commit
            session_update(session=session, status="failed")
            session_update(session=shown, status="completed")
            session_update(session=elsewhere, status="waiting")

    background.drain(5)
    messages = _top_list_messages(owner, changes, quiet=1, path=f"/ws/projects/acme/?top=1&status=failed{sort}")
    rows = _rows_after_all([(str(shown.pk), "failed")], messages)
    assert rows == [(str(session.pk), "failed"), (str(shown.pk), "completed")]
    on_top = "".join(re.findall(r'hx-swap-oob="afterbegin:#session-rows-live">(.*?)</tbody>', "".join(messages), re.S))
    assert str(session.pk) in on_top and str(shown.pk) not in on_top and str(elsewhere.pk) not in on_top


def test_the_first_page_of_the_newest_first_puts_new_sessions_it_would_list_on_top(setup):
    """Sorted newest first (and filtered), new sessions the list would show go on top, newest first;
    a change to a session the page shows redraws it in place (its place is where its creation put it),
    and a new session the filters leave out goes nowhere."""
    owner, _, project, _, session = setup
    made: list[WorkflowSession] = []

    def changes() -> None:
        from django.db import transaction

        with transaction.atomic():  # their events go out together, at commit
            made.extend([make_session(project, "run-new-a"), make_session(project, "run-new-b")])
            session_update(session=make_session(project, "run-new-waiting"), status="waiting")
            session_update(session=session, status="failed")

    background.drain(5)
    messages = _top_list_messages(owner, changes, quiet=1, path="/ws/projects/acme/?top=1&sort=-created&status=running")
    rows = _rows_after_all([(str(session.pk), "running")], messages)
    first, second = made
    assert rows == [(str(second.pk), "running"), (str(first.pk), "running"), (str(session.pk), "failed")]


def test_a_searched_first_page_matches_the_search_as_typed(setup):
    """The socket's address carries the search as the list's address does (percent-encoded UTF-8, an
    ampersand in it too): a session whose id holds it goes on top, one whose id does not stays put."""
    owner, _, project, _, session = setup
    found = make_session(project, "café & co")

    def changes() -> None:
        from django.db import transaction

        with transaction.atomic():
            session_update(session=found, status="failed")
            session_update(session=session, status="failed")

    background.drain(5)
    query = urlencode({"top": "1", "q": "é & c"})
    messages = _top_list_messages(owner, changes, quiet=1, path=f"/ws/projects/acme/?{query}")
    on_top = "".join(re.findall(r'hx-swap-oob="afterbegin:#session-rows-live">(.*?)</tbody>', "".join(messages), re.S))
    assert str(found.pk) in on_top and str(session.pk) not in on_top


@pytest.mark.parametrize("query", ["?status=failed", "?top=1&status=failed&sort=-created", "?top=1&updated_from=2026-02-30"],
                         ids=["no-top", "newest-first", "unusable-filter"])
def test_a_list_not_in_the_order_of_activity_redraws_its_rows_in_place(setup, query):
    """Other sorts keep their rows where the sort put them (a changed row is redrawn in place, nothing
    goes on top); so does a socket whose filters the list page could not have listed."""
    owner, _, _, _, session = setup
    html = first_update(f"/ws/projects/acme/{query}", owner, lambda: session_update(session=session, status="failed"))
    assert "afterbegin" not in html
    assert _rows_after([(str(session.pk), "running")], html) == [(str(session.pk), "failed")]


def test_a_redrawn_filtered_first_page_keeps_its_filters(setup, settings):
    """Once more sessions changed than the first page holds, the page is drawn afresh as a reload of the
    list's address would show it: only the sessions the filters match, and "Load more" goes on with them."""
    from sessions_app.selectors import SESSION_PAGE

    settings.LIVE_LIST_BATCH_MS = 300
    owner, _, project, _, _ = setup
    failing = [make_session(project, f"run-{n:03}") for n in range(SESSION_PAGE + 5)]

    def burst() -> None:
        from django.db import transaction

        with transaction.atomic():
            for other in failing:
                session_update(session=other, status="failed")

    background.drain(5)
    messages = _top_list_messages(owner, burst, quiet=1.5, path="/ws/projects/acme/?top=1&status=failed")
    rows = _rows_after_all([], messages)
    assert {status for _, status in rows} == {"failed"}
    assert [key for key, _ in rows] == [str(s.pk) for s in reversed(failing)][:len(rows)]
    more = re.findall(r'hx-get="([^"]*after=[^"]*)"', "".join(messages))
    assert more and "status=failed" in more[-1] and "project=acme" in more[-1]


def test_a_burst_of_changes_to_many_sessions_costs_a_list_tab_queries_per_interval_not_per_event(setup, settings):
    """300 sessions written once a second cost each open list tab ~900 queries a second, every one on
    the thread all page requests of the process wait for, and the tab fell behind. Changes are gathered
    for LIVE_LIST_BATCH_MS: a few hundred events come as a few messages, each for two queries; the
    first page ends up as a reload would show it (newest activity first, each row as it is now, the
    deleted session gone), and no row left on the page is out of date."""
    from sessions_app.selectors import SESSION_PAGE
    from sessions_app.services import session_delete

    settings.LIVE_LIST_BATCH_MS = 300
    owner, _, project, _, first = setup
    sessions = [first] + [make_session(project, f"run-{n}") for n in range(2, SESSION_PAGE + 31)]
    shown = _first_page(project)  # the page as loaded: the newest 50

    def burst() -> float:
        started = time.monotonic()
        for status in ("waiting", "failed", "completed"):
            for session in sessions:
                session_update(session=session, status=status)
        session_update(session=sessions[-1], status="running")
        session_delete(session=sessions[3], reason="test")
        make_session(project, "run-late")
        background.drain(5)
        return time.monotonic() - started

    async def scenario(queries) -> tuple[list[str], int, float]:
        client = communicator("/ws/projects/acme/?top=1", owner)
        assert (await client.connect(timeout=5))[0]
        before = len(queries)
        took = await asyncio.to_thread(_in_thread, burst)
        messages = [await client.receive_from(timeout=5)]
        while not await client.receive_nothing(timeout=1):
            messages.append(await client.receive_from(timeout=5))
        spent = len(queries) - before
        await client.disconnect()
        return messages, spent, took

    with _consumer_queries() as queries:
        messages, spent, took = run(scenario, queries)
    events_sent = 3 * len(sessions) + 3
    # One message per interval at most (and the first at once), two queries each: not three per event.
    assert len(messages) <= took / 0.3 + 2 < events_sent / 10, (len(messages), took)
    assert spent == 2 * len(messages)
    for message in messages:
        assert message.count('class="srow') <= SESSION_PAGE
    rows = _rows_after_all(shown, messages)
    assert rows[:SESSION_PAGE] == _first_page(project)
    now = {str(session.pk): session.status for session in WorkflowSession.objects.filter(project=project)}
    assert all(now.get(key) == status for key, status in rows), "a row shows a session as it no longer is"
    assert str(sessions[3].pk) not in dict(rows)


def test_more_changes_than_the_first_page_holds_redraw_it_as_a_reload_would_leaving_no_gap(setup, settings):
    """The unfiltered list showed two pages ("Load more") when 60 of its sessions changed within one
    LIVE_LIST_BATCH_MS: the 50 newest went on top and the rows of the other 10 were removed, so the list
    skipped them (newer than every row left under them, and above the page's "Load more" cursor, which
    never brought them back). The first page is now redrawn whole, with a "Load more" that continues it."""
    from sessions_app.selectors import SESSION_PAGE

    settings.LIVE_LIST_BATCH_MS = 1000
    owner, _, project, _, _ = setup
    for n in range(2, SESSION_PAGE + 31):
        make_session(project, f"run-{n}")

    background.drain(5)  # (the sessions' own creation events are not this test's)
    shown = _every_session(project)  # both pages loaded: all 80 sessions
    changed = [WorkflowSession.objects.get(pk=key) for key, _ in shown[20:]]  # all but the 20 newest

    def burst() -> None:
        for session in changed:
            session_update(session=session, status="failed")
        background.drain(5)

    messages = _top_list_messages(owner, burst, quiet=1.5)
    rows = _rows_after_all(shown, messages)
    now = _every_session(project)
    assert rows == now[:len(rows)], "the list skips sessions or shows them out of date"
    assert len(rows) == SESSION_PAGE
    assert rows + _every_session(project, after=_load_more_cursor(messages[-1])) == now


def test_an_unfiltered_list_left_open_on_a_busy_project_keeps_at_most_three_pages_of_rows(setup, settings):
    """Each new session went on top of the open list and nothing ever left it: a tab left open for a
    week on a project starting a thousand sessions a day held seven thousand rows. Once the rows put on
    top since the page loaded pass TOP_ROWS_KEPT, the first page is redrawn whole, with a "Load more"
    that continues it, so the list never skips a session either."""
    from sessions_app.consumers import TOP_ROWS_KEPT
    from sessions_app.selectors import SESSION_PAGE

    settings.LIVE_LIST_BATCH_MS = 50
    owner, _, project, _, _ = setup
    for n in range(SESSION_PAGE + 10):
        make_session(project, f"old-{n}")
    background.drain(5)
    shown = _first_page(project)  # a full first page, as loaded
    made = TOP_ROWS_KEPT + 30

    def start_sessions() -> None:
        for n in range(made):  # one or a few at a time, as a busy project starts them
            make_session(project, f"busy-{n}")
            if n % 10 == 9:
                background.drain(5)
                time.sleep(0.08)
        background.drain(5)

    messages = _top_list_messages(owner, start_sessions, quiet=1)
    rows, longest = shown, len(shown)
    for message in messages:
        rows = _rows_after(rows, message)
        longest = max(longest, len(rows))
        assert message.count('class="srow') <= SESSION_PAGE + 1
    now = _every_session(project)
    assert len(now) > SESSION_PAGE + TOP_ROWS_KEPT
    assert longest <= SESSION_PAGE + TOP_ROWS_KEPT, longest
    assert len(rows) < made, "every new session is still on the page"
    assert rows == now[:len(rows)], "the list skips sessions or shows them out of order"
    redraws = [message for message in messages if 'id="session-rows-live" hx-swap-oob="innerHTML"' in message]
    assert redraws
    # The rows on the page, then those "Load more" brings: every session, once, newest first.
    assert rows + _every_session(project, after=_load_more_cursor(redraws[-1])) == now


@pytest.mark.parametrize("path", ["/ws/projects/acme/?top=1", "/ws/projects/acme/"], ids=["first-page", "in-place"])
def test_a_session_changed_several_times_in_an_interval_is_shown_once_as_it_is_now(setup, settings, path):
    settings.LIVE_LIST_BATCH_MS = 1000
    owner, _, project, _, session = setup
    other = make_session(project, "run-2")

    def changes() -> None:
        for status in ("cancelled", "failed", "completed"):
            session_update(session=session, status=status)
        session_update(session=other, status="waiting")
        background.drain(5)

    async def scenario() -> list[str]:
        client = communicator(path, owner)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(_in_thread, lambda: session_update(session=session, status="waiting"))
        received = [await client.receive_from(timeout=5)]  # the first change after a quiet interval: at once
        await asyncio.to_thread(_in_thread, changes)
        received.append(await client.receive_from(timeout=5))
        assert await client.receive_nothing(timeout=1.5)
        await client.disconnect()
        return received

    first, gathered = run(scenario)
    assert f'id="s-{session.pk}"' in first and f'id="s-{other.pk}"' not in first
    # One row each, as the sessions are now (not a row per change, nor an older state).
    assert gathered.count(f'<tr id="s-{session.pk}"') == 1 and gathered.count(f'<tr id="s-{other.pk}"') == 1
    assert "status-cancelled" not in gathered and "status-failed" not in gathered
    rows = _rows_after([(str(session.pk), "waiting"), (str(other.pk), "running")], first)
    rows = _rows_after(rows, gathered)
    if "top" in path:  # newest activity first
        assert rows == [(str(other.pk), "waiting"), (str(session.pk), "completed")]
    else:  # where the page's sort put them
        assert rows == [(str(session.pk), "completed"), (str(other.pk), "waiting")]


@pytest.mark.parametrize("path", ["/ws/projects/acme/?top=1", "/ws/projects/acme/"], ids=["first-page", "in-place"])
def test_a_deleted_session_leaves_the_open_list(setup, path):
    from sessions_app.services import session_delete

    owner, _, project, _, session = setup
    kept = make_session(project, "run-2")

    html = first_update(path, owner, lambda: session_delete(session=session, reason="test"))
    assert _rows_after([(str(kept.pk), "running"), (str(session.pk), "running")], html) == [(str(kept.pk), "running")]


def test_changes_gathered_for_a_list_that_closes_meanwhile_are_dropped_with_it(setup, settings):
    """A tab closed while changes wait for the end of their interval: nothing is read, rendered or sent
    for it afterwards, and nothing of it is left running in the process."""
    settings.LIVE_LIST_BATCH_MS = 1000
    owner, _, _project, _, session = setup

    async def scenario() -> tuple[list[Any], list[asyncio.Task[Any]]]:
        client = communicator("/ws/projects/acme/?top=1", owner)
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(_in_thread, lambda: session_update(session=session, status="waiting"))
        await client.receive_from(timeout=5)
        await asyncio.to_thread(_in_thread, lambda: session_update(session=session, status="failed"))
        await asyncio.sleep(0.2)  # (it has arrived, and waits for the interval's end)
        await client.disconnect()
        await asyncio.sleep(1.2)
        left = [task for task in asyncio.all_tasks() if "ProjectEventsConsumer" in repr(task.get_coro())]
        sent_after = []
        while not client.output_queue.empty():
            sent_after.append(client.output_queue.get_nowait())
        return sent_after, left

    assert run(scenario) == ([], [])


def test_integrity_problem_appears_on_the_open_session_page(setup):
    owner, _, _, _, session = setup
    version = _record(session, {"n": 1})

    from snapshots_app.integrity import integrity_problem_record

    html = first_update(f"/ws/sessions/{session.pk}/", owner,
                        lambda: integrity_problem_record(version=version, detail="checksum <b>"))
    assert 'id="integrity-problems" hx-swap-oob="true"' in html and "checksum &lt;b&gt;" in html


def test_an_export_and_its_progress_reach_an_operators_open_session_page_and_not_a_viewers(setup):
    owner, _, project, _, session = setup
    _record(session, {"n": 1})
    from snapshots_app.transfer import transfer_export_start

    html = first_update(f"/ws/sessions/{session.pk}/", owner,
                        lambda: (transfer_export_start(project=project, session=session), _record(session, {"n": 2})))
    assert 'id="v-2"' in html and "Export #" not in html  # a viewer: the next version's row, no exports
    membership_set(project=project, user=owner, role=Role.OPERATOR)
    html = first_update(f"/ws/sessions/{session.pk}/", owner,
                        lambda: transfer_export_start(project=project, session=session, actor=owner))
    assert 'id="exports" hx-swap-oob="true"' in html and "by olga" in html


def test_another_users_pin_label_and_archive_reach_the_open_session_page(setup):
    from sessions_app.services import session_archive
    from snapshots_app.services import version_label, version_pin

    owner, _, _, _, session = setup
    version = _record(session, {"n": 1})

    async def scenario() -> list[str]:
        client = communicator(f"/ws/sessions/{session.pk}/", owner)
        assert (await client.connect(timeout=5))[0]
        received = []
        for change in (lambda: version_pin(version=version, pinned=True),
                       lambda: version_label(version=version, label="known <good>"),
                       lambda: session_archive(session=session, reason="done")):
            await asyncio.to_thread(_in_thread, change)
            received.append(await client.receive_from(timeout=5))
        await client.disconnect()
        return received

    pinned, labelled, archived = run(scenario)
    assert 'id="v-1"' in pinned and 'hx-swap-oob="true"' in pinned and 'class="badge pin"' in pinned
    assert "known &lt;good&gt;" in labelled
    assert 'id="live-reload"' in archived and 'data-reason="This session was archived."' in archived


def test_a_pin_of_many_versions_redraws_exactly_their_rows_however_far_apart(setup):
    """An admin's selection pins versions 1 and 60 of a session: both rows redraw on the open page
    (it used to redraw the newest 50 rows of the span, so version 1 kept showing unpinned, and 58
    untouched rows were sent); pinning more than a page of them reloads the page."""
    from snapshots_app.models import Version
    from snapshots_app.services import versions_pin

    owner, _, _, _, session = setup
    for n in range(60):
        _record(session, {"n": n})
    versions = Version.objects.filter(session=session)

    async def scenario() -> list[str]:
        client = communicator(f"/ws/sessions/{session.pk}/?shown=60", owner)
        assert (await client.connect(timeout=5))[0]
        received = []
        for chosen, pinned in ((versions.filter(number__in=[1, 60]), True), (versions.filter(number__gt=5), True)):
            await asyncio.to_thread(_in_thread, lambda chosen=chosen, pinned=pinned: versions_pin(versions=chosen, pinned=pinned))
            received.append(await client.receive_from(timeout=5))
        await client.disconnect()
        return received

    two, many = run(scenario)
    rows = re.findall(r'<li id="v-(\d+)"[^>]*hx-swap-oob="true"', two)
    assert sorted(map(int, rows)) == [1, 60] and two.count('class="badge pin"') == 2
    # v60 was pinned already: the 54 others changed, and the page says so.
    assert 'id="live-reload"' in many and 'data-reason="54 versions were pinned since this page loaded."' in many


def _forget_group(group: str) -> None:
    """What a flushed or restarted Redis does to every open page: the group's members are gone,
    while the sockets stay open. Only this group's key is deleted (the Redis database is shared)."""
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        assert client.delete(f"{settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}:group:{group}") == 1
    finally:
        client.close()


def test_a_page_whose_membership_redis_lost_is_closed_to_reconnect_and_one_in_it_stays(setup, monkeypatch):
    from sessions_app import consumers, events

    owner, _, _, _, session = setup
    monkeypatch.setattr(consumers, "REJOIN_SECONDS", 0.3)

    async def scenario() -> dict[str, Any]:
        kept = communicator(f"/ws/sessions/{session.pk}/", owner)
        assert (await kept.connect(timeout=5))[0]
        await asyncio.sleep(0.6)  # rejoined at least once, and still a member: nothing happens
        await asyncio.to_thread(_record, session, {"n": 1})
        assert 'id="v-1"' in await kept.receive_from(timeout=5)
        await kept.disconnect()

        lost = communicator(f"/ws/sessions/{session.pk}/", owner)
        assert (await lost.connect(timeout=5))[0]
        await asyncio.to_thread(_forget_group, events.session_group(session.pk))
        # Left alone, the page would wait for events that can no longer reach it: it is closed with a
        # code the htmx ws extension reconnects on (and static/js/app.js then reloads the page).
        return await lost.receive_output(timeout=5)

    closed = run(scenario)
    assert closed == {"type": "websocket.close", "code": consumers.CLOSE_MEMBERSHIP_LOST}


def _log_out(browser, user):
    browser.logout()  # Django's logout: the session is flushed


def _deactivate(browser, user):
    from django.contrib.auth import get_user_model

    get_user_model().objects.filter(pk=user.pk).update(is_active=False)


def _change_password(browser, user):
    user.set_password("a-new-password")
    user.save(update_fields=["password"])


@pytest.mark.parametrize("end", [_log_out, _deactivate, _change_password], ids=["logout", "deactivated", "password"])
@pytest.mark.parametrize("path", ["/ws/sessions/{session}/", "/ws/projects/acme/"], ids=["timeline", "session-list"])
def test_a_page_whose_browser_session_no_longer_signs_its_user_in_stops_receiving(setup, end, path):
    """Pages refuse such a browser at once (the login page, the API's 401); an open socket ends too
    with its next event, instead of streaming the project's live updates to a browser that logged
    out, or to an account that was deactivated or had its password changed (to shut someone out)."""
    from django.test import Client

    from sessions_app import consumers

    owner, _, _, _, session = setup
    browser = Client()
    browser.force_login(owner)

    async def scenario() -> dict[str, Any]:
        client = communicator(path.format(session=session.pk), owner)
        client.scope["session"] = browser.session  # as AuthMiddlewareStack gives it: the cookie's session
        assert (await client.connect(timeout=5))[0]
        await asyncio.to_thread(_in_thread, end, browser, owner)
        await asyncio.to_thread(_record, session, {"after": "signed out"})
        return await client.receive_output(timeout=5)

    assert run(scenario) == {"type": "websocket.close", "code": consumers.CLOSE_UNAUTHENTICATED}


def test_an_open_page_asks_again_whether_it_is_signed_in_at_most_once_per_interval(setup, monkeypatch):
    """Two queries per event per open page were too many on a busy session: the answer holds for
    SIGNED_IN_RECHECK_SECONDS. Within it a logout shows on the next check, not on every event."""
    from django.test import Client

    from sessions_app import consumers

    owner, _, _, _, session = setup
    browser = Client()
    browser.force_login(owner)
    monkeypatch.setattr(consumers, "SIGNED_IN_RECHECK_SECONDS", 3600)

    async def outputs_of_a_write(client, n) -> list[str]:
        await asyncio.to_thread(_record, session, {"n": n})
        got = [await client.receive_output(timeout=5)]
        while got[-1]["type"] == "websocket.send" and not await client.receive_nothing(timeout=1):
            got.append(await client.receive_output(timeout=5))
        return [output["type"] for output in got]

    async def scenario() -> list[list[str]]:
        client = communicator(f"/ws/sessions/{session.pk}/", owner)
        client.scope["session"] = browser.session
        assert (await client.connect(timeout=5))[0]
        first = await outputs_of_a_write(client, 1)  # checked: signed in
        await asyncio.to_thread(_in_thread, _log_out, browser, owner)
        second = await outputs_of_a_write(client, 2)  # within the interval: not asked again
        monkeypatch.setattr(consumers, "SIGNED_IN_RECHECK_SECONDS", 0)
        return [first, second, await outputs_of_a_write(client, 3)]

    first, second, third = run(scenario)
    assert set(first) == set(second) == {"websocket.send"}
    assert third == ["websocket.close"]


def _group_members(group: str) -> list[bytes]:
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return client.zrange(f"{settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}:group:{group}", 0, -1)
    finally:
        client.close()


def test_a_page_closed_while_an_update_is_sent_leaves_its_group(setup):
    """The browser left (a navigation, a closed tab) while an event was being rendered for it: the
    server's send raises (uvicorn's ClientDisconnected). The socket must leave its group at once, before
    the server reports the disconnect (if it ever does): a dead member stayed for the channel layer's
    group expiry (a day), and the project's every event filled its process's shared queue, so live pages
    served by the same process lost updates ("over capacity")."""
    from uvicorn.protocols.utils import ClientDisconnected

    from sessions_app import events

    owner, _, project, _, session = setup
    group = events.project_group(project.pk)

    async def scenario() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        accepted = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.accept":
                accepted.set()
            elif message["type"] == "websocket.send":
                raise ClientDisconnected  # the page is gone: what uvicorn's send raises then

        scope = {"type": "websocket", "path": "/ws/projects/acme/", "headers": [], "subprotocols": [],
                 "user": owner, "query_string": b"top=1"}
        await inbox.put({"type": "websocket.connect"})
        consumer = asyncio.ensure_future(URLRouter(websocket_urlpatterns)(scope, inbox.get, send))
        await asyncio.wait_for(accepted.wait(), 5)
        assert len(await asyncio.to_thread(_group_members, group)) == 1
        await asyncio.to_thread(_in_thread, lambda: session_update(session=session, status="failed"))
        for _ in range(50):
            if not await asyncio.to_thread(_group_members, group):
                break
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(_group_members, group) == []
        await inbox.put({"type": "websocket.disconnect", "code": 1006})
        await asyncio.wait_for(consumer, 5)

    run(scenario)
    assert _group_members(group) == []


def test_a_page_of_another_site_cannot_open_a_socket_with_the_users_cookie(setup):
    """The served application checks the Origin (cross-site WebSocket hijacking): the browser sends
    the user's session cookie whichever page opens the socket."""
    from django.test import Client

    from config.asgi import application

    owner, _, _, _, session = setup
    browser = Client()
    browser.force_login(owner)
    cookie = f"sessionid={browser.cookies['sessionid'].value}".encode()

    async def opened(origin: bytes | None) -> bool:
        headers = [(b"host", b"localhost"), (b"cookie", cookie)] + ([(b"origin", origin)] if origin else [])
        scope = {"type": "websocket", "path": f"/ws/sessions/{session.pk}/", "headers": headers, "subprotocols": [],
                 "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
        socket = ApplicationCommunicator(application, scope)
        await socket.send_input({"type": "websocket.connect"})
        answer = await socket.receive_output(5)
        if answer["type"] == "websocket.accept":
            await socket.send_input({"type": "websocket.disconnect", "code": 1000})
            await socket.wait(1)
        return answer["type"] == "websocket.accept"

    assert run(opened, b"http://localhost:8000")  # the site's own page
    assert not run(opened, b"https://evil.example")
    assert not run(opened, b"null")  # a sandboxed frame, a file
    assert not run(opened, None)


@pytest.mark.parametrize("path", ["/ws/sessions/{session}/", "/ws/projects/acme/"], ids=["timeline", "session-list"])
def test_with_redis_down_a_socket_is_refused_with_a_code_to_retry_and_one_line_of_log(setup, settings, caplog, path):
    """Each connect was an HTTP 500 with two tracebacks (some 215 log lines), and the pages retry
    about twice a minute each for as long as Redis is down."""
    from sessions_app import consumers

    owner, _, _, _, session = setup
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}}  # nothing listens there
    consumers.layer_failures.failures = 0

    async def scenario() -> list[tuple[bool, Any]]:
        return [await _connects(communicator(path.format(session=session.pk), owner)) for _ in range(3)]

    with caplog.at_level("WARNING", logger="sessions_app.consumers"):
        assert run(scenario) == [(False, consumers.CLOSE_LAYER_FAILED)] * 3
    lines = [record for record in caplog.records if record.name == "sessions_app.consumers"]
    assert len(lines) == 1 and "live sockets (channel layer) failed" in lines[0].getMessage()
    assert "was refused" in lines[0].getMessage() and lines[0].exc_info is None
    consumers.layer_failures.failures = 0

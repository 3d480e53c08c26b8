"""End to end in Debian's chromium (Playwright) against a real ASGI server (uvicorn: HTTP and
WebSocket), PostgreSQL and the Redis channel layer. Data is committed (transactional_db) so the
server process sees it. Waits on the page are functions ("() => ..."), not expressions: Playwright
polls an expression with eval, which the pages' Content-Security-Policy forbids."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from sessions_app.models import Role
from sessions_app.services import membership_set, session_update
from snapshots_app.services import snapshot_record
from tests.factories import make_project, make_session, make_user
from tests.liveserver import ROOT, LiveServer, database_url, free_port
from tests.ui.conftest import PASSWORD, record_history

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def _live(django_db_setup, tmp_path_factory) -> Iterator[tuple[LiveServer, Any]]:
    """One uvicorn process and one chromium for the whole module: starting them took a few seconds
    of every test. Each test still gets an empty database (transactional_db) and its own browser
    contexts (cookies, storage, sockets), closed when it ends; the server keeps nothing of a test in
    memory that another could read (its caches are keyed by ids, which a flushed database never
    hands out again)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/ensure-chromium)")
    from playwright.sync_api import sync_playwright

    with pytest.MonkeyPatch.context() as patch:
        # Playwright's sync API runs an event loop in this thread for as long as the browser is open;
        # the ORM calls here (the tests' own, and the database flush between them) are still plain sync.
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        var_dir = tmp_path_factory.mktemp("var")
        if not (Path(settings.STATIC_ROOT) / "staticfiles.json").exists():
            subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, check=True)
        env = {**os.environ, "DATABASE_URL": database_url(), "REDIS_URL": settings.REDIS_URL,
               "SECRET_KEY": "browser-tests-only", "CELERY_TASK_ALWAYS_EAGER": "true", "DEBUG": "false",
               "DB_POOL_SIZE": "4",  # as `make serve` runs the web process: with a connection pool
               # Exports written by the tests' jobs go to a temporary folder, not the checkout's var/.
               "VAR_DIR": str(var_dir), "STATIC_ROOT": str(settings.STATIC_ROOT)}
        live = LiveServer(free_port(), env)
        live.var_dir = var_dir  # type: ignore[attr-defined]
        live.start()
        try:
            with sync_playwright() as playwright:
                chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    yield live, chromium
                finally:
                    chromium.close()
        finally:
            live.stop()


@pytest.fixture
def server(_live, transactional_db) -> Iterator[LiveServer]:
    live, chromium = _live
    if live.process is None or live.process.poll() is not None:  # a test that restarts it failed half-way
        live.start()
    yield live
    for context in chromium.contexts:  # this test's pages: their sockets must not outlive it
        context.close()


@pytest.fixture
def browser(_live, server):
    return _live[1]


def off_loop(function, *args, **kwargs):
    """Run ORM/service code in a worker thread: Playwright's sync API keeps an event loop running in
    this one, where async_to_sync (the live-update publish) refuses to run."""
    from django.db import close_old_connections

    def call():
        try:
            return function(*args, **kwargs)
        finally:
            close_old_connections()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


def _wait_for_socket(page, selector: str) -> None:
    """Until the htmx ws extension's socket on `selector` is open (events before that are not seen)."""
    page.wait_for_function(
        """(selector) => { const el = document.querySelector(selector);
            const data = el && el['htmx-internal-data'];
            return !!(data && data.webSocket && data.webSocket.socket && data.webSocket.socket.readyState === 1); }""",
        arg=selector, timeout=10_000,
    )


def _live_timeline(server, browser):
    """The operator story's timeline, open as olga, with its live socket connected."""
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    _wait_for_socket(page, ".timeline-wrap")
    return session, page


def log_in(browser, base: str, username: str):
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}") or dialog.dismiss())
    page.goto(f"{base}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("table.sessions")
    # The pointer stayed where the sign-in button was, which may be over the list: whose live updates
    # wait while it is (see test_the_open_list_holds_its_updates_while_the_pointer_is_on_it).
    page.mouse.move(0, 0)
    page.errors = errors  # type: ignore[attr-defined]
    console_errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    page.console_errors = console_errors  # type: ignore[attr-defined]
    return page


def _operator_story():
    operator = make_user("olga")
    project = make_project("acme")
    membership_set(project=project, user=operator, role=Role.OPERATOR)
    session = make_session(project, "run-42", workflow="research", tags=["nightly"])
    record_history(session, 5)
    failed = make_session(project, "run-failed", workflow="ingest")
    snapshot_record(session=failed, state={"x": 1}, status="failed", error="TimeoutError: tool did not answer")
    return session


def test_operator_filters_opens_diffs_rewinds_and_sees_live_versions(server, browser):
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    assert page.locator("a.ext").all_inner_texts() == ["run-failed", "run-42"]
    _wait_for_socket(page, "#session-table .live")
    off_loop(lambda: make_session(session.project, "run-new"))
    page.wait_for_selector("a.ext:text-is('run-new')", timeout=2_000)
    off_loop(lambda: session_update(session=session, status="waiting"))
    page.wait_for_function("() => document.querySelector('a.ext').textContent === 'run-42'", timeout=2_000)
    assert "Waiting" in page.inner_text(f"#s-{session.pk}")

    page.select_option("select[name=status]", "failed")
    page.wait_for_function("() => document.querySelectorAll('a.ext').length === 1")
    assert page.locator("a.ext").inner_text() == "run-failed" and "status=failed" in page.url
    page.select_option("select[name=status]", "")
    page.wait_for_function("() => document.querySelectorAll('a.ext').length === 3")

    page.click("text=run-42")
    page.wait_for_selector("#timeline #v-5")
    assert page.locator("#timeline > li.vrow").count() == 5

    # "Diff A → B" asks for both: with one or none picked it showed the head against another version
    # without saying it had picked that for the operator.
    timeline = page.url
    page.click("#diff-selected")
    # By their accessible names, as a screen reader announces them (not just "A" and "B" in every row).
    page.get_by_role("radio", name="Compare from v2 (A)", exact=True).check()
    page.click("#diff-selected")
    assert page.url == timeline and page.evaluate("document.getElementById('diff-picker').checkValidity()") is False
    page.get_by_role("radio", name="Compare to v4 (B)", exact=True).check()
    page.click("#diff-selected")
    page.wait_for_selector("ol.changes")
    assert "/counters/steps" in page.inner_text("ol.changes")
    page.click("text=Side by side")
    page.wait_for_selector("ol.changes.mode-side .sides")

    # Back to the inline diff. htmx keeps no history cache here, so it reloads that page: wait until
    # it has, or the next goto races the reload and is aborted.
    page.go_back()
    page.wait_for_selector("ol.changes.mode-inline")
    page.goto(f"{server}/sessions/{session.pk}/")
    page.click("#v-2 a.rewind")
    page.wait_for_selector("#confirm-rewind")
    assert "v5 → v2" in page.inner_text("h2")
    page.fill("textarea[name=reason]", "the search step returned garbage")
    page.click("#confirm-rewind")
    page.wait_for_selector("#timeline #v-6")
    assert "restored" in page.inner_text("#v-6") and "new head is version 6" in page.inner_text(".messages")
    assert "head" in page.get_attribute("#v-6", "class")

    # Wait until the socket is open, then post a snapshot through the service layer in this process.
    _wait_for_socket(page, ".timeline-wrap")
    started = time.monotonic()
    off_loop(snapshot_record, session=session, state={"counters": {"steps": 7}, "pointer": "live"}, step="live-step")
    page.wait_for_selector("#timeline > li#v-7", timeout=2_000)
    elapsed = time.monotonic() - started
    assert page.locator("#timeline > li.vrow").first.get_attribute("id") == "v-7"
    page.wait_for_selector("#v-7 .summary .add", timeout=2_000)  # "version.finalized" replaced the "…"
    assert "live-step" in page.inner_text("#v-7") and "head" not in page.get_attribute("#v-6", "class")
    assert elapsed < 2.0
    print(f"live version appeared after {elapsed * 1000:.0f} ms")
    assert page.errors == []  # type: ignore[attr-defined]
    # htmx logs a live swap it could not do (a removal of a row this page does not show) as an error.
    # (A socket torn down by navigation may log an error event too: that one is the browser's.)
    assert [text for text in page.console_errors if text.startswith("htmx:")] == []  # type: ignore[attr-defined]


def test_the_open_list_shows_changes_that_came_together_on_top_in_order(server, browser):
    """Changes within one LIVE_LIST_BATCH_MS come as one update (the first at once): its rows go on top
    newest activity first, and a session deleted meanwhile leaves the list."""
    from sessions_app.models import WorkflowSession
    from sessions_app.services import session_delete

    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    assert page.locator("a.ext").all_inner_texts() == ["run-failed", "run-42"]
    _wait_for_socket(page, "#session-table .live")
    page.evaluate("() => { window.live = 0; document.addEventListener('htmx:wsAfterMessage', () => window.live++); }")

    def changes() -> None:
        first = make_session(session.project, "run-a")
        make_session(session.project, "run-b")
        make_session(session.project, "run-c")
        session_update(session=first, status="waiting")
        session_delete(session=WorkflowSession.objects.get(external_id="run-failed"), reason="done with it")

    off_loop(changes)
    page.wait_for_function("() => [...document.querySelectorAll('a.ext')].map(a => a.textContent).join() === "
                           "'run-a,run-c,run-b,run-42'", timeout=3_000)
    assert "Waiting" in page.inner_text("tr.srow:first-child")
    page.wait_for_timeout(700)
    assert page.evaluate("() => window.live") <= 3  # five changes, one message for those that came together
    assert page.errors == []  # type: ignore[attr-defined]
    assert [text for text in page.console_errors if text.startswith("htmx:")] == []  # type: ignore[attr-defined]


def test_the_open_list_holds_its_updates_while_the_pointer_is_on_it(server, browser):
    """A session written moves to the top: the row under the pointer slid away as it was clicked. The
    updates wait while the mouse is on the list, saying so, and all come in as it leaves."""
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    _wait_for_socket(page, "#session-table .live")
    names = "() => [...document.querySelectorAll('a.ext')].map(a => a.textContent).join()"
    assert page.evaluate(names) == "run-failed,run-42"
    page.hover("a.ext:text-is('run-failed')")
    where = "() => document.querySelector('a.ext').getBoundingClientRect().top"
    top = page.evaluate(where)

    off_loop(lambda: session_update(session=session, status="waiting"))
    off_loop(lambda: make_session(session.project, "run-new"))
    page.wait_for_function("() => (document.getElementById('live-held') || {}).textContent === "
                           "'Live updates paused while you are on the list: 2 sessions changed.'", timeout=3_000)
    assert page.evaluate(names) == "run-failed,run-42" and "Running" in page.inner_text(f"#s-{session.pk}")
    assert page.evaluate(where) == top  # not even the note moves the rows (it stands out of the page's flow)
    page.wait_for_timeout(6_000)  # held longer than the times' 5 s tick: they count from when the update came

    page.mouse.move(0, 0)
    page.wait_for_function(f"() => {names[6:]} === 'run-new,run-42,run-failed'", timeout=3_000)
    assert "Waiting" in page.inner_text(f"#s-{session.pk}") and page.locator("#live-held").count() == 0
    # At the first tick after the release (they read "0 s ago" until then): 6 s and more, not the 0-5 s
    # since the release.
    age = "() => document.querySelector('a.ext').closest('tr').querySelector('time[data-ago]').textContent"
    page.wait_for_function(f"() => ({age[6:]}) !== '0 s ago'", timeout=7_000)
    assert int(page.evaluate(age).split()[0]) >= 6, page.evaluate(age)

    # The keyboard in the list holds them too: the focused row stayed, others moved, focus was lost.
    page.locator("a.ext").nth(1).focus()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "run-42"
    off_loop(lambda: session_update(session=session, status="running"))
    page.wait_for_selector("#live-held", timeout=3_000)
    assert page.evaluate(names) == "run-new,run-42,run-failed"
    page.evaluate("() => document.activeElement.blur()")
    page.wait_for_function(f"() => {names[6:]} === 'run-42,run-new,run-failed'", timeout=3_000)
    assert page.errors == [] and page.console_errors == []  # type: ignore[attr-defined]


def test_more_updates_than_the_list_holds_back_reload_it_as_the_pointer_leaves(server, browser):
    """Past 100 held updates (a pointer left resting on a busy list) they are not kept: the list
    reloads as the pointer leaves, showing every session as it is by then."""
    session = off_loop(_operator_story)
    saved = dict(server.env)
    server.env["LIVE_LIST_BATCH_MS"] = "0"  # one message per change: 100 of them in seconds, not a minute
    server.restart()
    try:
        page = log_in(browser, server, "olga")
        _wait_for_socket(page, "#session-table .live")
        page.evaluate("() => { window.sameDocument = true; window.live = 0; "
                      "window.addEventListener('htmx:wsBeforeMessage', () => window.live++, true); }")  # before the hold
        page.hover("a.ext:text-is('run-failed')")

        def busy() -> None:
            for index in range(130):
                session_update(session=session, status="running" if index % 2 else "waiting")
                time.sleep(0.005)
            session_update(session=session, status="completed")

        off_loop(busy)
        page.wait_for_function("() => window.live > 100", timeout=10_000)
        assert "1 session changed" in page.inner_text("#live-held")
        assert "Running" in page.inner_text(f"#s-{session.pk}")  # nothing shown while held
        page.mouse.move(0, 0)
        page.wait_for_function("() => window.sameDocument === undefined", timeout=5_000)  # reloaded
        page.wait_for_selector(f"#s-{session.pk}")
        assert "Completed" in page.inner_text(f"#s-{session.pk}") and page.locator("#live-held").count() == 0
        assert page.locator("a.ext").first.inner_text() == "run-42"
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        server.env.clear()
        server.env.update(saved)
        server.restart()


def test_the_first_session_of_an_empty_project_replaces_its_empty_notice(server, browser):
    """An open list of a project with no sessions yet said "No sessions yet" under the first one to arrive."""

    def empty_project():
        project = make_project("acme")
        membership_set(project=project, user=make_user("olga"), role=Role.OPERATOR)
        return project

    project = off_loop(empty_project)
    page = log_in(browser, server, "olga")
    assert page.locator("text=No sessions yet").is_visible()
    _wait_for_socket(page, "#session-table .live")
    off_loop(make_session, project, "run-first")
    page.wait_for_selector("a.ext:text('run-first')", timeout=3_000)
    assert not page.locator("text=No sessions yet").is_visible()


def _failed_sessions_listed(server, browser):
    """The operator story's session, and its project's list filtered to failed sessions, live."""
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/?project=acme&status=failed")
    assert page.locator("a.ext").all_inner_texts() == ["run-failed"]
    _wait_for_socket(page, "#session-table .live")
    return session, page


def test_a_filtered_list_puts_sessions_that_come_to_match_on_top_and_redraws_the_rest_in_place(server, browser):
    """A filtered list (in the order of latest activity) updates the rows it shows in place, even one
    that stops matching; changes to the project's other sessions reach it too, and htmx logged an error
    for each row it had no place for. A session that comes to match goes on top, as a reload would
    list it (an operator watching the failed sessions sees the next one fail)."""
    from sessions_app.models import WorkflowSession

    session, page = _failed_sessions_listed(server, browser)

    def changes() -> None:
        session_update(session=session, status="waiting")  # run-42: not on this page
        make_session(session.project, "run-new")
        session_update(session=WorkflowSession.objects.get(external_id="run-failed"), status="completed")

    off_loop(changes)
    page.wait_for_function("() => document.querySelector('tr.srow .badge').textContent === 'Completed'", timeout=3_000)
    page.wait_for_timeout(700)
    assert page.locator("a.ext").all_inner_texts() == ["run-failed"]

    off_loop(session_update, session=session, status="failed")
    page.wait_for_selector("a.ext:text('run-42')", timeout=3_000)
    assert page.locator("a.ext").all_inner_texts() == ["run-42", "run-failed"]
    assert page.locator("tr.srow .badge").all_inner_texts()[:2] == ["Failed", "Completed"]
    assert page.errors == []  # type: ignore[attr-defined]
    assert [text for text in page.console_errors if text.startswith("htmx:")] == []  # type: ignore[attr-defined]


def test_a_session_going_on_top_and_one_redrawn_in_place_in_one_update_both_show(server, browser):
    """Rows redrawn in place and rows going on top, sent in one message, did not all arrive: the HTML
    parser put a bare row after a <tbody> into a <tbody> of its own, which htmx could not place
    (htmx:oobErrorNoTarget, "#null"), or dropped the <tbody> that named where rows go after a bare row."""
    from sessions_app.models import WorkflowSession

    session, page = _failed_sessions_listed(server, browser)

    def changes() -> None:
        make_session(session.project, "run-idle")  # sent at once: the two below come within one interval
        session_update(session=session, status="failed")  # run-42 comes to match: on top
        session_update(session=WorkflowSession.objects.get(external_id="run-failed"), status="completed")

    off_loop(changes)
    page.wait_for_selector("a.ext:text('run-42')", timeout=3_000)
    page.wait_for_function("() => document.querySelectorAll('tr.srow .badge')[1].textContent === 'Completed'",
                           timeout=3_000)
    page.wait_for_timeout(700)
    assert page.locator("a.ext").all_inner_texts() == ["run-42", "run-failed"]
    assert page.errors == []  # type: ignore[attr-defined]
    assert [text for text in page.console_errors if text.startswith("htmx:")] == []  # type: ignore[attr-defined]


def test_the_open_list_redraws_its_first_page_when_more_sessions_change_than_it_holds(server, browser):
    """More sessions changed at once than the first page holds: the page goes on listing every session
    once, in order, and "Load more" goes on from its last row (the page skipped the changed sessions that
    did not fit on top). However the changes come in updates, all of them or a few at a time."""
    from sessions_app.selectors import SESSION_PAGE

    session = off_loop(_operator_story)
    project = session.project
    others = off_loop(lambda: [make_session(project, f"run-{n:03}") for n in range(SESSION_PAGE + 8)])
    page = log_in(browser, server, "olga")
    assert page.locator("tr.srow").count() == SESSION_PAGE
    _wait_for_socket(page, "#session-table .live")

    def burst() -> None:
        from django.db import transaction

        with transaction.atomic():  # their events go out together, at commit
            for other in others:
                session_update(session=other, status="failed")

    off_loop(burst)
    page.wait_for_function("(count) => [...document.querySelectorAll('tr.srow .badge')].filter("
                           "b => b.textContent === 'Failed').length >= count", arg=SESSION_PAGE, timeout=10_000)
    page.wait_for_timeout(1_000)  # (an update still on its way)
    if page.locator("tr.more a").count():
        page.click("tr.more a")
        page.wait_for_function("() => !document.querySelector('tr.more')", timeout=5_000)
    names = page.locator("a.ext").all_inner_texts()
    assert names[:SESSION_PAGE + 8] == [f"run-{n:03}" for n in reversed(range(SESSION_PAGE + 8))]
    assert sorted(names[SESSION_PAGE + 8:]) == ["run-42", "run-failed"]
    assert page.errors == []  # type: ignore[attr-defined]
    assert [text for text in page.console_errors if text.startswith("htmx:")] == []  # type: ignore[attr-defined]


def test_a_timeline_whose_socket_came_back_shows_what_it_missed(server, browser):
    from sessions_app import background

    session, page = _live_timeline(server, browser)
    # The socket drops; a version is written and announced while it is down; then it reconnects.
    page.evaluate("() => { window.beforeDrop = true; }")
    server.stop(kill=True)
    off_loop(snapshot_record, session=session, state={"counters": {"steps": 6}}, step="while-away")
    off_loop(background.drain, 10)
    server.start()
    # htmx's ws extension retries with full jitter (up to 2^n s after the n-th failure): a server that
    # took a few seconds to come back may be tried again only ~16 s later.
    page.wait_for_selector("#timeline > li#v-6", timeout=45_000)
    assert page.evaluate("window.beforeDrop") is None  # the page reloaded to catch up
    assert page.locator("#timeline li.vrow.head").count() == 1 and "head" in page.get_attribute("#v-6", "class")
    assert page.errors == []  # type: ignore[attr-defined]


def test_older_pages_of_a_long_timeline_load_as_rows_of_it(server, browser):
    """Scrolling loads each older page as rows of the list: they were put inside the "Older versions"
    link's <li>, each page nested in the one before (invalid lists, and rows that `#timeline > li`
    no longer finds)."""
    session, page = _live_timeline(server, browser)
    off_loop(record_history, session, 120, start=6)
    page.reload()
    page.wait_for_selector("#timeline > li#v-125")
    for _ in range(10):
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        if page.locator("#timeline li.vrow").count() == 125:
            break
        page.wait_for_timeout(500)
    assert page.locator("#timeline > li.vrow").count() == 125  # each page a sibling of the first
    assert page.locator("#timeline li.more").count() == 0 and page.errors == []  # type: ignore[attr-defined]


def test_back_from_a_row_of_an_older_page_comes_back_to_that_row(server, browser):
    """Back from v20's state, opened after scrolling through three pages of the timeline, came to the
    newest page at the old scroll height, where v20 was not even loaded."""
    session, page = _live_timeline(server, browser)
    off_loop(record_history, session, 120, start=6)
    page.reload()
    for _ in range(20):
        if page.locator("#v-20").count():
            break
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_timeout(300)
    page.locator("#v-20").scroll_into_view_if_needed()
    page.click("#pin-v20")  # redrawn by its Pin (unmarked: Back then goes through "Go to" to its page)
    page.wait_for_selector("#v-20 .badge.pin")
    page.click("#v-20 a[aria-label='state of v20']")
    page.wait_for_url(lambda url: url.endswith(f"/sessions/{session.pk}/v/20/"))
    page.go_back()
    page.wait_for_url(lambda url: url.endswith(f"/sessions/{session.pk}/?before=21#v-20"))
    page.wait_for_selector("#v-20")
    assert page.evaluate("() => { const r = document.getElementById('v-20').getBoundingClientRect(); "
                         "return r.top >= 0 && r.bottom <= window.innerHeight; }")
    # A row of the page as it came: its own address, at the row. (A click opening another tab leaves
    # this page's address as it was.)
    page.goto(f"{server}/sessions/{session.pk}/")
    page.locator("#v-110").scroll_into_view_if_needed()
    with page.context.expect_page() as opened:
        page.click("#v-110 a.vnum", modifiers=["Control"])
    opened.value.close()
    assert page.url == f"{server}/sessions/{session.pk}/"
    page.click("#v-110 a.vnum")
    page.wait_for_url(lambda url: url.endswith("/v/110/"))
    page.go_back()
    page.wait_for_url(lambda url: url.endswith(f"/sessions/{session.pk}/#v-110"))
    assert page.evaluate("() => { const r = document.getElementById('v-110').getBoundingClientRect(); "
                         "return r.top >= 0 && r.bottom <= window.innerHeight; }")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_link_to_a_row_past_the_newest_page_opens_the_page_that_holds_it(server, browser):
    """A shared /sessions/<id>/#v-8 of a long session landed at the top of the newest page, where v8 is not."""
    session, page = _live_timeline(server, browser)
    off_loop(record_history, session, 60, start=6)
    page.goto(f"{server}/")  # (from another page: a hash change on the same page loads nothing)
    page.goto(f"{server}/sessions/{session.pk}/#v-8")
    page.wait_for_url(lambda url: url.endswith("/?before=9#v-8"))
    assert page.locator("#v-8").is_visible() and page.errors == []  # type: ignore[attr-defined]
    page.goto(f"{server}/")
    page.goto(f"{server}/sessions/{session.pk}/#v-60")  # on the newest page: stays
    page.wait_for_load_state("load")
    assert page.url.endswith(f"/sessions/{session.pk}/#v-60") and page.locator("#v-60").is_visible()


def test_a_busy_sessions_open_timeline_keeps_its_newest_rows(server, browser):
    """Versions written faster than anyone reads them: the open timeline keeps its newest 200 rows
    (at 20 writes/s it grew by 1,200 rows a minute, fell minutes behind and stopped answering), and
    "Older versions" continues from the last row kept."""
    session, page = _live_timeline(server, browser)

    def burst(first: int) -> None:
        for step in range(first, first + 20):
            snapshot_record(session=session, state={"counters": {"steps": step}}, step=f"step-{step}")

    # In bursts of 20, each waited for: eager finalize announces each version twice.
    for first in range(6, 246, 20):
        off_loop(burst, first)
        page.wait_for_selector(f"#timeline > li#v-{first + 19}", timeout=10_000)
    page.wait_for_function("() => document.querySelectorAll('#timeline > li.vrow').length === 200")
    assert page.locator("#timeline > li.vrow").last.get_attribute("id") == "v-46"
    assert page.locator("#timeline > li.more a").get_attribute("href").endswith(f"/sessions/{session.pk}/?before=46")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_selector("#timeline > li#v-45")  # the next page, from where the kept rows end
    assert page.errors == []  # type: ignore[attr-defined]


def _flaky_story():
    """A session of 120 versions whose even ones failed: 60 with an error, more than a timeline page."""
    operator = make_user("olga")
    project = make_project("acme")
    membership_set(project=project, user=operator, role=Role.OPERATOR)
    session = make_session(project, "flaky", workflow="research")
    for number in range(1, 121):
        snapshot_record(session=session, state={"n": number}, step=f"step-{number}",
                        error="TimeoutError: tool did not answer" if number % 2 == 0 else None)
    return session


def _timeline_numbers(page) -> list[int]:
    return [int(row.split("-")[1]) for row in page.eval_on_selector_all("#timeline > li.vrow", "rows => rows.map(r => r.id)")]


def test_filtering_the_timeline_keeps_the_filter_through_its_address_older_pages_and_live_versions(server, browser):
    """At 3 a.m., the versions that failed: ticking "with an error" narrows the timeline in place (the
    address follows, to share or reload), "Older versions" goes on with the filter, and a new version
    slides in only if it failed too."""
    session = off_loop(_flaky_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    _wait_for_socket(page, ".timeline-wrap")
    page.evaluate("() => { window.sameDocument = true; }")
    page.check("#filter-has-error")
    page.wait_for_function("() => new URLSearchParams(location.search).get('has_error') === 'true'", timeout=5_000)
    page.wait_for_function("() => !document.querySelector('#timeline > li#v-119')", timeout=5_000)
    assert _timeline_numbers(page) == list(range(120, 20, -2))
    assert page.evaluate("window.sameDocument") is True  # swapped in by htmx, not a page load
    assert page.evaluate("document.activeElement.id") == "filter-has-error"
    assert page.locator("#timeline-section h2").inner_text() == "Timeline · versions with an error"
    for _ in range(10):
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        if len(_timeline_numbers(page)) == 60:
            break
        page.wait_for_timeout(500)
    assert _timeline_numbers(page) == list(range(120, 0, -2)) and page.locator("#timeline li.more").count() == 0

    _wait_for_socket(page, ".timeline-wrap")  # the swapped-in timeline's own socket, which carries the filter
    off_loop(snapshot_record, session=session, state={"n": 121}, step="step-121")
    off_loop(snapshot_record, session=session, state={"n": 122}, step="step-122", error="TimeoutError: again")
    page.wait_for_selector("#timeline > li#v-122", timeout=5_000)
    page.wait_for_timeout(500)
    assert _timeline_numbers(page)[:2] == [122, 120] and page.locator("#v-121").count() == 0

    page.reload()  # the address is the filtered timeline: shared, it opens as it was
    assert page.is_checked("#filter-has-error") and _timeline_numbers(page)[:3] == [122, 120, 118]
    page.check("#filter-labelled")
    empty = "#timeline > li.empty:text-is('No labelled versions with an error.')"
    page.wait_for_selector(empty, timeout=5_000)
    _wait_for_socket(page, ".timeline-wrap")
    off_loop(snapshot_record, session=session, state={"n": 123}, step="step-123", error="TimeoutError", label="look here")
    page.wait_for_selector("#timeline > li#v-123", timeout=5_000)
    assert not page.is_visible(empty)  # the first version it shows arrives above its empty notice, which goes
    page.click("#all-versions")
    page.wait_for_selector("#timeline > li#v-121")
    assert not page.is_checked("#filter-has-error") and "has_error" not in page.url
    assert page.errors == []  # type: ignore[attr-defined]
    assert [text for text in page.console_errors if text.startswith("htmx:")] == []  # type: ignore[attr-defined]


def test_quick_clicks_on_the_timeline_filters_all_count(server, browser):
    """Ticks made while the answer to the first was on its way were lost: htmx dropped their requests,
    then that answer swapped in the filter form as it was when sent."""
    session = off_loop(_flaky_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/?has_error=true")
    _wait_for_socket(page, ".timeline-wrap")
    page.evaluate("() => { for (const id of ['filter-has-error', 'filter-pinned']) document.getElementById(id).click(); }")
    page.wait_for_selector("#timeline > li.empty:text-is('No pinned versions.')", timeout=5_000)
    page.wait_for_timeout(500)  # an answer to the first click alone would have come by now
    assert not page.is_checked("#filter-has-error") and page.is_checked("#filter-pinned")
    assert page.evaluate("location.search") == "?pinned=true"
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_session_archived_by_someone_else_stops_offering_actions_on_the_open_page(server, browser):
    from sessions_app.services import session_archive
    from snapshots_app.services import version_label

    session, page = _live_timeline(server, browser)
    off_loop(lambda: version_label(version=session.versions.get(number=2), label="checked by ana"))
    page.wait_for_function("() => document.querySelector('#v-2').textContent.includes('checked by ana')", timeout=5_000)
    assert page.locator("#v-2 a.rewind").count() == 1
    page.evaluate("() => { window.beforeArchive = true; }")
    off_loop(lambda: session_archive(session=session, reason="closing the incident"))
    page.wait_for_selector("#unarchive", timeout=5_000)  # the page reloaded
    assert page.evaluate("window.beforeArchive") is None
    assert page.locator("#timeline a.rewind").count() == 0
    assert page.errors == []  # type: ignore[attr-defined]


def test_archiving_a_running_session_asks_first_and_warns(server, browser):
    """Archive opens a confirm page, which warns while the engine may still write (the story is
    running); confirmed, the session page shows it archived, with Unarchive instead."""
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    page.click("#archive")
    page.wait_for_selector("#confirm-archive")
    assert "This session is running" in page.inner_text("#engine-running")
    assert off_loop(lambda: type(session).objects.get(pk=session.pk).archived_at) is None  # only asked, so far
    page.click("text=Cancel")
    page.wait_for_selector("#archive")
    page.click("#archive")
    page.fill("textarea[name=reason]", "the incident is closed")
    page.click("#confirm-archive")
    page.wait_for_selector("#unarchive")
    assert "Archived:" in page.inner_text(".messages") and page.locator(".pagehead .badge:text-is('archived')").count() == 1
    assert page.locator("#timeline a.rewind").count() == 0
    assert off_loop(lambda: type(session).objects.get(pk=session.pk).archived_at) is not None
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_project_admin_trims_a_history_from_the_session_page(server, browser):
    """Trim… opens a confirm page; confirmed, the session page says what went and shows what stayed."""
    def story_with_admin():
        session = _operator_story()
        membership_set(project=session.project, user=make_user("ada"), role=Role.ADMIN)
        return session

    session = off_loop(story_with_admin)
    page = log_in(browser, server, "ada")
    page.goto(f"{server}/sessions/{session.pk}/")
    page.click("#trim")
    page.wait_for_selector("#confirm-trim")
    assert "the trim removes nothing" in page.inner_text("#trim-preview")
    page.fill("input[name=keep_newest]", "2")  # what goes then shows as it is typed
    page.wait_for_selector("#trim-preview:has-text('removes 3 versions: v1\u2013v3')", timeout=5_000)
    page.fill("textarea[name=reason]", "the early steps are done with")
    page.click("#confirm-trim")
    page.wait_for_selector(".messages")
    assert "Removed 3 versions; 2 kept." in page.inner_text(".messages")
    assert [row.get_attribute("id") for row in page.locator("#timeline > li.vrow").all()] == ["v-5", "v-4"]
    assert off_loop(lambda: sorted(session.versions.values_list("number", flat=True))) == [4, 5]
    assert page.errors == []  # type: ignore[attr-defined]


def test_back_shows_the_filters_of_the_list_it_shows(server, browser):
    off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.select_option("select[name=status]", "failed")
    page.wait_for_function("() => document.querySelectorAll('a.ext').length === 1")
    page.select_option("select[name=status]", "completed")
    page.wait_for_function("() => location.search.includes('status=completed')")
    page.go_back()
    page.wait_for_function("() => location.search.includes('status=failed')")
    page.wait_for_function("() => document.querySelectorAll('a.ext').length === 1")
    assert page.input_value("select[name=status]") == "failed"


def _list_with_a_clock(server, browser, *, age: float = 0, clock_ahead: float = 0):
    """The session list, its run-42 row `age` seconds old, in a browser whose clock Playwright runs
    (`clock_ahead` seconds fast); and that row's relative time."""
    from datetime import timedelta

    from django.utils import timezone

    from sessions_app.models import WorkflowSession

    def story() -> None:
        session = _operator_story()
        WorkflowSession.objects.filter(pk=session.pk).update(updated_at=timezone.now() - timedelta(seconds=age))

    off_loop(story)
    page = log_in(browser, server, "olga")
    page.clock.install(time=time.time() + clock_ahead)
    page.reload()
    return page, page.locator("table.sessions tr", has_text="run-42").locator("time[data-ago]")


def test_relative_times_move_on_while_the_list_stays_open(server, browser):
    """A row nothing changed since the page loaded said "12 s ago" for as long as the page was open,
    so an engine that had stopped looked alive. The browser's clock here is an hour fast: the times
    count on from the server's, not from the browser's idea of now."""
    page, updated = _list_with_a_clock(server, browser, clock_ahead=3600)
    assert updated.inner_text().endswith(" s ago")
    page.clock.fast_forward("00:06")
    page.wait_for_function("el => / s ago$/.test(el.textContent)", arg=updated.element_handle())
    page.clock.fast_forward("02:05")
    page.wait_for_function("el => el.textContent === '2\u00a0minutes ago'", arg=updated.element_handle())
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_relative_time_passing_a_day_while_the_list_stays_open_says_so(server, browser):
    """The ticker stopped at a day: a row it had counted up to "23 hours, 59 minutes ago" said so
    for as long as the page stayed open, however old the row grew."""
    page, updated = _list_with_a_clock(server, browser, age=23 * 3600 + 59 * 60 + 50)
    assert updated.inner_text() == "23\u00a0hours, 59\u00a0minutes ago"
    page.clock.fast_forward("00:15")
    page.wait_for_function("el => el.textContent === '1\u00a0day ago'", arg=updated.element_handle())
    page.clock.fast_forward("01:00:00")
    page.wait_for_function("el => el.textContent === '1\u00a0day, 1\u00a0hour ago'", arg=updated.element_handle())
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_refused_timeline_action_says_why(server, browser):
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    page.click("#v-3 details.labeler summary")
    page.evaluate("() => document.querySelector('#v-3 details.labeler input[name=label]').removeAttribute('maxlength')")
    page.fill("#v-3 details.labeler input[name=label]", "x" * 150)
    page.click("#v-3 details.labeler button[type=submit]")
    page.wait_for_selector("#v-3 .action-error", timeout=5_000)
    assert "Not done" in page.inner_text("#v-3 .action-error") and "100" in page.inner_text("#v-3 .action-error")


def test_the_session_pages_status_follows_live_writes(server, browser):
    session, page = _live_timeline(server, browser)
    assert page.inner_text(".pagehead .badge.status-running") == "Running"
    off_loop(snapshot_record, session=session, state={"x": 1}, step="crash", status="failed", error="KeyError: 'q'")
    page.wait_for_selector("#timeline > li#v-6", timeout=5_000)
    page.wait_for_selector(".pagehead .badge.status-failed", timeout=2_000)
    off_loop(lambda: session_update(session=session, status="completed"))
    page.wait_for_selector(".pagehead .badge.status-completed", timeout=5_000)
    assert page.locator(".pagehead .badge[class*=status-]").count() == 1
    assert page.errors == []  # type: ignore[attr-defined]


def _clear_search_box(page, selector: str) -> None:
    """Click the x that Chromium draws at the right end of a non-empty <input type=search>."""
    box = page.locator(selector).bounding_box()
    page.hover(selector)
    page.mouse.click(box["x"] + box["width"] - 14, box["y"] + box["height"] / 2)
    assert page.input_value(selector) == ""


def test_clearing_a_search_box_with_its_x_shows_everything_again(server, browser):
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.click("#q")
    page.keyboard.type("run-f", delay=20)
    page.wait_for_function("() => document.querySelectorAll('a.ext').length === 1")
    _clear_search_box(page, "#q")  # (an input event, no keyup, as a paste or an IME also sends)
    page.wait_for_function("() => document.querySelectorAll('a.ext').length === 2", timeout=3_000)

    page.goto(f"{server}/sessions/{session.pk}/v/5/")
    page.click("#state-q")
    page.keyboard.type("pointer", delay=20)
    page.wait_for_selector("#search-results .results", timeout=3_000)
    _clear_search_box(page, "#state-q")
    page.wait_for_function("() => !document.querySelector('#search-results .results')", timeout=3_000)


def test_pin_and_label_keep_the_keyboard_where_it_was(server, browser):
    _, page = _live_timeline(server, browser)
    # Each action's answer replaces the row, and so does its live update, the same row once more.
    page.evaluate("() => { window.live = 0; document.addEventListener('htmx:wsAfterMessage', () => window.live++); }")
    page.focus("#v-3 form.mark button")
    page.keyboard.press("Enter")
    page.wait_for_selector("#v-3 .badge.pin")
    page.wait_for_function("() => window.live >= 1")
    assert page.evaluate("document.activeElement.closest('#v-3 form.mark') !== null")
    assert page.evaluate("document.activeElement.textContent") == "Unpin"
    page.keyboard.press("Enter")
    page.wait_for_function("() => !document.querySelector('#v-3 .badge.pin') && window.live >= 2")
    assert page.evaluate("document.activeElement.textContent") == "Pin"

    page.focus("#v-3 details.labeler summary")
    page.keyboard.press("Enter")  # opens the label form
    page.keyboard.press("Tab")
    page.keyboard.type("checked")
    page.keyboard.press("Enter")
    page.wait_for_selector("#v-3 .badge.label")
    page.wait_for_function("() => window.live >= 3")
    assert page.evaluate("document.activeElement.id") == "label-v3"
    page.keyboard.press("Shift+Tab")  # still inside the row, not back at the top of the page
    assert page.evaluate("document.activeElement.closest('#v-3') !== null")


def _focused(page) -> str:
    return page.evaluate("() => { const a = document.activeElement; return (a.closest('li') || a).id + ' ' + a.textContent.trim(); }")


def test_tabbing_onto_older_versions_or_more_goes_on_into_what_they_load(server, browser):
    """"Older versions" loads as it scrolls into view, and replaces itself: a keyboard user who tabbed
    onto it lost the focus with it, and the next Tab started again at the top of the page (every 50
    rows of a long timeline). The same with the state tree's "more…"."""
    session, page = _live_timeline(server, browser)
    off_loop(record_history, session, 50, start=6)
    off_loop(snapshot_record, session=session, state={"items": list(range(450))}, step="wide")
    page.reload()
    page.wait_for_selector("#timeline > li#v-56")
    page.focus("#v-7 details.labeler summary")
    page.keyboard.press("Tab")  # onto "Older versions", which loads v6-v1 in its place
    page.wait_for_selector("#timeline > li#v-1")
    assert _focused(page) == "v-6 v6"
    page.keyboard.press("Tab")
    assert _focused(page) == "v-6 vs previous"

    page.goto(f"{server}/sessions/{session.pk}/v/56/?pointer=/items")
    page.focus("#tree li.more a")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#tree > li.leaf').length === 400")
    assert page.evaluate("() => document.activeElement.closest('#tree > li.leaf').querySelector('.key').textContent") == "200"
    assert page.errors == []  # type: ignore[attr-defined]


def _long_names_story():
    operator = make_user("olga")
    project = make_project("acme")
    membership_set(project=project, user=operator, role=Role.OPERATOR)
    session = make_session(project, "run-" + "x" * 120, workflow="w" * 80, tags=["t" * 64])
    long_key = "k" * 300
    snapshot_record(session=session, state={long_key: 1, "q": "y" * 400}, step="s" * 150, error="E" * 500,
                    status="failed", label="L" * 100)  # badges: a label and a tag at their longest
    snapshot_record(session=session, state={long_key: 2, "q": "y" * 400 + "!"}, step="s" * 150)
    return session


def test_long_names_and_a_phone_width_never_widen_the_page(server, browser):
    session = off_loop(_long_names_story)
    page = log_in(browser, server, "olga")
    page.set_viewport_size({"width": 375, "height": 800})
    base = f"{server}/sessions/{session.pk}/"
    for path in ("/", base, base + "v/2/", base + "diff/?from=1&to=2", base + "diff/?from=1&to=2&mode=side",
                 base + "v/1/rewind/", base + "v/1/fork/", base + "history/?path=/q"):
        page.goto(server + path if path == "/" else path)
        page.wait_for_load_state("load")
        widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert widths[0] <= widths[1], (path, widths)
    page.goto(server + "/")
    # Each session a card: every column on screen, labelled (the table showed three of eight and
    # scrolled sideways for the rest, the last error among them).
    box = page.locator(".table-scroll").first
    assert box.evaluate("el => el.scrollWidth <= el.clientWidth"), box.evaluate("el => [el.scrollWidth, el.clientWidth]")
    error = page.locator("table.sessions td[data-label='Last error']").first
    assert error.is_visible() and error.evaluate("el => el.getBoundingClientRect().right <= window.innerWidth")
    assert error.evaluate("el => getComputedStyle(el, '::before').content") == '"Last error: "'


def test_a_long_workflow_or_step_name_leaves_the_session_list_the_width_of_the_screen(server, browser):
    """One session's 80-character workflow and 150-character step widened the table for every row
    (3,653 px at 1,400): the status and error columns of all sessions left the screen."""
    off_loop(_long_names_story)
    page = log_in(browser, server, "olga")
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{server}/")
    box = page.locator(".table-scroll").first
    assert box.evaluate("el => el.scrollWidth <= el.clientWidth"), box.evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert page.locator("table.sessions .badge[class*=status-]").first.is_visible()


def test_without_javascript_the_tree_offers_no_dead_controls(server, browser):
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    cookies = page.context.cookies()
    context = browser.new_context(java_script_enabled=False)
    context.add_cookies(cookies)
    page = context.new_page()
    page.goto(f"{server}/sessions/{session.pk}/v/5/")
    assert page.locator("button.copy").count() > 0 and not page.get_by_text("copy path").first.is_visible()  # (a dead button)
    node = page.locator("#tree details", has=page.locator("summary .key", has_text="counters"))
    node.locator("summary").click()
    assert not node.get_by_text("loading…").is_visible()
    node.get_by_role("link", name="Open this part").click()
    page.wait_for_load_state("load")
    assert "pointer=/counters" in page.url
    assert page.locator("#tree .key", has_text="tokens").is_visible()


# WCAG 2 contrast of an element's text against the first opaque background behind it.
CONTRAST = """element => {
    const rgb = color => color.match(/[\\d.]+/g).map(Number);
    const luminance = ([r, g, b]) => [r, g, b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
        .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
    let behind = element, background = [255, 255, 255];
    for (; behind; behind = behind.parentElement) {
        const color = rgb(getComputedStyle(behind).backgroundColor);
        if (color.length < 4 || color[3] > 0) { background = color; break; }
    }
    const [light, dark] = [luminance(rgb(getComputedStyle(element).color)), luminance(background)].sort((a, b) => b - a);
    return (light + 0.05) / (dark + 0.05);
}"""


def _every_status_and_a_damaged_version():
    from snapshots_app.integrity import integrity_problem_record

    operator = make_user("olga")
    project = make_project("acme")
    membership_set(project=project, user=operator, role=Role.OPERATOR)
    for status in ("running", "waiting", "completed", "failed", "cancelled"):
        session = make_session(project, f"run-{status}")
        version = snapshot_record(session=session, state={"n": 1}, status=status, error="boom" if status == "failed" else None)
    integrity_problem_record(version=version, detail="checksum mismatch")
    return session


def test_status_badges_and_integrity_problems_are_readable(server, browser):
    """Small text (12-14 px) needs a contrast of 4.5:1 (WCAG AA): red on the pink of a failure had 4.499,
    the grey hint on the integrity problems' pink 4.06, a link there 4.499."""
    session = off_loop(_every_status_and_a_damaged_version)
    page = log_in(browser, server, "olga")
    badges = page.locator("table.sessions .badge")
    assert badges.count() == 5
    low = {badges.nth(i).inner_text(): round(badges.nth(i).evaluate(CONTRAST), 3) for i in range(5)}
    page.goto(f"{server}/sessions/{session.pk}/")
    problems = page.locator("#integrity-problems :is(h2, li, p, a)")
    assert problems.count() == 4
    low |= {problems.nth(i).inner_text()[:30]: round(problems.nth(i).evaluate(CONTRAST), 3) for i in range(4)}
    assert all(ratio >= 4.5 for ratio in low.values()), low


def _superuser_story():
    from django.contrib.auth import get_user_model

    boss = get_user_model().objects.create_superuser("sally", password=PASSWORD)
    project = make_project("acme")
    membership_set(project=project, user=boss, role=Role.ADMIN)
    session = make_session(project, "run-42", workflow="research")
    record_history(session, 3)
    return session


def test_running_compaction_from_the_admin_asks_first(server, browser):
    """The projects list's "run now" opens a confirmation saying what retention would remove; "No,
    take me back" queues nothing, "Yes" queues the run."""
    from snapshots_app.compaction import retention_policy_set
    from snapshots_app.models import Job

    session = off_loop(_superuser_story)
    off_loop(lambda: retention_policy_set(project=session.project, enabled=True, keep_last=1, keep_days=0, thin_to="none"))
    page = log_in(browser, server, "sally")

    def ask() -> None:
        page.goto(f"{server}/admin/sessions_app/project/")
        page.check(f"input[name=_selected_action][value='{session.project.pk}']")
        page.select_option("select[name=action]", "compaction_queue")
        page.click("button[name=index]")
        page.wait_for_selector("#compaction-outlook")

    ask()
    assert "it would remove 2 of 3 versions (in 1 session)" in page.inner_text("#compaction-outlook")
    page.click("text=No, take me back")
    page.wait_for_selector("#result_list")
    assert off_loop(lambda: Job.objects.count()) == 0
    ask()
    page.click("input[type=submit][value^='Yes, run compaction']")
    page.wait_for_selector("ul.messagelist")
    assert "Queued 1 compaction job(s)" in page.inner_text("ul.messagelist")
    assert off_loop(lambda: list(Job.objects.values_list("kind", flat=True))) == ["compaction"]
    assert page.errors == []  # type: ignore[attr-defined]


def test_every_page_runs_under_the_content_security_policy(server, browser):
    """The policy allows no inline script: the dashboard (live socket, htmx fragments), the admin and
    the API docs all work under it, and the browser reports no violation on any of them."""
    session = off_loop(_superuser_story)
    page = log_in(browser, server, "sally")
    violations: list[str] = []
    page.on("console", lambda message: "Content Security Policy" in message.text and violations.append(message.text))
    _wait_for_socket(page, "#session-table .live")
    base = f"{server}/sessions/{session.pk}/"
    page.goto(base)
    _wait_for_socket(page, ".timeline-wrap")
    page.goto(base + "v/3/")
    page.click("#tree li.branch summary")  # a level loaded by htmx
    page.wait_for_selector("#tree li.branch ul.tree li.leaf")
    for path in (base + "diff/?from=1&to=3&mode=side", base + "v/1/rewind/", base + "history/?path=/counters/steps",
                 f"{server}/admin/", f"{server}/admin/snapshots_app/version/",
                 f"{server}/admin/sessions_app/membership/add/"):
        page.goto(path)
        page.wait_for_load_state("load")
    page.goto(f"{server}/api/v1/docs/")
    page.wait_for_selector(".opblock", timeout=10_000)  # Swagger UI ran, and read the schema
    assert violations == []
    assert page.errors == []  # type: ignore[attr-defined]


def _viewer_story(hostile):
    viewer = make_user("victor")
    project = make_project("acme")
    membership_set(project=project, user=viewer, role=Role.VIEWER)
    session = make_session(project, hostile)
    snapshot_record(session=session, state={hostile: hostile, "q": "\"'><svg onload=alert(3)>", "c": "\x07\x1b"},
                    step=hostile, error=hostile)
    snapshot_record(session=session, state={hostile: hostile + "!", "q": "x"}, step=hostile)
    return session


def test_viewer_has_no_rewind_button_gets_403_and_hostile_state_stays_inert(server, browser):
    hostile = '<script>alert("owned")</script><img src=x onerror=alert(2)>'
    session = off_loop(_viewer_story, hostile)
    page = log_in(browser, server, "victor")
    assert hostile in page.inner_text("table.sessions")
    page.click("a.ext")
    page.wait_for_selector("#timeline #v-2")
    assert page.locator("a.rewind").count() == 0 and page.locator("form.mark").count() == 0
    status = page.evaluate("""async (url) => {
        const token = document.body.getAttribute('hx-headers').match(/"X-CSRFToken": "([^"]+)"/)[1];
        const response = await fetch(url, {method: 'POST', headers: {'X-CSRFToken': token,
            'Content-Type': 'application/x-www-form-urlencoded'}, body: 'reason=sneaky&expected_version=2'});
        return response.status; }""", f"/sessions/{session.pk}/v/1/rewind/")
    assert status == 403
    for path in (f"/sessions/{session.pk}/v/1/", f"/sessions/{session.pk}/diff/?from=1&to=2",
                 f"/sessions/{session.pk}/v/1/?q=script"):
        page.goto(server + path)
        page.wait_for_load_state("load")
        assert page.locator("main script, main img, main svg[onload]").count() == 0
    page.goto(f"{server}/sessions/{session.pk}/v/1/")
    assert hostile in page.inner_text("#tree")
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.skipif(os.environ.get("UI_SCREENSHOTS") != "1", reason="set UI_SCREENSHOTS=1 to refresh README images")
def test_readme_screenshots(server, browser):
    """The README's pictures, taken on the demo data `make run` loads."""
    from django.core.management import call_command

    from sessions_app.models import WorkflowSession

    off_loop(call_command, "seed_demo", on_real_database=True, stdout=open(os.devnull, "w"))
    agent, rag = off_loop(lambda: (WorkflowSession.objects.get(external_id="research-agent-0001"),
                                   WorkflowSession.objects.get(external_id="llama-rag-0002")))
    page = browser.new_context(viewport={"width": 1280, "height": 820}).new_page()
    page.goto(f"{server}/accounts/login/")
    page.fill("input[name=username]", "operator")
    page.fill("input[name=password]", "rewind-demo")
    page.click("button[type=submit]")
    page.wait_for_selector("table.sessions")
    page.goto(f"{server}/sessions/{agent.pk}/")
    page.wait_for_selector("#timeline #v-5 .summary .add")
    page.screenshot(path=str(ROOT / "static/docs/timeline.png"), full_page=True)
    page.goto(f"{server}/sessions/{rag.pk}/diff/?from=1&to=3&mode=side")
    page.wait_for_selector("ol.changes")
    page.screenshot(path=str(ROOT / "static/docs/diff.png"), full_page=True)


def test_a_long_error_scrolls_in_its_box_and_leaves_the_state_on_the_first_screen(server, browser):
    """A 200-line traceback on a version's page pushed its state below the fold: the operator who opened
    the failed version to see what it held saw only the error."""
    session = off_loop(_operator_story)
    traceback = "Traceback (most recent call last):\n" + "".join(f'  File "step.py", line {n}, in run\n' for n in range(200))
    version = off_loop(snapshot_record, session=session, state={"x": 1}, status="failed", error=traceback + "KeyError: 'q'")
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/v/{version.number}/")
    box = page.locator("pre.verror")
    assert page.locator("#state-q").bounding_box()["y"] < 900 - 50  # the search and the state start on screen
    assert box.evaluate("el => el.scrollHeight > el.clientHeight")  # the rest is there, scrolled to
    box.focus()
    page.keyboard.press("End")
    page.wait_for_function("() => { const el = document.querySelector('pre.verror');"
                           " return el.scrollTop + el.clientHeight >= el.scrollHeight - 2; }", timeout=3_000)
    assert "KeyError: 'q'" in box.inner_text()
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_filtered_timeline_whose_socket_came_back_reloads_with_its_filter(server, browser):
    """Ticking a filter is not typing: the page's address carries it, so a reconnect reloads the page as
    it does unfiltered, filter kept, instead of asking for a reload as it must while a reason is typed."""
    session, page = _live_timeline(server, browser)
    page.check("#filter-has-error")
    page.wait_for_function("() => new URLSearchParams(location.search).get('has_error') === 'true'", timeout=5_000)
    _wait_for_socket(page, ".timeline-wrap")
    page.evaluate("() => { window.beforeDrop = true; }")
    server.stop(kill=True)
    off_loop(snapshot_record, session=session, state={"x": 6}, step="while-away", error="KeyError: 'q'")
    server.start()
    # htmx's ws extension retries with full jitter (up to 2^n s after the n-th failure): a server that
    # took a few seconds to come back may be tried again only ~16 s later.
    page.wait_for_selector("#timeline > li#v-6", timeout=45_000)
    assert page.evaluate("window.beforeDrop") is None and page.locator("#reconnected").count() == 0  # reloaded
    assert page.is_checked("#filter-has-error") and page.locator("#timeline > li.vrow").count() == 1
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_pin_clicked_after_the_sign_in_ended_signs_in_again_on_its_own_page(server, browser):
    """The sign-in page was swapped into the timeline row, inside the page that was signed out."""
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    timeline = f"{server}/sessions/{session.pk}/"
    page.goto(timeline)
    page.context.clear_cookies(name="sessionid")  # expired, or signed out in another tab
    page.click("#v-2 button:text-is('Pin')")
    page.wait_for_url(f"{server}/accounts/login/**")
    assert page.locator("input[name=username]").count() == 1 and page.locator("#timeline").count() == 0
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(timeline)
    page.wait_for_selector("#v-2")
    assert "Unpin" not in page.inner_text("#v-2")  # nothing was done while signed out: pin it again


def test_a_rewind_confirmed_after_the_sign_in_ended_keeps_its_reason_through_signing_in(server, browser):
    """The confirm page came back from signing in empty: the reason typed had to be typed again. It is
    filled in again (through a mistyped password too), nothing was done meanwhile, and confirming it
    rewinds with that reason; the reason does not come back on a later visit."""
    from sessions_app.models import AuditEvent

    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    confirm = f"{server}/sessions/{session.pk}/v/2/rewind/"
    page.goto(confirm)
    page.fill("textarea[name=reason]", "the search step returned garbage")
    page.context.clear_cookies(name="sessionid")  # expired, or signed out in another tab
    page.click("#confirm-rewind")
    page.wait_for_url(f"{server}/accounts/login/**")
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    page.wait_for_selector("p.error[role=alert]")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(confirm)
    assert page.input_value("textarea[name=reason]") == "the search step returned garbage"
    assert off_loop(lambda: session.versions.count()) == 5  # nothing was done while signed out
    page.click("#confirm-rewind")
    page.wait_for_selector("#timeline #v-6")
    event = off_loop(lambda: AuditEvent.objects.get(action="session.rewind"))
    assert event.reason == "the search step returned garbage"
    # The reason does not come back later; and v6 is v2 again now, so the page offers no second rewind.
    assert page.evaluate("() => sessionStorage.getItem('session-rewind-draft')") is None
    page.goto(confirm)
    assert page.locator("#confirm-rewind").count() == 0 and "already has v2's state" in page.inner_text("main")


def test_a_pin_refused_by_the_server_says_why_in_its_words_alone(server, browser):
    """A refusal answered with a page (403 in the layout) read as its title, top bar and all:
    "Not done: Not allowed · Session Rewind Session Rewind Acme olga Log out Not allowed Operators only…"."""
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    olga = session.project.memberships.get(user__username="olga").user
    off_loop(membership_set, project=session.project, user=olga, role=Role.VIEWER)  # demoted meanwhile
    page.click("#v-3 button:text-is('Pin')")
    page.wait_for_selector("#v-3 .action-error", timeout=5_000)
    assert page.inner_text("#v-3 .action-error") == "Not done: Operators only: viewers can read but not change sessions"

    # Signed in again in another tab since the page loaded: its token no longer counts.
    page.context.add_cookies([{"name": "csrftoken", "value": "a" * 32, "url": server}])
    page.click("#v-2 button:text-is('Pin')")
    page.wait_for_selector("#v-2 .action-error", timeout=5_000)
    assert page.inner_text("#v-2 .action-error").startswith("Not done: This page was loaded before you last signed in")
    assert "Unpin" not in page.inner_text("#timeline")


def test_the_end_of_a_long_diff_leads_on_to_its_next_changes_shown_from_their_start(server, browser):
    """Past 500 changes, the only "next" was at the top: read to the end, the operator had to scroll
    500 changes back up to go on."""
    def wide():
        operator = make_user("olga")
        project = make_project("acme")
        membership_set(project=project, user=operator, role=Role.OPERATOR)
        session = make_session(project, "wide")
        snapshot_record(session=session, state={"items": {f"k{i:03d}": i for i in range(601)}})
        snapshot_record(session=session, state={"items": {f"k{i:03d}": -i for i in range(601)}})
        return session

    session = off_loop(wide)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/diff/?from=1&to=2")
    end = page.locator("#diff-pager-end")
    assert end.inner_text() == "Changes 1\u2013500 of 600. Next changes"
    end.get_by_role("link", name="Next changes").click()
    page.wait_for_selector("ol.changes[start='501']")
    assert page.locator("#diff-pager-end").inner_text() == "Changes 501\u2013600 of 600. Previous changes"
    assert "offset=500" in page.url
    # The changes loaded are read from their start, not from where the previous ones ended.
    assert page.evaluate("() => document.getElementById('diff-body').getBoundingClientRect().top") >= 0
    assert page.locator("ol.changes > li").first.is_visible() and page.locator("ol.changes > li").first.bounding_box()["y"] < 900


def test_a_pin_that_gets_no_answer_says_so_instead_of_looking_ignored(server, browser):
    """The server restarting (a deploy) or the network gone: htmx reports no answer as an event of
    its own, which nothing listened to, so the click did nothing visible."""
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    page.route("**/v/3/mark/", lambda route: route.abort("connectionrefused"))
    page.click("#v-3 button:text-is('Pin')")
    page.wait_for_selector("#v-3 .action-error", timeout=5_000)
    assert page.inner_text("#v-3 .action-error").startswith("No answer from the server")
    assert page.get_attribute("#v-3 .action-error", "role") == "alert"

    # Tried again once it answers, the filter that failed shows its sessions and the note goes.
    page.goto(f"{server}/")
    page.route("**/?*status=failed*", lambda route: route.abort("connectionrefused"))
    page.select_option("select[name=status]", "failed")
    page.wait_for_selector("#filters .action-error", timeout=5_000)
    page.unroute("**/?*status=failed*")
    page.click("#filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('a.ext').length === 1")
    assert page.locator("#filters .action-error").count() == 0


def test_a_live_timeline_whose_user_was_signed_out_goes_to_sign_in_instead_of_looking_live(server, browser):
    """The server closes the socket for good once the browser session no longer signs its user in;
    the page went on looking live while nothing reached it any more."""
    session, page = _live_timeline(server, browser)
    other = page.context.new_page()  # the same browser, another tab: logs out
    other.goto(f"{server}/")
    other.click("form.logout button")
    other.wait_for_selector("input[name=username]")
    off_loop(snapshot_record, session=session, state={"x": 6}, step="after-logout")
    page.wait_for_url(f"{server}/accounts/login/?next=/sessions/{session.pk}/", timeout=10_000)
    assert page.locator("input[name=username]").count() == 1


def test_versions_picked_to_compare_stay_picked_when_their_rows_are_redrawn_live(server, browser):
    """Another operator's pin (or a summary arriving) redraws a row: the A or B picked in it went
    with it, and "Diff A → B" then compared other versions than the ones picked, saying nothing."""
    from snapshots_app.models import Version
    from snapshots_app.services import version_pin

    session, page = _live_timeline(server, browser)
    page.get_by_role("radio", name="Compare from v2 (A)", exact=True).check()
    page.get_by_role("radio", name="Compare to v4 (B)", exact=True).check()
    for number in (2, 4):
        off_loop(lambda n=number: version_pin(version=Version.objects.get(session=session, number=n), pinned=True))
        page.wait_for_selector(f"#v-{number} .badge.pin", timeout=5_000)
    assert page.get_by_role("radio", name="Compare from v2 (A)", exact=True).is_checked()
    assert page.get_by_role("radio", name="Compare to v4 (B)", exact=True).is_checked()
    page.click("#diff-selected")
    page.wait_for_selector("ol.changes")
    assert "from=2" in page.url and "to=4" in page.url
    # The operator's own pin redraws the row too.
    page.go_back()
    page.wait_for_selector("#timeline #v-3")
    page.get_by_role("radio", name="Compare from v3 (A)", exact=True).check()
    page.click("#v-3 button:text-is('Pin')")
    page.wait_for_selector("#v-3 .badge.pin", timeout=5_000)
    page.wait_for_timeout(300)  # (its live update, which redraws the row once more)
    assert page.get_by_role("radio", name="Compare from v3 (A)", exact=True).is_checked()


def test_at_a_phone_width_a_sessions_status_reads_as_one_word(server, browser):
    """The list's status column is squeezed at a phone's width, and badges may break anywhere (a long
    label must): statuses read "Waitin g", "Complet ed", "Runn ing"."""
    def sessions():
        operator = make_user("olga")
        project = make_project("acme")
        membership_set(project=project, user=operator, role=Role.OPERATOR)
        for name, status in (("support-chat-0003", "waiting"), ("llama-rag-0002", "completed"),
                             ("research-agent-0001", "running"), ("nightly-ingest-0004", "cancelled")):
            session = make_session(project, name, workflow="research_agent", tags=["demo"])
            snapshot_record(session=session, state={"x": 1}, step="summarise", status=status)

    off_loop(sessions)
    page = log_in(browser, server, "olga")
    page.set_viewport_size({"width": 375, "height": 800})
    page.goto(f"{server}/")
    badges = page.locator("table.sessions .badge[class*=status-]")
    assert badges.count() == 4
    for badge in badges.all():
        lines = badge.evaluate("el => Math.round(el.getBoundingClientRect().height / parseFloat(getComputedStyle(el).lineHeight))")
        assert lines == 1, badge.inner_text()


def test_an_operator_exports_a_session_and_downloads_the_file_from_its_page(server, browser, tmp_path):
    session = off_loop(_operator_story)
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    assert page.locator("#exports").is_hidden()
    page.click("#export")
    page.wait_for_selector("#exports a.export-file", timeout=10_000)  # a worker's job (eager here) wrote the file
    assert "Export started" in page.inner_text(".messages") and "5 versions" in page.inner_text("#exports")
    with page.expect_download() as download:
        page.click("#exports a.export-file")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name.startswith("acme-session-run-42-") and saved.suffix == ".ndjson"
    lines = saved.read_bytes().splitlines()
    assert b'"type":"header"' in lines[0] and sum(b'"type":"version"' in line for line in lines) == 5
    assert page.errors == [] and page.console_errors == []


def test_an_export_that_finished_unannounced_shows_its_link_without_a_reload(server, browser, settings):
    """A small session's export finished before the redirected page's socket joined: its event was
    lost and the page said "0 % · running" until reloaded. An unfinished export's section asks again."""
    from django.utils import timezone

    from snapshots_app.models import Job, JobKind, JobStatus
    from snapshots_app.transfer import transfer_export_run

    settings.VAR_DIR = server.var_dir  # the file goes where the server looks for it
    session = off_loop(_operator_story)
    job = off_loop(lambda: Job.objects.create(project=session.project, session=session, kind=JobKind.EXPORT,
                                              params={"scope": "session"}, created_by_label="olga"))
    page = log_in(browser, server, "olga")
    page.goto(f"{server}/sessions/{session.pk}/")
    assert "waiting for a worker" in page.inner_text("#exports")

    def finish_without_an_event() -> None:  # as a worker whose events the page missed
        result = transfer_export_run(project=session.project, session=session, job=job)
        Job.objects.filter(pk=job.pk).update(status=JobStatus.DONE, result=result, finished_at=timezone.now(),
                                             done=1, total=1)
    off_loop(finish_without_an_event)
    page.wait_for_selector("#exports a.export-file", timeout=6_000)
    assert "5 versions" in page.inner_text("#exports") and page.errors == [] and page.console_errors == []

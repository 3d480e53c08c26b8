"""The dashboard as a user sees it, through Django's test client against PostgreSQL."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta

import orjson
import pytest
from django.urls import reverse
from django.utils import timezone

from sessions_app.models import AuditEvent, Role, SessionStatus, WorkflowSession
from sessions_app.selectors import removed_numbers
from sessions_app.services import membership_set, session_update
from snapshots_app.models import Version
from snapshots_app.services import snapshot_record, version_pin
from tests.factories import make_project, make_session, make_user
from tests.ui.conftest import record_history

HOSTILE = '<script>alert("x")</script>'


def session_url(session, name="snapshots:session", **kwargs):
    return reverse(name, kwargs={"session_id": session.pk, **kwargs})


# -- session list ------------------------------------------------------------------------------------


def test_list_requires_login(client):
    response = client.get(reverse("sessions:list"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_switcher_shows_only_my_projects_and_never_another_projects_sessions(client, operator, team, story):
    other = make_project("globex")
    make_session(other, "secret-run")
    second = make_project("initech")
    membership_set(project=second, user=operator, role=Role.VIEWER)
    client.force_login(operator)
    page = client.get(reverse("sessions:list")).content.decode()
    assert "Acme" in page and "Initech" in page and "Globex" not in page
    assert "run-42" in page and "secret-run" not in page
    page = client.get(reverse("sessions:list"), {"project": "globex"}).content.decode()
    assert "secret-run" not in page  # an unknown slug falls back to one of the user's own projects


def test_filters_narrow_the_list(client, operator, team, story):
    failed = make_session(team, "run-failed", workflow="ingest", tags=["adhoc"])
    snapshot_record(session=failed, state={"x": 1}, status="failed", error="TimeoutError: tool")
    make_session(team, "run-idle", workflow="ingest")
    client.force_login(operator)
    url = reverse("sessions:list")

    def shown(**params):
        page = client.get(url, {"project": "acme", **params}).content.decode()
        return set(re.findall(r'class="ext">([^<]+)<', page))

    assert shown() == {"run-42", "run-failed", "run-idle"}
    assert shown(status="failed") == {"run-failed"}
    assert shown(has_error="yes") == {"run-failed"}
    assert shown(has_error="no") == {"run-42", "run-idle"}
    assert shown(workflow="ingest") == {"run-failed", "run-idle"}
    assert shown(tag="nightly") == {"run-42"}
    assert shown(q="FAIL") == {"run-failed"}
    assert shown(q="research") == {"run-42"}
    # A session's id, or a link to it, pasted from a log, the API or a colleague's message.
    assert shown(q=str(failed.pk).upper()) == {"run-failed"}
    assert shown(q=f"https://rewind.example.com/sessions/{failed.pk}/v/1/") == {"run-failed"}
    assert shown(has_error="true") == {"run-failed"}  # as the timeline and the API spell it
    assert shown(has_error="false") == {"run-42", "run-idle"}
    assert shown(has_error="1") == {"run-failed"}  # as the API reads it
    assert "Has error: &#x27;maybe&#x27; is not one of yes (has an error)" in client.get(url, {"has_error": "maybe"}).content.decode()
    assert shown(updated_from="2000-01-01", updated_to="2000-01-02") == set()
    assert shown(sort="external_id") == {"run-42", "run-failed", "run-idle"}


def test_the_lists_socket_asks_for_a_top_only_where_sessions_belong_on_top(client, operator, team, story):
    """The first page of the latest activity or the newest first asks its socket for a top, with its
    filters; other sorts, and pages loaded with "Load more", have their rows redrawn in place."""
    client.force_login(operator)
    url = reverse("sessions:list")

    def socket(**params):
        page = client.get(url, {"project": "acme", **params}).content.decode()
        found = re.search(r'ws-connect="([^"]*)"', page)
        return html.unescape(found[1]) if found else None

    assert socket() == "/ws/projects/acme/?top=1"
    assert socket(status="failed", q="é & co") == "/ws/projects/acme/?status=failed&q=%C3%A9+%26+co&top=1"
    assert socket(sort="-created") == "/ws/projects/acme/?sort=-created&top=1"
    assert socket(sort="external_id") == "/ws/projects/acme/"
    assert socket(sort="updated") == "/ws/projects/acme/"
    assert socket(updated_from="2026-02-30") == "/ws/projects/acme/"  # a filter the list cannot use


def test_the_date_filter_shows_the_days_typed_and_a_reload_keeps_the_range(client, operator, team, story):
    """"to" is kept as the moment the range ends (the next midnight): its field showed the day after
    the one typed, and each reload and filter change from there moved the range on by a day."""
    client.force_login(operator)
    url = reverse("sessions:list")
    query = {"updated_from": "2026-12-01", "updated_to": "2026-12-07", "status": "running"}
    for _ in range(2):  # what the page shows is what it sends again
        page = client.get(url, query).content.decode()
        shown = {name: re.search(rf'name="{name}" value="([^"]*)"', page)[1] for name in ("updated_from", "updated_to")}
        assert shown == {"updated_from": "2026-12-01", "updated_to": "2026-12-07"}
        query.update(shown)
    day = story.updated_at.date().isoformat()
    assert "run-42" in client.get(url, {"updated_from": day, "updated_to": day}).content.decode()


def test_list_shows_badges_counts_size_step_and_error(client, operator, team):
    session = make_session(team, "run-err")
    snapshot_record(session=session, state={"a": "b" * 3000}, step="fetch", status="failed", error="Boom: it broke")
    client.force_login(operator)
    page = client.get(reverse("sessions:list")).content.decode()
    assert "status-failed" in page and "Boom: it broke" in page and "fetch" in page and "2.9\xa0KB" in page


TRACEBACK = """Traceback (most recent call last):
  File "/srv/agent/graph.py", line 118, in run_node
    result = await node.invoke(state, config=config, callbacks=self.callbacks)
             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/srv/agent/tools/search.py", line 42, in invoke
    return self.client.search(query, timeout=30)
TimeoutError: tool 'search' did not answer within 30 s
"""


def test_a_failed_sessions_traceback_reads_as_its_exception_where_there_is_room_for_a_line(client, operator, team):
    """Cut to fit, the list, the session's header and the timeline showed a traceback's opening
    ("Traceback (most recent call last): File …"), alike for every failed session, never the error."""
    session = make_session(team, "run-tb")
    snapshot_record(session=session, state={"a": 1}, step="search", status="failed", error=TRACEBACK)
    client.force_login(operator)
    gist = "TimeoutError: tool &#x27;search&#x27; did not answer within 30 s"
    listed = client.get(reverse("sessions:list")).content.decode()
    row = re.search(r'<td class="err"[^>]*>(.*?)</td>', listed, re.S).group(1)
    assert row == gist
    page = client.get(session_url(session)).content.decode()
    header = re.search(r'<dt>Last error</dt><dd><span class="error"[^>]*>(.*?)</span>', page, re.S).group(1)
    timeline = re.search(r'<div class="verror error"[^>]*>(.*?)</div>', page, re.S).group(1)
    assert header == gist and timeline == gist
    # The header leads to the failing versions, whose pages have the whole text.
    assert f'href="/sessions/{session.pk}/?has_error=true" id="errors-link"' in page
    assert "line 42, in invoke" in html.unescape(page)  # the whole traceback stays in the title
    version = client.get(session_url(session, "snapshots:version", number=1)).content.decode()
    assert "/srv/agent/tools/search.py" in version and gist in version  # and on the version's page


def test_the_gist_of_an_error_is_the_last_exception_of_a_traceback_and_any_other_error_as_it_is():
    from sessions_app.templatetags.rewind import error_gist

    chained = ("Traceback (most recent call last):\n  File \"a.py\", line 1, in f\n    g()\nKeyError: 'k'\n\n"
               "During handling of the above exception, another exception occurred:\n\n"
               "Traceback (most recent call last):\n  File \"a.py\", line 3, in f\n    raise ValueError(\"bad\\nworse\")\n"
               "ValueError: bad\nworse")
    assert error_gist(chained) == "ValueError: bad\nworse"
    assert error_gist("Traceback (most recent call last):\n") == "Traceback (most recent call last):"
    assert error_gist("Error: fetch failed\n    at run (agent.js:3:9)") == "Error: fetch failed\n    at run (agent.js:3:9)"
    assert error_gist(None) == "" and error_gist("Boom") == "Boom"


def test_recent_activity_reads_in_seconds_and_older_in_minutes(client, operator, team):
    """Whether an engine wrote a moment ago or a minute ago: "0 minutes ago" said the same for both."""
    from datetime import timedelta

    from django.utils import timezone

    from sessions_app.models import WorkflowSession

    fresh, stale = make_session(team, "fresh-run"), make_session(team, "stale-run")
    WorkflowSession.objects.filter(pk=stale.pk).update(updated_at=timezone.now() - timedelta(minutes=3, seconds=5))
    client.force_login(operator)
    page = client.get(reverse("sessions:list")).content.decode()
    assert "0\xa0minutes" not in page
    assert re.search(rf'id="s-{fresh.pk}".*?<time datetime="[^"]+" title="[^"]+" data-ago="\d+">\d+ s ago</time>', page, re.S)
    assert re.search(rf'id="s-{stale.pk}".*?<time datetime="[^"]+" title="[^"]+" data-ago="\d+">3\xa0minutes ago</time>', page, re.S)


@pytest.mark.parametrize("sort", ["-updated", "updated", "-created", "external_id"])
def test_keyset_pages_cover_every_session_once(client, operator, team, sort, settings):
    for index in range(7):
        make_session(team, f"s-{index:02d}")
    client.force_login(operator)
    from sessions_app import selectors

    original = selectors.SESSION_PAGE
    selectors.SESSION_PAGE = 3
    try:
        seen, after = [], ""
        for _ in range(5):
            params = {"project": "acme", "sort": sort}
            if after:
                params["after"] = after
            page = client.get(reverse("sessions:list"), params).content.decode()
            seen += re.findall(r'class="ext">([^<]+)<', page)
            match = re.search(r'after=([^"&]+)"', page)
            if not match:
                break
            after = match.group(1).replace("%3D", "=")
    finally:
        selectors.SESSION_PAGE = original
    assert sorted(seen) == [f"s-{index:02d}" for index in range(7)]


def test_the_list_sorted_newest_first_reads_each_page_from_its_index(client, operator, team):
    """"Newest" (sort=-created) pages through session_project_created, as "Recently updated" does through
    its index: without it each page sorted every session of the project (38 ms at 50,000 sessions)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from sessions_app.selectors import SessionFilters, session_list
    from tests.conftest import query_plan

    for index in range(4):
        make_session(team, f"s-{index}")
    client.force_login(operator)
    with CaptureQueriesContext(connection) as queries:
        page = client.get(reverse("sessions:list"), {"project": "acme", "sort": "-created"}).content.decode()
    assert re.findall(r'class="ext">([^<]+)<', page) == ["s-3", "s-2", "s-1", "s-0"]
    first, after = session_list(project=team, filters=SessionFilters(sort="-created"), limit=2)
    with CaptureQueriesContext(connection) as next_queries:
        second, _ = session_list(project=team, filters=SessionFilters(sort="-created"), after=after, limit=2)
    assert [s.external_id for s in first + second] == ["s-3", "s-2", "s-1", "s-0"]
    listing = [q["sql"] for q in queries.captured_queries + next_queries.captured_queries
               if 'FROM "sessions_app_workflowsession"' in q["sql"]]
    assert len(listing) == 2  # the first page (by the view) and the next
    for sql in listing:
        plan = query_plan(sql, priced_out=("seqscan", "sort"))
        assert "session_project_created" in plan and "Sort" not in plan, plan


def test_htmx_request_gets_only_the_fragment(client, operator, team, story):
    client.force_login(operator)
    response = client.get(reverse("sessions:list"), {"status": "running"}, HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert "<html" not in body and "run-42" in body and "<table" in body
    boosted = client.get(reverse("sessions:list"), HTTP_HX_REQUEST="true", HTTP_HX_BOOSTED="true")
    assert "<html" in boosted.content.decode()


def test_list_query_count_does_not_grow_with_rows(client, operator, team, django_assert_num_queries):
    client.force_login(operator)
    client.get(reverse("sessions:list"))  # warm the session/auth lookups
    for index in range(3):
        make_session(team, f"few-{index}")
    with django_assert_num_queries(4):  # session, user, projects, sessions page
        client.get(reverse("sessions:list"))
    for index in range(40):
        make_session(team, f"many-{index}", tags=["t"])
    with django_assert_num_queries(4):
        client.get(reverse("sessions:list"))


# -- timeline ----------------------------------------------------------------------------------------


def test_timeline_shows_versions_newest_first_with_summaries(client, viewer, story):
    client.force_login(viewer)
    page = client.get(session_url(story)).content.decode()
    numbers = re.findall(r'<li id="v-(\d+)"', page)
    assert numbers == ["5", "4", "3", "2", "1"]
    assert "step-5" in page and "initial state" in page
    assert '<span class="add">+' in page  # finalize ran: counts, not the "…" placeholder


def test_times_written_out_say_they_are_utc(client, operator, story):
    """An operator reading "2026-12-07 01:23:45" at 3 a.m. in Berlin could not tell it was an hour
    behind the clock on the wall: the pages showed UTC without saying so."""
    client.force_login(operator)
    stamp = Version.objects.get(session=story, number=2).created_at.strftime("%Y-%m-%d %H:%M:%S")
    for page in (session_url(story), session_url(story, "snapshots:version", number=2),
                 session_url(story, "snapshots:rewind", number=2),
                 session_url(story, "snapshots:history") + "?path=/counters/tokens"):
        assert f"{stamp} UTC" in client.get(page).content.decode(), page


def test_a_collapsed_object_or_array_counts_its_members_in_words_that_fit_the_number():
    from snapshots_app import jsonview

    assert [jsonview.preview(value)[0] for value in ({}, {"a": 1}, {"a": 1, "b": 2}, [], [1], [1, 2])] == [
        "{0 keys}", "{1 key}", "{2 keys}", "[0 items]", "[1 item]", "[2 items]"]


def test_unfinalized_version_shows_ellipsis(client, viewer, story):
    Version.objects.filter(session=story, number=5).update(summary=None)
    client.force_login(viewer)
    page = client.get(session_url(story)).content.decode()
    assert 'class="pending"' in page


def test_timeline_pages_by_number(client, viewer, team, settings):
    session = make_session(team, "long")
    record_history(session, 55)
    client.force_login(viewer)
    first = client.get(session_url(session)).content.decode()
    assert len(re.findall(r'<li id="v-', first)) == 50 and "?before=6" in first
    more = client.get(session_url(session), {"before": 6}, HTTP_HX_REQUEST="true").content.decode()
    assert re.findall(r'<li id="v-(\d+)"', more) == ["5", "4", "3", "2", "1"] and "<html" not in more
    # The same page opened as a page ("Older versions" without JavaScript, or in a new tab) says what
    # it shows and leads back to the newest; one past the oldest says so (it was a bare, empty list,
    # and ?before=0 said "No versions yet." of a session with 55).
    older = client.get(session_url(session), {"before": 6}).content.decode()
    assert "Versions before v6." in older and f'<a href="{session_url(session)}">Newest versions</a>' in older
    assert 'id="timeline"' not in older  # (live rows go to the newest page only)
    for before in (1, 0):
        page = client.get(session_url(session), {"before": before}).content.decode()
        assert f"No versions before v{before}." in page and "No versions yet" not in page
    assert "No versions before" not in client.get(session_url(session), {"before": 1}, HTTP_HX_REQUEST="true").content.decode()


def test_a_version_a_diff_and_a_confirm_page_lead_back_to_the_timeline_page_that_shows_the_version(client, viewer, team):
    """Their way back pointed at #v-N on the newest page (50 rows): for an older version it was not
    there, and the link landed at the top of the newest versions."""
    session = make_session(team, "long")
    record_history(session, 55)
    client.force_login(viewer)
    for number, back in ((5, f"{session_url(session)}?before=6#v-5"), (6, f"{session_url(session)}#v-6")):
        for page in (client.get(session_url(session, "snapshots:version", number=number)),
                     client.get(session_url(session, "snapshots:diff"), {"to": number})):
            assert f'<a href="{back}">' in page.content.decode()
        shown = client.get(back.split("#")[0]).content.decode()
        assert f'<li id="v-{number}"' in shown
    # So does Cancel on the confirm pages of a rewind or fork started from an older version's row.
    oscar = make_user("oscar")
    membership_set(project=team, user=oscar, role=Role.OPERATOR)
    client.force_login(oscar)
    for name in ("snapshots:rewind", "snapshots:fork"):
        page = client.get(session_url(session, name, number=5)).content.decode()
        assert f'<a href="{session_url(session)}?before=6#v-5">Cancel</a>' in page
    # Pages count versions, not numbers: once retention has left a gap, v5 is on the newest page.
    Version.objects.filter(session=session, number__gt=5).filter(number__lt=17).update(parent=None)
    Version.objects.filter(session=session, number__in=range(6, 17)).delete()
    assert '<li id="v-5"' in client.get(session_url(session)).content.decode()
    assert f'<a href="{session_url(session)}#v-5">' in client.get(session_url(session, "snapshots:version", number=5)).content.decode()


def test_timeline_query_count_does_not_grow_with_versions(client, operator, team, django_assert_num_queries):
    session = make_session(team, "counted")
    client.force_login(operator)
    record_history(session, 2)
    client.get(session_url(session))
    # django session, user, session, role, versions, forks, integrity problems, exports (an operator's)
    with django_assert_num_queries(8):
        client.get(session_url(session))
    record_history(session, 30, start=3)
    source = Version.objects.get(session=session, number=10)
    from snapshots_app.services import snapshot_fork, snapshot_rewind

    snapshot_rewind(session=session, to_version=4, reason="test")
    snapshot_fork(session=session, from_version=source.number, reason="what if")
    with django_assert_num_queries(8):
        client.get(session_url(session))


def _marked_history(team):
    """130 versions, the even ones with an error; v3 and v4 pinned, v9 labelled; then a rewind to it (v131,
    without an error: a rewind's version carries its target's)."""
    from snapshots_app.services import snapshot_rewind, version_label, version_pin

    session = make_session(team, "marked")
    for number in range(1, 131):
        snapshot_record(session=session, state={"n": number}, step=f"step-{number}",
                        error="TimeoutError: tool did not answer" if number % 2 == 0 else None)
    for number in (3, 4):
        version_pin(version=Version.objects.get(session=session, number=number), pinned=True)
    version_label(version=Version.objects.get(session=session, number=9), label="last good")
    snapshot_rewind(session=session, to_version=9, reason="tool outage")
    session.refresh_from_db()
    return session


def _rows(page: str) -> list[int]:
    return [int(number) for number in re.findall(r'<li id="v-(\d+)"', page)]


def test_timeline_filters_show_only_the_versions_asked_for_and_say_when_there_are_none(client, viewer, team):
    session = _marked_history(team)
    client.force_login(viewer)

    def shown(**query):
        response = client.get(session_url(session), query)
        assert response.status_code == 200
        return response.content.decode()

    assert _rows(shown(pinned="true")) == [4, 3]
    assert _rows(shown(labelled="true")) == [9]
    assert _rows(shown(kind="rewind")) == [131]
    assert _rows(shown(pinned="true", has_error="true")) == [4]  # every filter chosen, at once
    page = shown(has_error="true")
    assert _rows(page) == list(range(130, 30, -2))
    # The form says what is shown (a shared link opens with its boxes ticked), and leads back to everything.
    assert re.search(r'name="has_error" value="true" id="filter-has-error" checked', page)
    assert not re.search(r'name="pinned" value="true" id="filter-pinned" checked', page)
    assert "· versions with an error</span>" in page and f'href="{session_url(session)}" id="all-versions"' in page
    assert '<option value="rewind" selected>' in shown(kind="rewind")
    # Nothing matches: the timeline says so in the filters' words (not "No versions yet").
    for query, empty in [({"kind": "fork"}, "No forks (to or from here)."), ({"pinned": "true", "labelled": "true"}, "No pinned, labelled versions."),
                         ({"kind": "data_fix", "has_error": "true"}, "No data fixes with an error.")]:
        page = shown(**query)
        assert _rows(page) == [] and f'<li class="empty">{empty}</li>' in page and "No versions yet" not in page
    # A kind the filter does not offer (an engine's step, a typo) is any kind, as an old link should read.
    unfiltered = shown()
    assert _rows(shown(kind="step")) == _rows(unfiltered) == list(range(131, 81, -1))
    assert 'id="all-versions"' not in unfiltered and "Older versions" in unfiltered


def test_older_versions_of_a_filtered_timeline_keep_its_filter(client, viewer, team):
    """"Older versions" (loaded by htmx as it scrolls into view, or followed as a link without
    JavaScript) goes on with the versions the filter shows, and its page says so."""
    session = _marked_history(team)
    client.force_login(viewer)
    first = client.get(session_url(session), {"has_error": "true"}).content.decode()
    more = re.search(r'<li class="more"><a href="([^"]+)"', first)[1].replace("&amp;", "&")
    assert more == f"{session_url(session)}?has_error=true&before=32"
    rows = client.get(more, HTTP_HX_REQUEST="true").content.decode()
    assert _rows(rows) == list(range(30, 0, -2)) and "<html" not in rows and "Older versions" not in rows
    page = client.get(more).content.decode()
    assert _rows(page) == list(range(30, 0, -2)) and "Versions with an error before v32." in page
    assert f'<a href="{session_url(session)}?has_error=true">Newest versions</a>' in page
    # The link app.js puts below a busy live timeline's kept rows continues with the filter as well.
    template = re.search(r'<template id="timeline-more">.*?</template>', first, re.S)[0]
    assert f'href="{session_url(session)}?has_error=true&amp;before="' in template
    assert "No pinned versions before v3." in client.get(session_url(session), {"pinned": "true", "before": 3}).content.decode()


def test_the_filter_form_swaps_in_the_timeline_and_its_socket_with_the_filter(client, viewer, team):
    """With htmx the filter form asks for the timeline without `before`: the section comes back whole,
    its live socket's address carrying the filter (so new versions it would not show stay out)."""
    session = _marked_history(team)
    client.force_login(viewer)
    fragment = client.get(session_url(session), {"pinned": "true", "kind": ""}, HTTP_HX_REQUEST="true").content.decode()
    assert "<html" not in fragment and fragment.strip().startswith('<section class="timeline-wrap" id="timeline-section"')
    assert f'ws-connect="/ws/sessions/{session.pk}/?shown=131&amp;pinned=true"' in fragment
    assert _rows(fragment) == [4, 3]
    page = client.get(session_url(session)).content.decode()
    assert f'ws-connect="/ws/sessions/{session.pk}/?shown=131"' in page


def test_a_filtered_timeline_costs_the_queries_of_an_unfiltered_one(client, operator, team, django_assert_num_queries):
    session = make_session(team, "counted")
    for number in range(1, 8):
        snapshot_record(session=session, state={"n": number}, error="boom" if number % 2 else None)
    client.force_login(operator)
    client.get(session_url(session))
    # django session, user, session, role, versions, forks, integrity problems, exports (an operator's)
    with django_assert_num_queries(8):
        assert _rows(client.get(session_url(session), {"has_error": "true"}).content.decode()) == [7, 5, 3, 1]


def test_lineage_shows_rewind_source_and_forks(client, operator, story, django_assert_num_queries):
    from snapshots_app.services import snapshot_fork, snapshot_rewind

    snapshot_rewind(session=story, to_version=2, reason="bad tool output")
    fork = snapshot_fork(session=story, from_version=3, external_id="run-42-alt", reason="what if", actor=operator)
    client.force_login(operator)
    client.get(session_url(story))
    # django session, user, session, role, versions, forks, integrity problems, exports (an operator's): the forks'
    # authors come with them
    with django_assert_num_queries(8):
        page = client.get(session_url(story)).content.decode()
    assert "restored <a" in page and "v2</a>" in page and "branch v3\u2013v5 left behind" in page
    # v3's row names its author, then the fork with who made it and why (the fork read as v3's author's).
    row = re.sub(r"<[^>]+>|\s+", " ", page[page.index('<li id="v-3"'):page.index('<li id="v-2"')])
    assert re.search(rf"by system +↪ forked to +run-42-alt +by {operator.username} +· “what if”", row), row
    forked = client.get(session_url(fork)).content.decode()
    assert "forked from" in forked and "diff vs source" in forked
    # The fork names its source ("Forked from another session") and what its first version holds
    # (its change summary read "+0 \u22120 ~0", an empty diff).
    assert f'Forked from <a href="{session_url(story)}">run-42</a> at version 3.' in forked
    assert "same state as run-42 v3" in forked and "\u22120" not in forked


def test_a_fork_whose_source_session_was_deleted_still_says_it_is_a_fork(client, operator, story):
    """Retention keeps fork sources; only deleting the source session unlinks a fork (its "diff vs
    source" link has nothing left to diff), and the timeline said nothing at all about it."""
    from sessions_app.services import session_delete
    from snapshots_app.services import snapshot_fork

    fork = snapshot_fork(session=story, from_version=3, external_id="run-42-alt", reason="what if")
    session_delete(session=story, reason="cleanup")
    client.force_login(operator)
    page = client.get(session_url(fork)).content.decode()
    assert "forked from a session no longer here" in page and "diff vs source" not in page


def test_non_member_gets_404(client, story):
    stranger = make_user("mallory")
    client.force_login(stranger)
    assert client.get(session_url(story)).status_code == 404
    assert client.get(session_url(story, "snapshots:version", number=1)).status_code == 404
    assert client.get(session_url(story, "snapshots:raw", number=1)).status_code == 404


# -- rewind, fork, pin, label ------------------------------------------------------------------------


def test_viewer_sees_no_rewind_button_and_gets_403(client, viewer, story):
    client.force_login(viewer)
    page = client.get(session_url(story)).content.decode()
    assert "Rewind here" not in page and "Fork…" not in page and ">Pin<" not in page
    refused = client.get(session_url(story, "snapshots:rewind", number=2))
    assert refused.status_code == 403 and f'href="{session_url(story)}">Back to the session<' in refused.content.decode()
    response = client.post(session_url(story, "snapshots:rewind", number=2), {"reason": "try"})
    assert response.status_code == 403
    assert client.post(session_url(story, "snapshots:fork", number=2), {"reason": "x"}).status_code == 403
    assert client.post(session_url(story, "snapshots:mark", number=2), {"pinned": "1"}).status_code == 403
    story.refresh_from_db()
    assert story.head_number == 5


def test_rewind_confirm_shows_the_effect_then_acts_with_a_reason(client, operator, story):
    client.force_login(operator)
    confirm = client.get(session_url(story, "snapshots:rewind", number=2)).content.decode()
    assert "v5 → v2" in confirm and "/counters/steps" in confirm and 'name="reason"' in confirm
    missing = client.post(session_url(story, "snapshots:rewind", number=2), {"reason": " ", "expected_version": 5})
    assert missing.status_code == 400 and "reason is required" in missing.content.decode()
    stale = client.post(session_url(story, "snapshots:rewind", number=2), {"reason": "tool lied", "expected_version": 4})
    page = html.unescape(stale.content.decode())  # in the page's words, not the API's "expected head version 4 but..."
    assert stale.status_code == 409 and "v5 was written since this page was shown: nothing was rewound." in page
    assert 'value="5"' in page and "tool lied" in page  # the form again, from the new head, the reason kept
    done = client.post(session_url(story, "snapshots:rewind", number=2), {"reason": "tool lied", "expected_version": 5},
                       follow=True)
    page = done.content.decode()
    assert "the new head is version 6" in page
    story.refresh_from_db()
    head = Version.objects.get(session=story, number=6)
    assert story.head_number == 6 and head.kind == "rewind" and head.parent.number == 2
    audit = AuditEvent.objects.get(action="session.rewind")
    assert audit.reason == "tool lied" and audit.actor_label == "olga"


def test_the_rewind_confirm_names_the_versions_that_stay_in_words_that_fit_how_many(client, operator, story):
    """Rewinding one version back said "Nothing is deleted: v5\u2013v5 stay in the history"."""
    client.force_login(operator)
    one_back = client.get(session_url(story, "snapshots:rewind", number=4)).content.decode()
    assert "Nothing is deleted: v5 stays in the history." in one_back
    further = client.get(session_url(story, "snapshots:rewind", number=2)).content.decode()
    assert "Nothing is deleted: v3\u2013v5 stay in the history." in further


def test_rewinding_a_running_or_waiting_session_warns_that_its_engine_may_write_over_it(client, operator, story):
    """An engine still working (or waiting for input) writes its next step from its own memory, on top
    of the rewind: the confirm page says so while the session is running or waiting, and not once it
    has stopped."""
    from sessions_app.services import session_update

    client.force_login(operator)
    session_update(session=story, status="running", actor=operator)
    page = client.get(session_url(story, "snapshots:rewind", number=2)).content.decode()
    assert 'id="engine-running"' in page and "its next step is written on top of this rewind" in page
    # Waiting for input, it writes its next step from memory too, once the input arrives.
    session_update(session=story, status="waiting", actor=operator)
    page = client.get(session_url(story, "snapshots:rewind", number=2)).content.decode()
    assert 'id="engine-running"' in page and "This session is waiting" in page
    session_update(session=story, status="completed", actor=operator)
    page = client.get(session_url(story, "snapshots:rewind", number=2)).content.decode()
    assert 'id="engine-running"' not in page and 'name="reason"' in page


def test_the_engine_warning_dates_the_engines_last_step_not_a_colleagues_rewind(client, operator, story):
    """A rewind copies its version's status: rewound to a running step, the session reads running and
    the next confirm page warns. It said "its last step was written 12 s ago" of the rewind itself."""
    from snapshots_app.services import snapshot_rewind

    last_step = Version.objects.filter(session=story).order_by("-number").first()
    Version.objects.filter(pk=last_step.pk).update(created_at=timezone.now() - timedelta(hours=3))
    snapshot_rewind(session=story, to_version=2, reason="back to the good one", actor=operator)
    story.refresh_from_db()
    assert story.status == "running"
    client.force_login(operator)
    warning = re.search(r'<p class="caution" id="engine-running".*?</p>', client.get(
        session_url(story, "snapshots:rewind", number=3)).content.decode(), re.S)
    assert warning and "its last step was written 3\u00a0hours ago" in re.sub(r"<[^>]+>", "", warning.group(0))


def test_a_big_diff_says_how_much_is_shown_on_every_page_that_shows_it(client, operator, team, monkeypatch):
    from snapshots_app import views

    session = make_session(team, "wide")
    snapshot_record(session=session, state={"items": {str(i): i for i in range(30)}})
    snapshot_record(session=session, state={"items": {str(i): -i for i in range(30)}})
    client.force_login(operator)
    monkeypatch.setattr(views, "DIFF_SHOWN", 10)
    monkeypatch.setattr(views, "VALUE_SHOWN", 200)  # the patch of 29 changes is longer than that
    for page in (client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2}),
                 client.get(session_url(session, "snapshots:rewind", number=1))):
        html = page.content.decode()
        assert "(changes 1\u201310 of 29" in html  # 0 -> -0 is no change
        assert "too long to show here" in html and "As JSON Patch" not in html
    # The diff page (not the rewind confirmation) pages through the rest.
    first = client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2}).content.decode()
    assert "offset=10" in first and ">previous<" not in first
    last = client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2, "offset": 20}).content.decode()
    assert "(changes 21\u201329 of 29" in last and "offset=10" in last and ">next<" not in last
    assert 'start="21"' in last and last.count('<li class="change') == 9
    beyond = client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2, "offset": 500}).content.decode()
    assert "(changes 21\u201329 of 29" in beyond  # a page past the end shows the last one
    rewind = client.get(session_url(session, "snapshots:rewind", number=1)).content.decode()
    assert "offset=" not in rewind
    # It links the diff page for the changes it does not show (there was no way to see them).
    whole = re.search(r'<p id="whole-diff"><a href="([^"]+)">All 29 changes, page by page</a>', rewind)
    assert whole and client.get(whole[1].replace("&amp;", "&")).content.decode().count("(changes 1\u201310 of 29") == 1


def test_rewinding_to_the_head_is_refused(client, operator, story):
    client.force_login(operator)
    url = session_url(story, "snapshots:rewind", number=story.head_number)
    page = client.get(url).content.decode()
    # Only the refusal: no form offering it, no "v6-v5 stay in the history".
    assert "is the head already" in page and "confirm-rewind" not in page and "stay in the history" not in page
    refused = client.post(url, {"reason": "again", "expected_version": story.head_number})
    assert refused.status_code == 400 and Version.objects.filter(session=story).count() == story.head_number


def test_rewinding_an_archived_session_is_refused_before_a_reason_is_written(client, operator, story):
    from sessions_app.services import session_archive

    session_archive(session=story, reason="done")
    client.force_login(operator)
    url = session_url(story, "snapshots:rewind", number=2)
    response = client.get(url)
    page = response.content.decode()
    assert response.status_code == 409
    assert "is archived" in page and "Unarchive it" in page and "confirm-rewind" not in page and "<textarea" not in page
    refused = client.post(url, {"reason": "anyway", "expected_version": story.head_number})
    assert refused.status_code == 409 and Version.objects.filter(session=story).count() == story.head_number


def test_stale_confirm_page_is_refused(client, operator, story):
    client.force_login(operator)
    record_history(story, 1, start=6)
    response = client.post(session_url(story, "snapshots:rewind", number=2), {"reason": "x", "expected_version": 5})
    assert response.status_code == 409
    assert Version.objects.filter(session=story).count() == 6


def test_fork_creates_a_session_and_opens_it(client, operator, story):
    client.force_login(operator)
    response = client.post(session_url(story, "snapshots:fork", number=3), {"reason": "try b", "external_id": "b-run"})
    assert response.status_code == 302
    fork = story.project.sessions.get(external_id="b-run")
    assert response["Location"] == session_url(fork)


def _confirm_form(page: str) -> dict[str, str]:
    """The hidden fields of a confirm page's form, as the browser sends them back."""
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page))
    fields.pop("csrfmiddlewaretoken", None)  # (masked afresh on every page)
    return fields


def test_a_double_submitted_fork_makes_one_session(client, operator, story):
    """A double click sends the confirm form twice: the second POST gets the first one's answer."""
    client.force_login(operator)
    url = session_url(story, "snapshots:fork", number=3)
    form = {**_confirm_form(client.get(url).content.decode()), "reason": "try b"}
    first, second = client.post(url, form), client.post(url, form)
    assert first.status_code == second.status_code == 302
    assert first["Location"] == second["Location"]
    assert story.project.sessions.count() == 2
    assert AuditEvent.objects.filter(action="session.fork").count() == 1


def test_a_double_submitted_rewind_rewinds_once_and_says_it_was_done(client, operator, story):
    client.force_login(operator)
    url = session_url(story, "snapshots:rewind", number=2)
    form = {**_confirm_form(client.get(url).content.decode()), "reason": "tool lied"}
    assert client.post(url, form).status_code == 302
    again = client.post(url, form, follow=True)
    assert again.status_code == 200 and "the new head is version 6" in again.content.decode()
    assert Version.objects.filter(session=story).count() == 6
    assert AuditEvent.objects.filter(action="session.rewind").count() == 1


def test_a_confirm_page_sent_again_after_a_refusal_keeps_its_request_key(client, operator, story):
    """A form shown again with an error keeps the key it was opened with: a double click on the
    corrected form still acts once."""
    client.force_login(operator)
    url = session_url(story, "snapshots:fork", number=3)
    form = _confirm_form(client.get(url).content.decode())
    assert form.get("request_key")
    refused = client.post(url, {**form, "reason": " "})
    assert refused.status_code == 400 and _confirm_form(refused.content.decode()) == form


def test_a_confirm_form_sent_again_with_other_values_says_so_and_can_then_act(client, operator, story):
    """Back on a fork page after it acted, the operator changes the reason and sends it again: nothing
    is done silently, the page says why in its own words (not the API's idempotency wording), and the
    form it shows acts when sent."""
    client.force_login(operator)
    url = session_url(story, "snapshots:fork", number=3)
    form = {**_confirm_form(client.get(url).content.decode()), "reason": "try b", "external_id": "b-run"}
    assert client.post(url, form).status_code == 302
    changed = client.post(url, {**form, "reason": "try c", "external_id": "c-run"})
    page = changed.content.decode()
    assert changed.status_code == 409 and "This form was already sent" in page and "idempotency" not in page.lower()
    assert story.project.sessions.count() == 2
    again = {**_confirm_form(page), "reason": "try c", "external_id": "c-run"}
    assert again["request_key"] != form["request_key"]
    assert client.post(url, again).status_code == 302
    assert story.project.sessions.filter(external_id="c-run").exists()


def test_pin_and_label_from_the_timeline(client, operator, story):
    client.force_login(operator)
    row = client.post(session_url(story, "snapshots:mark", number=3), {"pinned": "1"}, HTTP_HX_REQUEST="true")
    assert row.status_code == 200 and "Unpin" in row.content.decode() and row.content.decode().startswith("<li")
    client.post(session_url(story, "snapshots:mark", number=3), {"label": "good one"})
    version = Version.objects.get(session=story, number=3)
    assert version.pinned and version.label == "good one"


def test_a_pin_or_label_made_without_javascript_leads_to_a_timeline_page_that_shows_the_version(client, operator, team):
    """The answer was the newest page at #v-N, which does not hold a version older than its 50 rows:
    the operator saw neither the version nor what became of it."""
    session = make_session(team, "long")
    record_history(session, 60)
    client.force_login(operator)
    timeline = session_url(session)
    for number, page in [(3, f"{timeline}?before=4"), (10, f"{timeline}?before=11"), (11, timeline), (60, timeline)]:
        response = client.post(session_url(session, "snapshots:mark", number=number), {"pinned": "1"})
        assert response.status_code == 302 and response["Location"] == f"{page}#v-{number}"
        shown = client.get(response["Location"].split("#")[0]).content.decode()
        row = re.search(rf'<li id="v-{number}".*?</li>', shown, re.S)
        assert row and ">Unpin</button>" in row[0] and "📌 pinned" in row[0]
    response = client.post(session_url(session, "snapshots:mark", number=5), {"label": "before the outage"}, follow=True)
    row = re.search(r'<li id="v-5".*?</li>', response.content.decode(), re.S)
    assert row and '<span class="badge label">before the outage</span>' in row[0]


def test_pinning_a_version_pinned_meanwhile_changes_nothing_and_is_not_audited(client, operator, story):
    """A timeline opened before another operator pinned v3 still offers Pin: sending it answers with
    the row as it is (pinned), and the audit log keeps one pin."""
    client.force_login(operator)
    url = session_url(story, "snapshots:mark", number=3)
    assert client.post(url, {"pinned": "1"}, HTTP_HX_REQUEST="true").status_code == 200
    again = client.post(url, {"pinned": "1"}, HTTP_HX_REQUEST="true")
    assert again.status_code == 200 and "Unpin" in again.content.decode()
    client.post(url, {"label": "good one"})
    client.post(url, {"label": "good one"})
    assert list(AuditEvent.objects.filter(session_id=story.pk, target_type="version")
                .values_list("action", flat=True).order_by("pk")) == ["version.pin", "version.label"]


# -- version viewer, diff, history -------------------------------------------------------------------


def test_state_tree_renders_one_level_and_fetches_children_by_pointer(client, viewer, team):
    session = make_session(team, "tree")
    inner = json.dumps({"deep": {"k": 1}, "list": [1, 2]})
    snapshot_record(session=session, state={"a": {"b": {"c": "leaf-value"}}, "store": inner, "n": 3})
    client.force_login(viewer)
    url = session_url(session, "snapshots:version", number=1)
    page = client.get(url).content.decode()
    assert "leaf-value" not in page and 'hx-get="' in page and "pointer=/a" in page
    child = client.get(url, {"pointer": "/a/b"}, HTTP_HX_REQUEST="true").content.decode()
    assert "leaf-value" in child and "<html" not in child
    inside = client.get(url, {"pointer": "/store/deep"}, HTTP_HX_REQUEST="true").content.decode()
    assert '<span class="key">k</span>' in inside  # JSON held in a string, shown expanded
    missing = client.get(url, {"pointer": "/a/nope"})
    assert missing.status_code == 404
    page = missing.content.decode()  # which part is missing, and the version's state: not "it may have been deleted"
    assert "v1 has no <code>/a/nope</code>" in page and "no key &#x27;nope&#x27;" in page and "pointer=/store" in page
    assert client.get(url, {"pointer": "/nope"}, HTTP_HX_REQUEST="true").status_code == 404


def test_a_long_string_reads_as_its_lines_a_page_at_a_time(client, viewer, team):
    """A string's "full text" was its JSON literal, whole: a traceback one line of "\\n", and a 10 MB
    log a 14 MB page its browser took half a minute to show."""
    session = make_session(team, "logs")
    log = "".join(f"{i:06d} <b>step</b> & done\n" for i in range(12_000))  # 312,000 characters
    snapshot_record(session=session, state={"log": log, "empty": "", "n": 1})
    client.force_login(viewer)
    url = session_url(session, "snapshots:version", number=1)
    first = client.get(url, {"pointer": "/log"})
    page = first.content.decode()
    assert first.status_code == 200 and len(page) < 250_000  # not the whole 312,000 characters
    assert "000000 &lt;b&gt;step&lt;/b&gt; &amp; done\n000001 " in page and "\\n" not in page
    assert "A string of 312000 characters: characters 1\u2013100000 shown" in page
    # Paging on through "next" gives the whole string back, each character once.
    text, params = "", {"pointer": "/log"}
    for _ in range(5):
        page = client.get(url, params).content.decode()
        text += html.unescape(re.search(r'<pre class="scalar text">(.*?)</pre>', page, re.S)[1])
        following = re.search(r'href="\?pointer=/log&amp;offset=(\d+)" rel="next"', page)
        if following is None:
            break
        params = {"pointer": "/log", "offset": following[1]}
    assert text == log and 'rel="prev"' in page
    assert "(empty string)" in client.get(url, {"pointer": "/empty"}).content.decode()
    assert '<pre class="scalar">1</pre>' in client.get(url, {"pointer": "/n"}).content.decode()


def _damaged_head(team):
    """A session whose head (v3) has a node no other version has, with a byte of it flipped."""
    from snapshots_app.models import StateNode
    from tests.conftest import clear_cache
    from tests.factories import agent_state

    session = make_session(team, "Damaged-Run")
    snapshot_record(session=session, state=agent_state(1, history=40))
    snapshot_record(session=session, state=agent_state(2, history=40))
    before = {bytes(d) for d in StateNode.objects.filter(project=session.project).values_list("digest", flat=True)}
    snapshot_record(session=session, state={**agent_state(2, history=40), "scratchpad": "a brand new note " * 200})
    node = max((n for n in StateNode.objects.filter(project=session.project) if bytes(n.digest) not in before),
               key=lambda n: n.raw_size)
    data = bytearray(bytes(node.data))
    data[-1] ^= 0x01
    StateNode.objects.filter(project=session.project, digest=node.digest).update(data=bytes(data))
    clear_cache()
    session.refresh_from_db()
    return session


def test_a_damaged_version_says_so_and_its_session_can_still_be_rewound(client, operator, team):
    """A version whose stored state fails its checksum was a bare "Server error" on every page that
    reads it, the rewind confirmation included: a damaged head, when a rewind is most needed, could
    not be rewound from the dashboard at all."""
    session = _damaged_head(team)
    client.force_login(operator)
    said = f"Version 3 of session Damaged-Run ({session.pk}) failed verification"
    for response in (client.get(session_url(session, "snapshots:version", number=3)),
                     client.get(session_url(session, "snapshots:diff"), {"from": 2, "to": 3}),
                     client.get(session_url(session, "snapshots:history"), {"path": "/scratchpad"})):
        page = response.content.decode()
        assert response.status_code == 500 and "A damaged version" in page and said in page
        assert f'href="{session_url(session)}"' in page and "Server error" not in page
    tree = client.get(session_url(session, "snapshots:version", number=3), {"pointer": "/counters"}, HTTP_HX_REQUEST="true")
    assert tree.status_code == 500 and tree["Content-Type"].startswith("text/plain") and said in tree.content.decode()
    assert client.get(session_url(session, "snapshots:version", number=2)).status_code == 200  # the others open

    confirm = client.get(session_url(session, "snapshots:rewind", number=2))
    page = confirm.content.decode()
    assert confirm.status_code == 200 and 'id="confirm-rewind"' in page
    assert "The diff cannot be shown: version 3 of session Damaged-Run" in page
    key = re.search(r'name="request_key" value="([^"]+)"', page)[1]
    done = client.post(session_url(session, "snapshots:rewind", number=2),
                       {"reason": "head is damaged", "expected_version": 3, "request_key": key})
    assert done.status_code == 302 and Version.objects.get(session=session, number=4).parent.number == 2
    # Back to the damaged version: refused up front, since the new head could not be read either.
    refused = client.get(session_url(session, "snapshots:rewind", number=3))
    assert refused.status_code == 500 and "v3 cannot be read" in refused.content.decode()
    assert 'id="confirm-rewind"' not in refused.content.decode()


def test_search_and_raw_download(client, viewer, story):
    client.force_login(viewer)
    url = session_url(story, "snapshots:version", number=3)
    found = client.get(url, {"q": "tokens"}, HTTP_HX_REQUEST="true").content.decode()
    assert "/counters/tokens" in found
    raw = client.get(session_url(story, "snapshots:raw", number=3))
    assert raw["Content-Disposition"] == 'attachment; filename="run-42-v3.json"'
    long = make_session(story.project, 'a<b>:"c"|' + "x" * 240)
    snapshot_record(session=long, state={"a": 1})
    named = client.get(session_url(long, "snapshots:raw", number=1))["Content-Disposition"]
    assert named == f'attachment; filename="a_b___c__{"x" * 111}-v1.json"'
    odd = make_session(story.project, "tenant/ünïcode run")
    snapshot_record(session=odd, state={"a": 1})
    assert client.get(session_url(odd, "snapshots:raw", number=1))["Content-Disposition"] == (
        "attachment; filename*=utf-8''tenant_%C3%BCn%C3%AFcode%20run-v1.json")
    assert orjson.loads(raw.content)["counters"]["steps"] == 3


def test_an_emptied_state_search_empties_its_results(client, viewer, story):
    """The search box answers into its results box: emptied, that is no results, not the tree's top level."""
    client.force_login(viewer)
    url = session_url(story, "snapshots:version", number=3)
    emptied = client.get(url, {"q": ""}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="search-results")
    assert emptied.status_code == 200 and emptied.content.decode().strip() == ""
    level = client.get(url, {"pointer": "/counters"}, HTTP_HX_REQUEST="true").content.decode()
    assert 'class="leaf"' in level  # (a tree level asks without q)


def test_diff_marks_changes_and_diffs_long_strings_by_line(client, viewer, story):
    client.force_login(viewer)
    url = session_url(story, "snapshots:diff")
    page = client.get(url, {"from": 2, "to": 4}).content.decode()
    assert "/counters/steps" in page and "k-changed" in page
    assert "<del>step 2 says hello</del>" in page and "<ins>step 4 says hello</ins>" in page
    side = client.get(url, {"from": 2, "to": 4, "mode": "side"}, HTTP_HX_REQUEST="true").content.decode()
    assert 'class="sides"' in side and "<html" not in side
    previous = client.get(url, {"to": 5}).content.decode()
    assert "v4" in previous


def test_a_long_line_with_one_word_changed_shows_that_word(client, viewer, team):
    """A 10,000-word completion on one line: the word diff must not compare every word with every other."""
    from snapshots_app import jsonview

    words = [f"w{i % 997}" for i in range(10_000)]
    changed = [*words[:5000], "CHANGED", *words[5001:]]
    session = make_session(team, "long-line")
    snapshot_record(session=session, state={"completion": " ".join(words)})
    snapshot_record(session=session, state={"completion": " ".join(changed)})
    client.force_login(viewer)
    page = client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2}).content.decode()
    assert "<del>w15</del>" in page and "<ins>CHANGED</ins>" in page  # words[5000] is w15
    # Past the matcher's budget, the differing middle reads as removed and added whole.
    other = " ".join(f"x{i}" for i in range(5000))
    assert [op for op, _ in jsonview.text_diff(" ".join(words), other)] == ["-", "+"]


def test_a_rewritten_text_reads_as_removed_and_added_whole_an_edited_one_word_by_word():
    """A replaced tool result diffed word by word read as both texts shuffled together, the odd
    "about" kept between them."""
    from snapshots_app import jsonview

    old = "Logical replication streams row changes per publication; physical ships WAL. " * 3
    new = "Found 14 documents about replication modes. " * 3
    assert [op for op, _ in jsonview.text_diff(old, new)] == ["-", "+", " "]  # (both end with a space)
    edited = old.replace("physical", "streaming", 1)
    assert jsonview.text_diff(old, edited)[:3] == [
        (" ", "Logical replication streams row changes per publication; "), ("-", "physical"), ("+", "streaming")]
    lines = "".join(f"line {i}: kept as it was\n" for i in range(20))
    assert [op for op, _ in jsonview.text_diff(lines, lines.replace("line 7:", "line seven:"))] == [" ", "-", "+", " "]
    # By line, paragraphs each edited a little stay side by side (only their blank lines are kept).
    paragraphs = "\n\n".join(f"Paragraph {i} says something." for i in range(5))
    ops = [op for op, _ in jsonview.text_diff(paragraphs, paragraphs.replace("says", "said"))]
    assert ops.count("-") == 5 and ops.count("+") == 5


def test_a_long_text_changed_in_one_place_shows_the_change_in_its_context_not_whole(client, viewer, team):
    """A 150 KB tool result changed at its end was shown whole, twice side by side: a page 44,000 px
    tall to show a few words. Unchanged runs are cut to the lines (or characters) next to a change."""
    from snapshots_app import jsonview

    lines = "".join(f"result line {i}: {'data ' * 12}\n" for i in range(2000))
    session = make_session(team, "long-text")
    snapshot_record(session=session, state={"tool": lines + "status: partial\n"})
    snapshot_record(session=session, state={"tool": lines.replace("result line 1990:", "result line NINETEEN NINETY:")
                                            + "status: done\n"})
    client.force_login(viewer)
    for mode in ("inline", "side"):
        page = html.unescape(client.get(session_url(session, "snapshots:diff"), {"to": 2, "mode": mode}).content.decode())
        assert len(page) < 40_000 < len(lines)  # (was more than both strings)
        assert "[… 1,987 unchanged lines …]" in page and "[… 3 unchanged lines …]" not in page
        assert "NINETEEN NINETY" in page and "status: done" in page and "result line 1987:" in page
        assert "result line 1986:" not in page
    # Characters where the text has no lines; short runs stay whole.
    pieces = jsonview.collapse_unchanged(jsonview.text_diff("x" * 5000 + " old", "x" * 5000 + " new"))
    assert pieces == [("…", "4,761 unchanged characters"), (" ", "x" * 239 + " "), ("-", "old"), ("+", "new")]
    assert jsonview.collapse_unchanged(jsonview.text_diff("a b c", "a x c")) == [(" ", "a "), ("-", "b"), ("+", "x"),
                                                                                (" ", " c")]


def test_the_text_diffs_of_one_diff_page_share_one_budget():
    """500 rewritten long strings, each just under the per-string cap, took 23-29 s of one request:
    past the page's budget the rest read as removed and added whole, as one past the cap does."""
    import random

    from snapshots_app import jsonview
    from snapshots_app.views import shown_changes

    rng = random.Random(1)

    def edited() -> tuple[str, str]:  # 400 words, the first, the last and every fourth rewritten: ~800
        words = [f"w{rng.randrange(300)}" for _ in range(400)]  # pieces, ~640,000 units of matcher work
        return " ".join(words), " ".join(f"x{rng.randrange(300)}" if i % 4 == 0 or i == 399 else word
                                         for i, word in enumerate(words))

    changes = [{"path": f"/chunks/{i}/summary", "op": "replace", "kind": "changed", "old": old, "new": new}
               for i, (old, new) in enumerate(edited() for _ in range(40))]
    shown = shown_changes(changes)
    assert all(change.pieces for change in shown)
    word_diffed = [change for change in shown if len(change.pieces) > 2]
    whole = [change for change in shown if [op for op, _ in change.pieces] == ["-", "+"]]
    assert 1 <= len(word_diffed) <= jsonview.TEXT_DIFF_PAGE_WORK // 600_000 and len(word_diffed) + len(whole) == 40
    assert shown[0] in word_diffed and shown[-1] in whole  # in page order: the first ones get the detail
    # Each string alone still gets its word diff (no budget given: the per-string cap only).
    assert len(jsonview.text_diff(changes[-1]["old"], changes[-1]["new"])) > 2


def test_the_values_of_one_diff_page_share_one_size_budget():
    """500 changes of 20 KB values would be 20 MB of HTML: past the page's budget each value is cut
    short, the first ones stay whole."""
    from snapshots_app.views import PAGE_VALUES_SHOWN, VALUE_SHOWN, VALUE_SHOWN_PAST_BUDGET, shown_changes

    changes = [{"path": f"/docs/{i}", "op": "replace", "kind": "changed", "old": f"{i}" + "a" * 15_000,
                "new": f"{i}" + "b " * 7_500} for i in range(500)]
    shown = shown_changes(changes)
    assert len(shown) == 500 and shown[0].pieces  # the first long strings get their text diff
    assert "".join(text for op, text in shown[0].pieces if op != "+") == changes[0]["old"]
    total = sum(len(change.old) + len(change.new) + sum(len(text) for _, text in change.pieces or []) for change in shown)
    assert total <= PAGE_VALUES_SHOWN + VALUE_SHOWN + 1000 * (VALUE_SHOWN_PAST_BUDGET + 60)
    assert shown[-1].pieces is None and "cut; download the raw JSON" in shown[-1].new
    assert shown[-1].new.startswith('"499')
    short = shown_changes([{"path": "/n", "op": "replace", "kind": "changed", "old": 1, "new": 2}])
    assert (short[0].old, short[0].new, short[0].pieces) == ("1", "2", None)


def test_diff_inside_json_strings_names_the_string(client, viewer, team):
    session = make_session(team, "llama")
    snapshot_record(session=session, state={"store": json.dumps({"memory": {"facts": ["a"]}, "turn": 1})})
    snapshot_record(session=session, state={"store": json.dumps({"memory": {"facts": ["a", "b"]}, "turn": 2})})
    client.force_login(viewer)
    page = client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2}).content.decode()
    assert "/store/turn" in page and "inside the JSON string at <code>/store</code>" in page


def test_fork_diff_against_its_source(client, operator, story):
    from snapshots_app.services import snapshot_fork

    fork = snapshot_fork(session=story, from_version=2, reason="what if")
    snapshot_record(session=fork, state={"fresh": True})
    client.force_login(operator)
    page = client.get(session_url(fork, "snapshots:diff"),
                      {"from_session": story.pk, "from": 2, "to": 2}).content.decode()
    assert "run-42 v2" in page and "/fresh" in page
    assert f"{fork.external_id} v2" in page  # both ends named: not "v2 → v2" of one session
    # A fork's first version, by the bare diff address: against the version it was forked from.
    young = snapshot_fork(session=story, from_version=3, reason="what if")
    response = client.get(session_url(young, "snapshots:diff"))
    assert response.status_code == 200 and "run-42 v3" in response.content.decode()


def test_vs_previous_after_retention_compares_with_the_version_before_that_is_kept(client, viewer, story):
    """Retention removes versions between kept ones; "vs previous" linked to number - 1, which was a
    404 ("it may have been deleted, or it belongs to a project you are not a member of")."""
    from datetime import timedelta

    from django.utils import timezone

    from snapshots_app.compaction import compaction_run, retention_policy_set
    from snapshots_app.services import version_label

    version_label(version=Version.objects.get(session=story, number=2), label="keep")
    retention_policy_set(project=story.project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    compaction_run(project=story.project, now=timezone.now() + timedelta(days=1))
    assert sorted(story.versions.values_list("number", flat=True)) == [2, 5]
    client.force_login(viewer)
    timeline = client.get(session_url(story)).content.decode()
    links = re.findall(r'href="([^"]+)" class="vsprev"', timeline)
    assert len(links) == 2
    version_page = client.get(session_url(story, "snapshots:version", number=5)).content.decode()
    for link in [*links, re.search(r'href="([^"]+)">Diff vs previous', version_page)[1]]:
        assert client.get(link.replace("&amp;", "&")).status_code == 200, link
    page = client.get(session_url(story, "snapshots:diff"), {"to": 5}).content.decode()
    assert "Diff v2 \u2192 v5" in page and "v3\u2013v4 are no longer stored" in page and "/counters/steps" in page
    oldest = client.get(session_url(story, "snapshots:diff"), {"to": 2}).content.decode()
    assert "v1 is no longer stored" in oldest and "oldest version kept" in oldest
    # An address of a removed version (a bookmark from before the run) says so.
    gone = client.get(session_url(story, "snapshots:version", number=3))
    assert gone.status_code == 404 and "run-42 has no version 3 any more: retention or a trim removed it." in gone.content.decode()
    gone = client.get(session_url(story, "snapshots:version", number=1)).content.decode()
    assert "retention or a trim removed it (the oldest version kept is v2)" in gone
    # Nothing was removed between a version and the one before it: no note.
    assert "no longer stored" not in client.get(session_url(story, "snapshots:diff"), {"to": 5, "from": 2}).content.decode()


def test_path_history_lists_changes_and_charts_numbers(client, viewer, story):
    client.force_login(viewer)
    page = client.get(session_url(story, "snapshots:history"), {"path": "/counters/tokens"}).content.decode()
    assert "<svg" in page and "<polyline" in page
    assert page.count('<code class="val">') == 5 and ">500<" in page
    assert "Older versions" not in page  # v1 is among those shown
    newer = client.get(session_url(story, "snapshots:history"), {"path": "/counters/tokens", "before": 4})
    assert "v1\u2013v3 examined" in newer.content.decode()


def test_the_path_of_an_empty_key_is_that_key_not_the_whole_state(client, viewer, team):
    """RFC 6901, as the diff spells it: "/" is the key "" (an engine's empty key). The history link of
    that key's diff row listed the whole state, and the viewer's node for it opened the root again."""
    session = make_session(team, "empty-key")
    snapshot_record(session=session, state={"": "first words", "x": {"": {"deep": 1}}})
    snapshot_record(session=session, state={"": "second words", "x": {"": {"deep": 2}}})
    client.force_login(viewer)
    diff = client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2}).content.decode()
    assert re.findall(r'history/\?path=([^"]*)"', diff) == ["/", "/x//deep"]
    page = client.get(session_url(session, "snapshots:history"), {"path": "/"}).content.decode()
    assert page.count('<code class="val">') == 2 and "first words" in page and "second words" in page
    nested = client.get(session_url(session, "snapshots:history"), {"path": "/x//deep"}).content.decode()
    assert nested.count('<code class="val">') == 2 and "{2 keys}" not in nested
    url = session_url(session, "snapshots:version", number=1)
    root = client.get(url).content.decode()
    assert 'history/?path=/"' in root and "first words" in root  # the key "" among the root's members
    inner = client.get(url, {"pointer": "/x"}, HTTP_HX_REQUEST="true").content.decode()
    assert 'pointer=/x/"' in inner  # x's key "", not x again
    deep = client.get(url, {"pointer": "/x/"}, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-path="/x//deep"' in deep


def test_path_history_of_a_path_without_its_leading_slash_says_so_instead_of_absent_everywhere(client, viewer, story):
    client.force_login(viewer)
    response = client.get(session_url(story, "snapshots:history"), {"path": "counters/tokens"})
    page = response.content.decode()
    assert response.status_code == 400
    assert "A path starts with" in page and "absent" not in page and "<svg" not in page
    assert "?path=/counters/tokens" in page  # the path meant, one click away
    assert client.get(session_url(story, "snapshots:history"), {"path": "/counters/tokens"}).status_code == 200


def test_path_history_of_a_path_no_version_has_says_so_and_leads_to_the_state(client, viewer, story):
    """A mistyped path (or one in the wrong case) read "absent (value at the oldest version shown)",
    as if the value had existed and gone."""
    client.force_login(viewer)
    page = client.get(session_url(story, "snapshots:history"), {"path": "/Counters/tokens"}).content.decode()
    note = re.search(r'id="path-nowhere"[^>]*>(.*?)</p>', page, re.S)
    assert note and "No version from v1 to v5 has <code>/Counters/tokens</code>" in note.group(1)
    assert f'href="{session_url(story, "snapshots:version", number=5)}">browse the head' in note.group(1)
    found = client.get(session_url(story, "snapshots:history"), {"path": "/counters/tokens"}).content.decode()
    assert 'id="path-nowhere"' not in found


def test_path_history_offers_older_versions_only_when_retention_left_some(client, viewer, story):
    """After a retention run the oldest version kept is no longer v1: "Older versions" was offered
    under it all the same, and led to an empty page."""
    from datetime import timedelta

    from django.utils import timezone

    from snapshots_app.compaction import compaction_run, retention_policy_set
    from snapshots_app.services import version_label

    version_label(version=Version.objects.get(session=story, number=2), label="keep")
    retention_policy_set(project=story.project, enabled=True, keep_last=1, keep_days=0, thin_to="none")
    compaction_run(project=story.project, now=timezone.now() + timedelta(days=1))
    assert sorted(story.versions.values_list("number", flat=True)) == [2, 5]
    client.force_login(viewer)
    history = session_url(story, "snapshots:history")
    page = client.get(history, {"path": "/counters/tokens"}).content.decode()
    assert "v2\u2013v5 examined" in page and "Older versions" not in page
    page = client.get(history, {"path": "/counters/tokens", "before": 5}).content.decode()
    assert "v2\u2013v2 examined" in page and "Older versions" not in page


def test_path_history_links_to_older_versions(client, viewer, team):
    from snapshots_app.selectors import HISTORY_WINDOW

    session = make_session(team, "long-history")
    for step in range(HISTORY_WINDOW + 2):
        snapshot_record(session=session, state={"n": step})
    client.force_login(viewer)
    page = client.get(session_url(session, "snapshots:history"), {"path": "/n"}).content.decode()
    assert f"v3\u2013v{HISTORY_WINDOW + 2} examined" in page and "before=3" in page and "Older versions" in page


def test_audit_and_path_history_refuse_a_cursor_that_is_no_number(client, viewer, team):
    """`?before=abc` (a hand-edited or truncated "Older" link) showed the newest page as if it were the
    older one; it now lists nothing, says why and links the newest."""
    session = make_session(team, "cursors")
    snapshot_record(session=session, state={"n": 1})
    version_pin(version=session.versions.get(number=1), pinned=True, actor=viewer)
    client.force_login(viewer)
    for url, query in [(session_url(session, "snapshots:audit"), {"before": "abc"}),
                       (session_url(session, "snapshots:history"), {"path": "/n", "before": "1x"})]:
        response = client.get(url, query)
        page = response.content.decode()
        assert response.status_code == 400 and 'id="cursor-problem"' in page and "is not a place in this list" in page
        assert "<tr><td>" not in page and "<tbody>" not in page
        fine = client.get(url, {key: value for key, value in query.items() if key != "before"})
        assert fine.status_code == 200 and 'id="cursor-problem"' not in fine.content.decode()


# -- escaping ----------------------------------------------------------------------------------------


def test_hostile_state_renders_inert_everywhere(client, operator, team):
    session = make_session(team, HOSTILE, workflow=HOSTILE)
    nasty = {HOSTILE: HOSTILE, "q": "\"'><img src=x onerror=alert(1)>", "ctl": "\x00\x07\x1b[31m",
             "nested": json.dumps({HOSTILE: [HOSTILE]})}
    snapshot_record(session=session, state=nasty, step=HOSTILE, error=HOSTILE, label="<b>x</b>")
    snapshot_record(session=session, state={**nasty, "q": HOSTILE + "2"}, step=HOSTILE)
    session_update(session=session, status=SessionStatus.FAILED)
    client.force_login(operator)
    pages = [
        client.get(reverse("sessions:list")),
        client.get(session_url(session)),
        client.get(session_url(session, "snapshots:version", number=1)),
        client.get(session_url(session, "snapshots:version", number=1), {"pointer": "/nested"}),
        client.get(session_url(session, "snapshots:version", number=1), {"q": "script"}),
        client.get(session_url(session, "snapshots:diff"), {"from": 1, "to": 2}),
        client.get(session_url(session, "snapshots:history"), {"path": "/q"}),
        client.get(session_url(session, "snapshots:rewind", number=1)),
    ]
    for response in pages:
        body = response.content.decode()
        assert response.status_code == 200
        assert "<script>alert" not in body and "<img src=x" not in body and "<b>x</b>" not in body
        assert "\x00" not in body or "&lt;" in body
    assert "&lt;script&gt;alert" in pages[2].content.decode()


def test_an_archived_sessions_versions_cannot_be_pinned_or_labelled(client, operator, story):
    from sessions_app.services import session_archive

    session_archive(session=story, reason="done")
    client.force_login(operator)
    url = session_url(story, "snapshots:mark", number=2)
    response = client.post(url, {"pinned": "1"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 409 and "archived" in response.content.decode()
    page = client.post(url, {"label": "late"}, follow=True).content.decode()
    assert "is archived" in page
    assert list(Version.objects.filter(session=story, number=2).values_list("pinned", "label")) == [(False, "")]
    # The timeline offers no writes on an archived session (forking from it still works).
    timeline = client.get(session_url(story, "snapshots:session")).content.decode()
    assert "Rewind here" not in timeline and 'class="mark"' not in timeline and "Fork…" in timeline


def test_operators_archive_and_unarchive_from_the_session_page(client, operator, viewer, story):
    client.force_login(viewer)
    assert 'id="archive"' not in client.get(session_url(story)).content.decode()
    assert client.get(session_url(story, "snapshots:archive")).status_code == 403
    assert client.post(session_url(story, "snapshots:archive"), {"reason": "x"}).status_code == 403
    client.force_login(operator)
    assert f'href="{session_url(story, "snapshots:archive")}"' in client.get(session_url(story)).content.decode()
    page = client.post(session_url(story, "snapshots:archive"), {"reason": "done"}, follow=True).content.decode()
    assert "Archived:" in page and 'id="unarchive"' in page
    story.refresh_from_db()
    assert story.archived_at is not None
    bad = client.post(session_url(story, "snapshots:unarchive"), {"reason": "a\x00b"}, follow=True).content.decode()
    assert "Reason: " in bad
    story.refresh_from_db()
    assert story.archived_at is not None
    client.post(session_url(story, "snapshots:unarchive"), {"reason": "one more step"})
    story.refresh_from_db()
    assert story.archived_at is None
    assert list(AuditEvent.objects.filter(session_id=story.pk, action__endswith="archive")
                .order_by("pk").values_list("action", "reason")) == [("session.archive", "done"),
                                                                      ("session.unarchive", "one more step")]


def test_archiving_asks_first_and_says_what_it_does(client, operator, story):
    """Archive is a confirm page, as rewind is: it says what archiving keeps and refuses before it
    acts, and only the POST archives (a reason is optional)."""
    session_update(session=story, status="completed", actor=operator)
    client.force_login(operator)
    url = session_url(story, "snapshots:archive")
    confirm = client.get(url)
    page = confirm.content.decode()
    assert confirm.status_code == 200 and 'id="confirm-archive"' in page and 'name="reason"' in page
    assert "5 versions" in page and "refuses every new write" in page and "session_archived" in page
    assert 'id="engine-running"' not in page  # a completed session: no engine to warn about
    story.refresh_from_db()
    assert story.archived_at is None and not AuditEvent.objects.filter(action="session.archive").exists()
    client.post(url, {"reason": ""})
    story.refresh_from_db()
    assert story.archived_at is not None
    assert list(AuditEvent.objects.filter(action="session.archive").values_list("reason", flat=True)) == [""]


@pytest.mark.parametrize("status", ["running", "waiting"])
def test_archiving_a_session_an_engine_may_still_write_to_warns_first(client, operator, story, status):
    session_update(session=story, status=status, actor=operator)
    client.force_login(operator)
    page = client.get(session_url(story, "snapshots:archive")).content.decode()
    assert 'id="engine-running"' in page and f"This session is {status}" in page
    assert "its last step was written" in page and "its next snapshot is refused" in page
    assert 'id="confirm-archive"' in page  # a warning, not a refusal: a stuck engine's session can be archived


def test_archiving_an_archived_session_changes_nothing_and_says_so(client, operator, story):
    """A double click, or a confirm page another operator beat to it: one archiving, one audit event."""
    client.force_login(operator)
    url = session_url(story, "snapshots:archive")
    assert client.post(url, {"reason": "done"}).status_code == 302
    again = client.post(url, {"reason": "done"}, follow=True).content.decode()
    assert "archived already" in again and "nothing was changed" in again
    assert AuditEvent.objects.filter(action="session.archive").count() == 1
    refused = client.get(url)
    page = refused.content.decode()
    assert refused.status_code == 409 and "archived already" in page
    assert 'id="confirm-archive"' not in page and "<textarea" not in page and "Back to the session" in page


def test_a_refused_archive_reason_stores_nothing_and_keeps_the_reason(client, operator, story):
    client.force_login(operator)
    response = client.post(session_url(story, "snapshots:archive"), {"reason": "x" * 2001})
    page = response.content.decode()
    assert response.status_code == 400 and 'id="confirm-archive"' in page and "x" * 2001 in page
    story.refresh_from_db()
    assert story.archived_at is None and not AuditEvent.objects.filter(action="session.archive").exists()


@pytest.fixture
def admin(team):
    user = make_user("ada")
    membership_set(project=team, user=user, role=Role.ADMIN)
    return user


def test_a_project_admin_trims_a_history_from_the_session_page_audited(client, admin, operator, story):
    """The API's trim, for people: keep the newest N, and what retention keeps besides."""
    from snapshots_app.services import version_pin

    version_pin(version=story.versions.get(number=2), pinned=True)
    client.force_login(operator)
    assert 'id="trim"' not in client.get(session_url(story)).content.decode()  # an admin's action
    client.force_login(admin)
    assert 'id="trim"' in client.get(session_url(story)).content.decode()
    url = session_url(story, "snapshots:trim")
    confirm = client.get(url)
    page = confirm.content.decode()
    assert confirm.status_code == 200 and 'id="confirm-trim"' in page and 'name="keep_newest"' in page
    assert "This session has 5 versions; the head is version 5" in page and "pinned and labelled versions" in page
    # Which versions go, before the click that cannot be undone (the page said only "keep the newest N").
    assert "Keeping the newest 100, the trim removes nothing." in html.unescape(page)
    two = html.unescape(client.get(url, {"keep_newest": "2"}).content.decode())
    assert ("Keeping the newest 2 (v4\u2013v5), the trim removes <strong>2 versions</strong>:\n  v1, v3. It keeps besides "
            "v2: pinned, labelled, forked from or restored by a kept rewind.") in two
    typed = client.get(url, {"keep_newest": "1"}, HTTP_HX_REQUEST="true").content.decode()  # as the page asks, typed
    assert typed.startswith("\n<div id=\"trim-preview\"") and "<html" not in typed and "v1, v3\u2013v4." in typed
    assert "to see which versions the trim removes" in client.get(url, {"keep_newest": "0"}).content.decode()
    assert story.versions.count() == 5  # asking removes nothing

    done = client.post(url, {"keep_newest": "2", "reason": "old steps", "expected_version": "5"}, follow=True)
    assert done.redirect_chain[-1][0] == session_url(story)
    assert ("Removed 2 versions; 3 kept, 1 of them older ones that are pinned, labelled, forked from or restored "
            "by a kept rewind.") in html.unescape(done.content.decode())
    assert sorted(story.versions.values_list("number", flat=True)) == [2, 4, 5]
    event = AuditEvent.objects.get(action="session.trim")
    assert (event.actor, event.reason, removed_numbers(event.details)) == (admin, "old steps", [1, 3])

    again = client.post(url, {"keep_newest": "2", "reason": "old steps", "expected_version": "5"}, follow=True)
    assert "Nothing was removed" in html.unescape(again.content.decode())
    assert AuditEvent.objects.filter(action="session.trim").count() == 1


def test_a_trim_the_page_cannot_do_removes_nothing_and_says_why(client, admin, operator, story):
    url = session_url(story, "snapshots:trim")
    client.force_login(operator)
    assert client.get(url).status_code == 403
    assert client.post(url, {"keep_newest": "1", "reason": "x", "expected_version": "5"}).status_code == 403
    client.force_login(admin)
    refused = [
        ({"keep_newest": "0", "reason": "x"}, 400, "greater than or equal to 1"),
        ({"keep_newest": "", "reason": "x"}, 400, "how many of the newest versions to keep"),
        ({"keep_newest": "20000", "reason": "x"}, 400, "less than or equal to 10000"),
        ({"keep_newest": "1", "reason": "  "}, 400, "reason"),
    ]
    for data, status, says in refused:
        response = client.post(url, {"expected_version": "5", **data})
        page = html.unescape(response.content.decode())
        assert response.status_code == status and says in page and 'id="confirm-trim"' in page, data
    # A write since the page was shown: the newest versions are not the ones the admin saw.
    snapshot_record(session=story, state={"step": 6})
    stale = client.post(url, {"keep_newest": "1", "reason": "x", "expected_version": "5"})
    assert stale.status_code == 409 and "v6" in stale.content.decode()
    assert story.versions.count() == 6 and not AuditEvent.objects.filter(action="session.trim").exists()
    session_update(session=story, status="completed", actor=admin)
    client.post(session_url(story, "snapshots:archive"), {"reason": "done"})
    archived = client.get(url)
    assert archived.status_code == 409 and "archived" in archived.content.decode()
    assert 'id="confirm-trim"' not in archived.content.decode()
    assert client.post(url, {"keep_newest": "1", "reason": "x", "expected_version": "6"}).status_code == 409
    assert story.versions.count() == 6
    empty = session_url(make_session(story.project, "not-started"), "snapshots:trim")
    nothing = client.get(empty)
    assert nothing.status_code == 409 and "no versions yet" in nothing.content.decode()
    assert client.post(empty, {"keep_newest": "1", "reason": "x"}).status_code == 409


def test_an_htmx_mark_error_is_text_not_markup(client, operator, story):
    """A refused pin/label answers htmx with text: the form error echoes the submitted value."""
    client.force_login(operator)
    response = client.post(session_url(story, "snapshots:mark", number=3), {"pinned": "<img src=x onerror=alert(1)>"},
                           HTTP_HX_REQUEST="true")
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("source", ["not-a-uuid", ["x"], "elsewhere"])
def test_fork_lineage_from_metadata_never_breaks_or_crosses_projects(client, operator, team, story, source):
    """forked_from is metadata an engine may set (PATCH, import): a value that names no session of
    this project shows no lineage link and does not break the page."""
    if source == "elsewhere":
        source = str(make_session(make_project("elsewhere"), "theirs").pk)
    session_update(session=story, metadata={"forked_from": {"session": source, "version": 1}})
    client.force_login(operator)
    response = client.get(session_url(story))
    assert response.status_code == 200
    assert "Forked from" not in response.content.decode()


def test_each_rows_actions_name_their_version_for_screen_readers(client, operator, story):
    """"Pin", "Fork…", "state" on every row of a timeline read alike in a screen reader's list of links
    and buttons: each name says which version (and keeps the words shown, for voice control)."""
    client.force_login(operator)
    page = client.get(session_url(story)).content.decode()
    for name in ("vs previous (v5)", "state of v5", "Fork… (from v5)", "Pin v5", "Rewind here… (to v4)"):
        assert f'aria-label="{name}"' in page, name


def test_a_diff_against_a_session_that_is_not_there_says_which(client, viewer, story):
    """A bad `from_session` answered "Nothing here at /sessions/<this one>/diff/: it may have been
    deleted", of the session that is there."""
    client.force_login(viewer)
    other = make_session(make_project("globex"), "their-run")  # another project's: the same answer
    for given in ("bogus", str(other.pk)):
        response = client.get(session_url(story, "snapshots:diff"), {"from_session": given, "from": 1, "to": 1})
        page = html.unescape(response.content.decode())
        assert response.status_code == 404 and f"There is no session '{given}' to compare run-42 with" in page
        assert "their-run" not in page and 'class="topbar"' in page


def test_a_rows_change_of_size_reads_as_the_pages_other_sizes(client, viewer, team):
    """It read "-143220 B" (a hyphen, raw bytes) beside "152.9 KB"."""
    session = make_session(team, "sizes")
    snapshot_record(session=session, state={"log": "x" * 150_000})
    snapshot_record(session=session, state={"log": "x" * 6_000})
    snapshot_record(session=session, state={"log": "x" * 6_100})
    from snapshots_app import tasks

    tasks.finalize_versions(list(session.versions.values_list("id", flat=True)))  # (the worker's change summaries)
    client.force_login(viewer)
    page = html.unescape(client.get(session_url(session)).content.decode())
    assert " · \u2212140.6\xa0KB</span>" in page and " · +100\xa0bytes</span>" in page and " B</span>" not in page


def test_a_rewind_to_the_state_the_head_has_says_so(client, operator, team):
    """The page showed an empty diff and offered the rewind as any other: it only writes a copy of the head."""
    session = make_session(team, "same")
    snapshot_record(session=session, state={"a": 1}, status="running")
    snapshot_record(session=session, state={"a": 2}, status="running")
    snapshot_record(session=session, state={"a": 1}, status="failed", error="boom")
    client.force_login(operator)
    # The same state, but the rewind brings back v1's status (and no error): offered, saying so.
    same = client.get(session_url(session, "snapshots:rewind", number=1)).content.decode()
    assert 'id="rewind-same-state"' in same and "identical to v3" in same and 'id="confirm-rewind"' in same
    other = client.get(session_url(session, "snapshots:rewind", number=2)).content.decode()
    assert 'id="rewind-same-state"' not in other


def test_a_rewind_repeated_from_back_writes_nothing(client, operator, team):
    """Back to the confirm page after a rewind reloaded it with a new request key, still offering the
    rewind: a second click wrote a copy of the head, and a second audit event."""
    session = make_session(team, "twice")
    for value in (1, 2):
        snapshot_record(session=session, state={"a": value}, status="running")
    client.force_login(operator)
    url = session_url(session, "snapshots:rewind", number=1)
    assert client.post(url, {"reason": "bad step", "expected_version": 2}).status_code == 302
    again = client.get(url)  # Back: the page as it is now
    page = html.unescape(again.content.decode())
    assert again.status_code == 200 and "The head, v3, already has v1's state, status, step and error" in page
    assert 'id="confirm-rewind"' not in page and "<textarea" not in page
    resent = client.post(url, {"reason": "bad step", "expected_version": 3})
    assert resent.status_code == 409 and "already has v1's state" in html.unescape(resent.content.decode())
    session.refresh_from_db()
    assert session.head_number == 3 and AuditEvent.objects.filter(action="session.rewind").count() == 1


def test_a_rewind_to_an_earlier_step_of_an_unchanged_state_is_offered(client, operator, team):
    """The state alone is not all a rewind brings back: the execution pointer (step) too."""
    session = make_session(team, "same-state")
    snapshot_record(session=session, state={"a": 1}, step="plan", status="running")
    snapshot_record(session=session, state={"a": 1}, step="act", status="running")
    client.force_login(operator)
    url = session_url(session, "snapshots:rewind", number=1)
    assert 'id="confirm-rewind"' in client.get(url).content.decode()
    assert client.post(url, {"reason": "redo the plan", "expected_version": 2}).status_code == 302
    assert session.versions.get(number=3).step == "plan"


def test_a_version_page_offers_rewind_and_fork_to_operators(client, viewer, operator, story):
    """An operator reading an old state had to go back to the timeline, find its row, to act on it."""
    client.force_login(operator)
    old = client.get(session_url(story, "snapshots:version", number=2)).content.decode()
    assert f'href="{session_url(story, "snapshots:rewind", number=2)}"' in old
    assert f'href="{session_url(story, "snapshots:fork", number=2)}"' in old
    head = client.get(session_url(story, "snapshots:version", number=5)).content.decode()
    assert 'id="version-rewind"' not in head and 'id="version-fork"' in head  # (the head: nothing to rewind to)
    assert 'id="read-only"' not in old and 'id="read-only"' not in client.get(session_url(story)).content.decode()
    client.force_login(viewer)
    read_only = client.get(session_url(story, "snapshots:version", number=2)).content.decode()
    assert 'id="version-rewind"' not in read_only and 'id="version-fork"' not in read_only
    # The viewer is told why (the actions were simply absent, the role shown nowhere).
    said = "Read-only (viewer): rewinds, forks, pins, labels and exports are for operators."
    assert said in read_only and said in client.get(session_url(story)).content.decode()


def test_a_versions_page_shows_its_label_pin_and_engine(client, viewer, team):
    from snapshots_app.services import version_label, version_pin

    session = make_session(team, "marked")
    version = snapshot_record(session=session, state={"a": 1}, engine="langgraph", engine_version="1.0.4")
    version_pin(version=version, pinned=True)
    version_label(version=version, label="good-checkpoint")
    client.force_login(viewer)
    page = client.get(session_url(session, "snapshots:version", number=1)).content.decode()
    assert 'id="version-label">good-checkpoint<' in page and 'id="version-pinned"' in page
    assert 'id="version-engine">langgraph 1.0.4<' in page


def test_a_versions_page_says_whether_it_is_the_head_and_who_made_it_and_why(client, operator, story):
    """The version page of a rewind (or a fork, or a data fix) showed its kind but not who made it,
    why, or which version it restored; nor whether the version was the head."""
    from snapshots_app.services import snapshot_fork, snapshot_rewind

    snapshot_rewind(session=story, to_version=2, reason="bad tool output", actor=operator)
    fork = snapshot_fork(session=story, from_version=3, external_id="run-42-alt", reason="what if", actor=operator)
    client.force_login(operator)

    def words(page_html: str, element_id: str) -> str:
        found = re.search(rf'id="{element_id}"[^>]*>(.*?)</(?:p|span)>', page_html, re.S)
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", found.group(1))).strip() if found else ""

    assert "Diff vs previous" not in client.get(session_url(story, "snapshots:version", number=1)).content.decode()
    rewind = client.get(session_url(story, "snapshots:version", number=6)).content.decode()
    assert words(rewind, "version-lineage") == "↩ A rewind to v2: “bad tool output”"
    assert f"· by {operator.username} ·" in rewind and words(rewind, "version-head") == "head"
    assert 'id="version-vs-head"' not in rewind
    older = client.get(session_url(story, "snapshots:version", number=3)).content.decode()
    assert words(older, "version-head") == "the head is v6" and 'id="version-lineage"' not in older
    assert '?from=3&amp;to=6" id="version-vs-head"' in older
    forked = client.get(session_url(fork, "snapshots:version", number=1)).content.decode()
    assert words(forked, "version-lineage") == "↪ Forked from run-42 v3: “what if”"
    from snapshots_app.services import snapshot_data_fix, state_prepare

    snapshot_data_fix(session=story, state=state_prepare({"fixed": True}), based_on=3, reason="typo", actor=operator)
    fixed = client.get(session_url(story, "snapshots:version", number=7)).content.decode()
    assert words(fixed, "version-lineage") == "✎ A data fix of v3's state: “typo”"


def test_go_to_a_version_or_the_version_at_a_time_on_whichever_page_holds_it(client, operator, team):
    """Finding "the state at 02:14" or v8 of a long session meant scrolling page after page: the
    timeline had no way to a version or a time, and a shared #v-8 of an older page landed nowhere."""
    from snapshots_app.selectors import TIMELINE_PAGE

    session = make_session(team, "run-long")
    start = timezone.now() - timedelta(hours=2)
    for number in range(1, TIMELINE_PAGE + 21):
        snapshot_record(session=session, state={"n": number})
    for version in Version.objects.filter(session=session):
        Version.objects.filter(pk=version.pk).update(created_at=start + timedelta(minutes=version.number))
    client.force_login(operator)
    goto = session_url(session, "snapshots:goto")
    assert 'id="timeline-goto"' in client.get(session_url(session)).content.decode()

    response = client.get(goto, {"at": "v8"})
    assert response.status_code == 302 and response.url == f"{session_url(session)}?before=9#v-8"
    page = client.get(response.url).content.decode()
    assert 'id="v-8"' in page
    at = (start + timedelta(minutes=12, seconds=30)).strftime("%Y-%m-%d %H:%M:%S")
    response = client.get(goto, {"at": at})
    assert response.url.endswith("#v-12")
    assert f"v12 is the version the session had at {at} (UTC)." in client.get(response.url).content.decode()
    response = client.get(goto, {"at": str(TIMELINE_PAGE + 500)})
    assert response.url.endswith(f"#v-{TIMELINE_PAGE + 20}")
    assert "is the one before it" in client.get(response.url).content.decode()
    day = start.strftime("%Y-%m-%d")
    response = client.get(goto, {"at": day})  # a day: its end, echoed as typed
    assert f"is the version the session had at the end of {day} (UTC)." in client.get(response.url).content.decode()
    response = client.get(goto, {"at": "9999-12-31"})  # its end is past what a datetime holds: the head
    assert response.url.endswith(f"#v-{TIMELINE_PAGE + 20}")
    response = client.get(goto, {"at": (start - timedelta(days=1)).strftime("%Y-%m-%d")})  # before v1 was written
    assert response.url.endswith("#v-1")
    said = html.unescape(client.get(response.url).content.decode())
    assert (f"The session had no version yet at the end of {(start - timedelta(days=1)):%Y-%m-%d} (UTC): its first, v1, "
            f"was written at {start + timedelta(minutes=1):%Y-%m-%d %H:%M:%S} (UTC).") in said and "trim" not in said
    response = client.get(goto, {"at": "yesterday-ish"})
    assert response.status_code == 302 and response.url == session_url(session)
    assert "Go to: Not a version or a moment" in client.get(response.url).content.decode()
    # Before the oldest version kept (a trim removed v1-v5): the oldest kept, saying so.
    Version.objects.filter(session=session, number__lte=5).delete()
    for at in ("v3", (start - timedelta(days=1)).strftime("%Y-%m-%d")):
        response = client.get(goto, {"at": at})
        assert response.url == f"{session_url(session)}?before=7#v-6", at
        assert "v6 is the oldest kept." in client.get(response.url).content.decode()
    # Nothing before the oldest kept version to compare it with.
    assert "Diff vs previous" not in client.get(session_url(session, "snapshots:version", number=6)).content.decode()
    assert "Diff vs previous" in client.get(session_url(session, "snapshots:version", number=7)).content.decode()


def test_rewind_and_fork_pages_name_an_open_integrity_problem_of_their_version(client, operator, story):
    """A rewind to a damaged version whose state the head shares said "The head already has this state"
    and nothing else; the refusal came only once confirmed."""
    from snapshots_app.integrity import integrity_problem_record

    target = Version.objects.get(session=story, number=2)
    integrity_problem_record(version=target, detail="checksum mismatch")
    client.force_login(operator)
    for name in ("snapshots:rewind", "snapshots:fork"):
        page = client.get(session_url(story, name, number=2)).content.decode()
        assert re.search(r'id="target-damaged"[^>]*>v2 has an open integrity problem: checksum mismatch\.', page), name
        other = client.get(session_url(story, name, number=3)).content.decode()
        assert 'id="target-damaged"' not in other


def test_the_diff_page_takes_other_versions_of_its_two_sessions_typed(client, viewer, story):
    """Comparing a fork's head with another version of its source needed a hand-edited address."""
    from snapshots_app.services import snapshot_fork

    fork = snapshot_fork(session=story, from_version=3, external_id="run-42-alt", reason="what if")
    snapshot_record(session=fork, state={"fixed": True})
    client.force_login(viewer)
    page = client.get(session_url(fork, "snapshots:diff"), {"from_session": story.pk, "from": 3, "to": 1}).content.decode()
    form = re.search(r'<form method="get" action="([^"]+)" class="inline-form" id="diff-pick">(.*?)</form>', page, re.S)
    assert form and form.group(1) == session_url(fork, "snapshots:diff")
    fields = dict(re.findall(r'name="(\w+)"[^>]*value="([^"]*)"', form.group(2)))
    assert fields == {"from_session": str(story.pk), "mode": "inline", "from": "3", "to": "1"}
    assert "From run-42 v" in form.group(2) and "to run-42-alt v" in form.group(2)
    # As the pages write versions, too.
    assert client.get(session_url(story, "snapshots:diff"), {"from": "v2", "to": "V3"}).status_code == 200
    # What it sends: the fork's head against v5 of its source.
    moved = client.get(form.group(1), {**fields, "from": 5, "to": 2}).content.decode()
    assert "Diff <a" in moved and ">run-42 v5</a>" in moved and ">run-42-alt v2</a>" in moved


def test_a_sessions_audit_trail_says_who_did_what_when_and_why(client, viewer, operator, story, monkeypatch):
    """Rewinds, forks, pins and archiving were audited, but only the admin's log showed them, and most
    operators have no admin."""
    from sessions_app import selectors as session_selectors
    from snapshots_app.services import snapshot_fork, snapshot_rewind, version_pin

    snapshot_rewind(session=story, to_version=2, reason="bad tool output", actor=operator)
    snapshot_fork(session=story, from_version=3, external_id="run-42-alt", reason="what if", actor=operator)
    version_pin(version=Version.objects.get(session=story, number=4), pinned=True, actor=operator)
    client.force_login(viewer)
    assert f'href="{session_url(story, "snapshots:audit")}" id="audit-link"' in client.get(session_url(story)).content.decode()
    page = client.get(session_url(story, "snapshots:audit")).content.decode()
    rows = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip()
            for row in re.findall(r"<tr><td>(.*?)</tr>", page, re.S)]
    assert [row.split(" UTC ", 1)[1] for row in rows] == [
        f"{operator.username} Version pinned v4",
        f"{operator.username} Fork v3 → run-42-alt what if",
        f"{operator.username} Rewind v5 → v6, the state of v2 bad tool output",
    ]
    # A fork's own trail starts with the fork that made it (recorded on its source).
    fork = WorkflowSession.objects.get(external_id="run-42-alt")
    forked = client.get(session_url(fork, "snapshots:audit")).content.decode()
    assert "v3 → run-42-alt" in forked and "Nothing has been done" not in forked
    monkeypatch.setattr(session_selectors, "SESSION_AUDIT_PAGE", 2)
    first = client.get(session_url(story, "snapshots:audit")).content.decode()
    older = re.search(r'href="\?before=(\d+)" id="audit-older"', first)
    assert older and first.count("<tr><td>") == 2
    rest = client.get(session_url(story, "snapshots:audit"), {"before": older.group(1)}).content.decode()
    assert rest.count("<tr><td>") == 1 and "bad tool output" in rest and 'id="audit-older"' not in rest
    assert 'id="audit-newest"' in rest
    assert "No older events." in client.get(session_url(story, "snapshots:audit"), {"before": 0}).content.decode()
    fresh = make_session(story.project, "untouched")
    assert "Nothing has been done to this session yet" in client.get(session_url(fresh, "snapshots:audit")).content.decode()


def test_no_template_comment_spans_lines_which_django_would_print_as_text():
    """`{# … #}` is one line only: spread over two, Django shows it on the page as it is written."""
    from django.conf import settings

    root = settings.BASE_DIR / "templates"
    spread = [
        f"{path.relative_to(root)}:{number}"
        for path in root.rglob("*.html")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.count("{#") > line.count("#}")
    ]
    assert spread == []

"""The timeline's filters (selectors.TimelineFilters): the query a page runs and the check a live
update makes of a new version agree, and each filter reads its own index, not the session's history."""

from __future__ import annotations

import itertools

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from snapshots_app.models import TIMELINE_KINDS, Version
from snapshots_app.selectors import TimelineFilters, timeline_page
from snapshots_app.services import snapshot_fork, snapshot_record, snapshot_rewind, version_label, version_pin
from tests.conftest import query_plan

EVERY_FILTER = [
    TimelineFilters(has_error=has_error, pinned=pinned, labelled=labelled, kind=kind)
    for has_error, pinned, labelled, kind in itertools.product([False, True], [False, True], [False, True], ["", *TIMELINE_KINDS])
]


@pytest.fixture
def marked(session):
    """Versions of every kind an operator makes, with and without an error, a pin, a label."""
    for number in range(1, 9):
        snapshot_record(session=session, state={"n": number}, error="boom" if number % 2 else None,
                        label="known good" if number % 3 == 0 else None)
        if number % 4 == 0:
            version_pin(version=Version.objects.get(session=session, number=number), pinned=True)
    snapshot_rewind(session=session, to_version=3, reason="bad tool output")
    snapshot_fork(session=session, from_version=2, reason="what if", external_id="run-1-alt")
    version_label(version=Version.objects.get(session=session, number=9), label="after the rewind")
    return session


def test_a_live_update_shows_a_new_version_exactly_when_the_page_would(marked):
    """(Besides new versions, "forks" shows the versions forked from: v2 here, never a new version.)"""
    versions = list(Version.objects.filter(session=marked))
    for filters in EVERY_FILTER:
        page = [version.number for version in timeline_page(marked, filters=filters)]
        forked_from = filters.kind == "fork" and not (filters.has_error or filters.pinned or filters.labelled)
        expected = {v.number for v in versions if filters.matches(v)} | ({2} if forked_from else set())
        assert page == sorted(expected, reverse=True), filters


def test_forks_on_a_source_are_the_versions_forked_from_and_on_a_fork_its_start(marked):
    """On the source, "forks" said "No forks." although v2 had been forked: a fork's own first version
    is in the new session."""
    fork = Version.objects.get(kind="fork").session
    snapshot_fork(session=fork, from_version=1, reason="again", external_id="run-1-alt-2")
    forks = TimelineFilters(kind="fork")
    assert [v.number for v in timeline_page(marked, filters=forks)] == [2]
    assert [v.number for v in timeline_page(fork, filters=forks)] == [1]  # its start, and forked from again
    assert forks.described == "forks (to or from here)"
    with CaptureQueriesContext(connection) as queries:
        timeline_page(marked, filters=forks)
    # The forks are found among the operators' versions, not in the source's history.
    plan = query_plan(queries.captured_queries[0]["sql"], priced_out=("seqscan",))
    assert "version_operator_kind" in plan, plan


def test_the_filters_in_words_and_in_the_address():
    assert TimelineFilters().described == "versions" and TimelineFilters().query == ""
    filters = TimelineFilters(has_error=True, pinned=True, labelled=True, kind="data_fix")
    assert filters.described == "pinned, labelled data fixes with an error"
    assert filters.query == "has_error=true&pinned=true&labelled=true&kind=data_fix"


@pytest.mark.parametrize("filters, index", [
    (TimelineFilters(has_error=True), "version_with_error"),
    (TimelineFilters(pinned=True), "version_pinned"),
    (TimelineFilters(labelled=True), "version_labelled"),
    (TimelineFilters(kind="rewind"), "version_operator_kind"),
], ids=["error", "pinned", "labelled", "kind"])
@pytest.mark.parametrize("before", [None, 5], ids=["newest", "older"])
def test_each_filter_pages_through_an_index_of_its_own(marked, filters, index, before):
    """With only version_unique_number, a filter matching few versions of a long session read all of
    them, or the whole table: 92 ms for "pinned" at 400,000 versions, 0.3 ms with its partial index.
    The index must serve the query as the ORM words it (NOT (label = ''), kind = 'rewind')."""
    with CaptureQueriesContext(connection) as queries:
        timeline_page(marked, before=before, filters=filters)
    plan = query_plan(queries.captured_queries[0]["sql"], priced_out=("seqscan", "bitmapscan", "sort"))
    assert f"Index Scan Backward using {index} on snapshots_app_version" in plan and "Sort" not in plan, plan

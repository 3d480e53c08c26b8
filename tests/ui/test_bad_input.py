"""Hand-made query strings and form posts the database cannot take (a NUL byte, February 30th, a
date beyond year 1): a 400 that says which field, never a 500, and nothing changed."""

from __future__ import annotations

import base64
import html
import json
from datetime import timedelta

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.forms.utils import pretty_name
from django.urls import reverse

from sessions_app.models import AuditEvent, WorkflowSession
from snapshots_app.models import Version
from tests.factories import make_project, make_session


def snapshot_of_everything():
    return (
        list(WorkflowSession.objects.order_by("pk").values_list("pk", "head_number", "archived_at", "external_id")),
        list(Version.objects.order_by("pk").values_list("pk", "pinned", "label")),
        AuditEvent.objects.count(),
    )


def _cursor(*parts):
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode()


@pytest.mark.parametrize(("params", "field"), [
    ({"q": "\x00"}, "q"),
    ({"tag": "a\x00"}, "tag"),
    ({"workflow": "a\x00"}, "workflow"),
    ({"updated_from": "2026-13-45"}, "updated_from"),
    ({"updated_from": "2026-02-30"}, "updated_from"),
    ({"updated_from": "2026-01-01T25:00"}, "updated_from"),
    ({"updated_from": "yesterday"}, "updated_from"),
    ({"updated_to": "0001-01-01T00:00:00+14:00"}, "updated_to"),
    # Choices the list does not have: each listed every session, as if filtered.
    ({"status": "faild"}, "status"),
    ({"has_error": "maybe"}, "has_error"),
    ({"sort": "bogus"}, "sort"),
])
def test_session_list_filters_the_database_cannot_run_are_400(client, operator, story, params, field):
    client.force_login(operator)
    response = client.get(reverse("sessions:list"), params)
    assert response.status_code == 400
    page = response.content.decode()
    assert f"{pretty_name(field)}: " in page and 'role="alert"' in page and "run-42" not in page
    assert "until the filters above are fixed" in page and "No sessions yet" not in page


def test_a_list_filter_given_twice_or_a_wrong_choice_is_named_with_the_choices_as_the_page_words_them(
    client, operator, story
):
    client.force_login(operator)
    twice = client.get(reverse("sessions:list") + "?status=failed&status=running")
    assert twice.status_code == 400 and "Status: Given more than once: give it once." in twice.content.decode()
    page = html.unescape(client.get(reverse("sessions:list"), {"sort": "bogus"}).content.decode())
    assert ("Sort: 'bogus' is not one of -updated (recently updated), updated (least recently updated), "
            "-created (newest), external_id (external id).") in page
    page = html.unescape(client.get(reverse("sessions:list"), {"has_error": "maybe"}).content.decode())
    assert "'maybe' is not one of yes (has an error), no (has none); true and false say the same." in page


def test_a_project_the_user_cannot_see_is_404_not_the_first_projects_sessions(client, operator, story):
    make_project("hidden")
    client.force_login(operator)
    for slug in ("nope", "hidden"):
        response = client.get(reverse("sessions:list"), {"project": slug})
        page = html.unescape(response.content.decode())
        assert response.status_code == 404 and "run-42" not in page
        assert f"You have no project '{slug}': it does not exist, or you are not a member of it." in page
    assert "run-42" in client.get(reverse("sessions:list"), {"project": story.project.slug}).content.decode()


@pytest.mark.parametrize(("params", "said"), [
    ("kind=bogus", "Kind: 'bogus' is not one of rewind, fork, data_fix."),
    ("pinned=maybe", "Pinned: 'maybe' is not one of true, false."),
    ("has_error=maybe", "With an error: 'maybe' is not one of true, false."),
    ("before=abc", "Before: 'abc' is not a version number."),
    ("before=-1", "Before: '-1' is not a version number."),
    ("kind=fork&kind=rewind", "Kind: Given more than once: give it once."),
])
def test_a_timeline_address_it_cannot_follow_is_400_listing_nothing(client, operator, story, params, said):
    """Each showed the whole timeline (or the pinned versions) under a link that named another filter."""
    client.force_login(operator)
    response = client.get(reverse("snapshots:session", kwargs={"session_id": story.pk}) + "?" + params)
    page = html.unescape(response.content.decode())
    assert response.status_code == 400 and said in page, page
    assert 'id="v-1"' not in page and "No versions yet" not in page and "ws-connect" not in page
    fine = client.get(reverse("snapshots:session", kwargs={"session_id": story.pk}) + "?kind=rewind&pinned=0&labelled=no")
    assert fine.status_code == 200 and 'id="timeline-problems"' not in fine.content.decode()


def test_the_last_day_a_date_field_offers_is_a_range_end_the_list_takes(client, operator, story):
    """9999-12-31 (a date input's last day): its end of day is past what a datetime holds, and it was a
    400; it ends at the last moment there is, and lists everything updated before."""
    client.force_login(operator)
    response = client.get(reverse("sessions:list"), {"updated_to": "9999-12-31"})
    assert response.status_code == 200 and "run-42" in response.content.decode()
    assert 'name="updated_to" value="9999-12-31"' in response.content.decode()


def test_an_invalid_filter_keeps_the_valid_ones_showing(client, operator, story):
    client.force_login(operator)
    page = client.get(reverse("sessions:list"), {"updated_from": "2026-02-30", "status": "failed"}).content.decode()
    assert '<option value="failed" selected>' in page


@pytest.mark.parametrize(("sort", "after"), [
    ("external_id", _cursor("a\x00b", "00000000-0000-0000-0000-000000000000")),
    ("-updated", _cursor("a\x00b", "00000000-0000-0000-0000-000000000000")),
    ("-updated", _cursor("0001-01-01T00:00:00+14:00", "00000000-0000-0000-0000-000000000000")),
    ("-created", "!!not-a-cursor"),
])
def test_a_mangled_cursor_is_400_not_the_first_page_again(client, operator, story, after, sort):
    """Answered with the first page, "Load more" added its rows again below the last."""
    client.force_login(operator)
    response = client.get(reverse("sessions:list"), {"sort": sort, "after": after})
    page = response.content.decode()
    assert response.status_code == 400 and "run-42" not in page
    assert "After: Not a place in this list" in page


def test_good_dates_still_filter(client, operator, story):
    client.force_login(operator)
    url = reverse("sessions:list")
    today = story.updated_at.date().isoformat()
    assert "run-42" in client.get(url, {"updated_from": today, "updated_to": today}).content.decode()
    assert "run-42" in client.get(url, {"updated_from": "2000-01-01", "updated_to": "9999-12-30"}).content.decode()
    assert "run-42" not in client.get(url, {"updated_to": "2000-01-01T00:00:00+14:00"}).content.decode()


def test_version_viewer_pointer_with_a_non_ascii_digit_is_404(client, operator, story):
    client.force_login(operator)
    url = reverse("snapshots:version", kwargs={"session_id": story.pk, "number": 3})
    assert client.get(url, {"pointer": "/queue/\u00b2"}).status_code == 404


def _post(client, session, name, data, **extra):
    url = reverse(f"snapshots:{name}", kwargs={"session_id": session.pk, "number": 1})
    return client.post(url, data, **extra)


@pytest.mark.parametrize(("name", "data", "field"), [
    ("rewind", {"reason": "a\x00b", "expected_version": 5}, "reason"),
    ("rewind", {"reason": "why", "expected_version": "\u00b2"}, "expected_version"),
    ("fork", {"external_id": "a\x00b", "reason": "x"}, "external_id"),
    ("fork", {"reason": "a\x00b"}, "reason"),
])
def test_rewind_and_fork_forms_refuse_nul_with_a_field_error(client, operator, story, name, data, field):
    client.force_login(operator)
    before = snapshot_of_everything()
    response = _post(client, story, name, data)
    assert response.status_code == 400
    page = response.content.decode()
    assert f"{pretty_name(field)}: " in page and 'role="alert"' in page and "<form" in page
    assert snapshot_of_everything() == before


@pytest.mark.parametrize("data", [{"label": "a\x00b"}, {"label": "x" * 101}, {"pinned": "yes"}])
@pytest.mark.parametrize("htmx", [True, False])
def test_mark_refuses_bad_input_and_changes_nothing(client, operator, story, data, htmx):
    client.force_login(operator)
    before = snapshot_of_everything()
    response = _post(client, story, "mark", data, **({"HTTP_HX_REQUEST": "true"} if htmx else {}))
    assert response.status_code == 400
    body = response.content.decode()
    assert ("Label: " in body or "Pinned: " in body) and ("<html" in body) is not htmx
    assert htmx or "v1 was not changed. " in body  # which version's form (every row has one)
    assert snapshot_of_everything() == before


def test_admin_data_fix_refuses_a_nul_reason(client, story):
    staff = get_user_model().objects.create_superuser("root", password="pw-for-tests-1")
    client.force_login(staff)
    base = Version.objects.get(session=story, number=2)
    url = reverse("admin:snapshots_app_version_data_fix", args=[base.pk])
    before = snapshot_of_everything()
    state = json.dumps({"counters": {"steps": 2}})
    for data in ({"state": state, "reason": "a\x00b", "expected_version": 5, "apply": "1"},
                 {"state": state, "reason": "why", "expected_version": "\u00b2", "apply": "1"},
                 {"state": "{\x00}", "reason": "why", "expected_version": 5, "apply": "1"}):
        response = client.post(url, data)
        assert response.status_code == 400 and "errornote" in response.content.decode()
    assert snapshot_of_everything() == before


@pytest.mark.parametrize("offset", ["-5", "-1", "-500", "junk"])
def test_version_viewer_treats_a_negative_or_unreadable_offset_as_the_start(client, operator, story, offset):
    client.force_login(operator)
    url = reverse("snapshots:version", kwargs={"session_id": story.pk, "number": 3})
    page = client.get(url, {"pointer": "/counters", "offset": offset}).content.decode()
    assert "steps" in page and "tokens" in page


def test_a_version_address_naming_no_version_says_so_on_a_page_of_its_session(client, operator, story):
    """A mistyped `to=`, a bookmark from before a retention run or version 0 got the generic 404:
    "it may have been deleted, or it belongs to a project you are not a member of"."""
    client.force_login(operator)

    def url(name, number=None):
        return reverse(f"snapshots:{name}", kwargs={"session_id": story.pk, **({"number": number} if number is not None else {})})

    for response, said in [
        (client.get(url("version", 9)), "run-42 has no version 9: its newest is v5."),
        (client.get(url("version", 0)), "run-42 has no version 0: versions are numbered from 1"),
        (client.get(url("diff"), {"from": 1, "to": 99}), "run-42 has no version 99: its newest is v5."),
        (client.get(url("diff"), {"from": 7, "to": 2}), "run-42 has no version 7"),
        (client.get(url("rewind", 6)), "run-42 has no version 6"),
        (client.get(url("fork", 6)), "run-42 has no version 6"),
        (client.get(url("raw", 6)), "run-42 has no version 6"),
    ]:
        page = response.content.decode()
        assert response.status_code == 404 and said in page, said
        assert "project you are not a member of" not in page and f'href="{url("session")}"' in page
    for params in ({"from": "abc", "to": 2}, {"from": 1, "to": "1.5"}, {"to": "-"}):
        response = client.get(url("diff"), params)
        assert response.status_code == 400 and "is not a version number" in response.content.decode()
    before = snapshot_of_everything()
    response = client.post(url("mark", 6), {"pinned": "1"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 404 and response.content.decode() == "run-42 has no version 6: its newest is v5."
    assert snapshot_of_everything() == before
    # Another project's session is still the plain 404, whatever its versions.
    stranger = make_session(make_project("globex"), "secret-run")
    response = client.get(reverse("snapshots:version", kwargs={"session_id": stranger.pk, "number": 9}))
    assert response.status_code == 404 and "secret-run" not in response.content.decode()


def test_a_date_range_given_backwards_says_so_instead_of_that_nothing_matches(client, operator, story):
    """"Updated from" a day after "to" listed nothing and said only "No session matches these filters"."""
    client.force_login(operator)
    url = reverse("sessions:list")
    today = story.updated_at.date()
    backwards = {"updated_from": (today + timedelta(days=1)).isoformat(), "updated_to": today.isoformat()}
    for response in (client.get(url, backwards), client.get(url, backwards, headers={"HX-Request": "true"})):
        page = html.unescape(response.content.decode())
        assert f"No session can match: “Updated from” ({backwards['updated_from']}) is after “to” ({today})." in page
        assert "run-42" not in page
    one_day = client.get(url, {"updated_from": today.isoformat(), "updated_to": today.isoformat()}).content.decode()
    assert "run-42" in one_day and "No session can match" not in one_day

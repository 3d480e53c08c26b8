"""403, 404, 500 and 503 pages in the site's layout, saying what happened."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import uuid

import pytest
from django.conf import settings as django_settings
from django.test import RequestFactory
from django.urls import reverse
from django.views.defaults import server_error

from tests.liveserver import LiveServer, database_url, free_port


def test_a_viewer_is_told_why_an_operator_action_is_refused(client, viewer, story):
    client.force_login(viewer)
    response = client.get(reverse("snapshots:rewind", kwargs={"session_id": story.pk, "number": 1}))
    assert response.status_code == 403
    page = response.content.decode()
    assert "Operators only: viewers can read but not change sessions" in page
    assert 'class="topbar"' in page and "victor" in page  # the layout, logged in


def test_a_refused_click_is_one_line_in_the_log_not_a_traceback(client, viewer, story, caplog):
    """A viewer opening a rewind page logged ~35 lines of traceback ending in PermissionDenied: anyone
    searching the log for "Traceback" took an expected refusal for a crash."""
    import logging

    client.force_login(viewer)
    with caplog.at_level(logging.WARNING, logger="django.request"):
        assert client.get(reverse("snapshots:rewind", kwargs={"session_id": story.pk, "number": 1})).status_code == 403
        assert client.get(reverse("snapshots:session", kwargs={"session_id": uuid.uuid4()})).status_code == 404
    logged = [record for record in caplog.records if record.name == "django.request"]
    assert [record.getMessage().split(":")[0] for record in logged] == ["Forbidden (Permission denied)", "Not Found"]
    assert all(record.exc_info is None for record in logged) and "Traceback" not in caplog.text


def test_404_is_in_the_layout(client, viewer, story):
    client.force_login(viewer)
    response = client.get(reverse("snapshots:session", kwargs={"session_id": uuid.uuid4()}))
    assert response.status_code == 404
    page = response.content.decode()
    assert "Not found" in page and 'class="topbar"' in page and "<p></p>" not in page


def test_an_action_address_visited_says_what_it_is_in_the_layout_not_a_blank_405(client, operator, story):
    """A bookmarked or typed sign-out or action address answered Django's empty 405: the browser showed
    "HTTP ERROR 405". Nothing is done by the visit."""
    client.force_login(operator)
    mark = client.get(reverse("snapshots:mark", kwargs={"session_id": story.pk, "number": 1}))
    page = mark.content.decode()
    assert mark.status_code == 405 and mark["Allow"] == "POST"
    assert "page to open, bookmark or reload: nothing was done" in page and 'class="topbar"' in page
    assert f'href="{reverse("snapshots:session", kwargs={"session_id": story.pk})}"' in page
    api = client.get(f"/api/v1/sessions/{story.pk}/rewind/")
    assert api.status_code == 405 and api["Content-Type"] == "application/problem+json"  # the API's own shape
    out = client.get(reverse("logout"))
    assert out.status_code == 405 and f"Sign out {operator.username}" in out.content.decode()
    assert client.get(reverse("sessions:list")).status_code == 200  # still signed in
    # The sign-in page says so (sent from a page, as a browser sends it: with a Referer).
    signed_out = client.post(reverse("logout"), follow=True, HTTP_REFERER=f"http://testserver{reverse('sessions:list')}")
    assert signed_out.redirect_chain[-1][1] == 302 and "You are signed out." in signed_out.content.decode()
    assert "You are signed out." in client.get(reverse("logout")).content.decode()


def test_500_renders_without_a_request_context_or_database():
    # No db fixture: pytest-django fails any database access here.
    response = server_error(RequestFactory().get("/"))
    assert response.status_code == 500
    assert "Server error" in response.content.decode() and "Session Rewind" in response.content.decode()


def test_a_form_too_large_to_read_is_refused_in_words_not_a_bare_400(client, story, settings):
    """Django refuses a body over REQUEST_MAX_BYTES before any view runs; its own page said only "Bad
    Request (400)"."""
    from django.contrib.auth import get_user_model

    from snapshots_app.models import Version

    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    client.force_login(get_user_model().objects.create_superuser("root", password="pw-for-tests-1"))
    version = Version.objects.get(session=story, number=1)
    before = Version.objects.count()
    response = client.post(reverse("admin:snapshots_app_version_data_fix", args=[version.pk]),
                           {"state": "x" * 2048, "reason": "too big"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "larger than this service accepts" in page and "nothing was changed" in page and "Session Rewind" in page
    assert Version.objects.count() == before


@pytest.mark.django_db(transaction=True)  # the server below is another process
def test_with_the_database_gone_a_page_says_so_with_a_503_not_a_logged_server_error(capfd):
    """A signed-in operator's dashboard (its session lives in the database) while PostgreSQL restarts:
    the page answered 500 "Server error ... it has been logged" with a traceback per request, so
    nobody could tell an outage from a bug. It is a 503 saying the database is unavailable, which
    tries again by itself; an open page's live socket, retrying meanwhile, is refused without a
    traceback per try."""
    import asyncio

    import websockets

    gone = database_url().rsplit("/", 1)[0] + "/session_rewind_no_such_database"
    server = LiveServer(free_port(), {
        **os.environ, "DATABASE_URL": gone, "DB_POOL_SIZE": "2", "DB_POOL_TIMEOUT": "1",
        "REDIS_URL": django_settings.REDIS_URL, "SECRET_KEY": "error-page-tests-only", "DEBUG": "false",
    })
    server.start()
    try:
        pages = {}
        for path in ("/", "/admin/", f"/sessions/{uuid.uuid4()}/"):
            request = urllib.request.Request(f"{server}{path}", headers={"Cookie": "sessionid=" + "a" * 32})
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, timeout=15)
            pages[path] = (answer.value.code, answer.value.headers.get("Retry-After"), answer.value.read().decode())

        async def live_socket() -> int:
            url = f"ws://127.0.0.1:{server.port}/ws/projects/acme/"
            headers = {"Cookie": "sessionid=" + "a" * 32, "Origin": str(server)}
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url, additional_headers=headers, open_timeout=15):
                    pass
            return refused.value.response.status_code

        refusals = [asyncio.run(live_socket()) for _ in range(3)]
    finally:
        server.stop()
    assert refusals == [403] * 3
    for path, (status, retry_after, page) in pages.items():
        assert (status, retry_after) == (503, "5"), path
        assert "Database unavailable" in page and "nothing was written" in page and "Server error" not in page
        assert '<meta http-equiv="refresh" content="5">' in page
    log = capfd.readouterr().err
    assert "database unavailable in /admin/" in log
    assert log.count("live-update sockets (database) failed: OperationalError") == 1  # then counted
    assert "Traceback" not in log and "Exception in ASGI application" not in log


def test_a_form_from_before_the_last_sign_in_is_refused_in_words_in_the_layout(operator, story):
    """Signed in again in another tab: the open page's token no longer counts. Django's page said
    "CSRF verification failed. Request aborted." with no layout and no way back."""
    from django.test import Client

    from snapshots_app.models import Version

    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    page = reverse("snapshots:session", kwargs={"session_id": story.pk})
    client.get(page)
    stale = client.cookies["csrftoken"].value
    client.cookies["csrftoken"] = "a" * 32  # as signing in again (in another tab) rotated it
    rewind = reverse("snapshots:rewind", kwargs={"session_id": story.pk, "number": 2})
    versions = Version.objects.count()

    response = client.post(rewind, {"reason": "bad output", "csrfmiddlewaretoken": stale},
                           headers={"Referer": f"http://testserver{rewind}"})
    assert response.status_code == 403
    text = response.content.decode()
    assert "loaded before you last signed in" in text and "nothing was changed" in text
    assert 'class="topbar"' in text and "CSRF verification failed" not in text
    assert f'<a href="http://testserver{rewind}">Back to the page</a>' in text
    # An htmx action (pin) gets the sentence alone, which the page shows next to the button.
    mark = reverse("snapshots:mark", kwargs={"session_id": story.pk, "number": 2})
    response = client.post(mark, {"pinned": "1"}, headers={"HX-Request": "true", "X-CSRFToken": stale})
    assert response.status_code == 403 and response["Content-Type"].startswith("text/plain")
    assert response.content.decode().startswith("This page was loaded before you last signed in")
    assert Version.objects.count() == versions and not Version.objects.filter(pinned=True).exists()
    # Another site's address is no way back.
    response = client.post(rewind, {"reason": "x", "csrfmiddlewaretoken": stale}, headers={"Referer": "https://evil.example/"})
    assert "evil.example" not in response.content.decode()

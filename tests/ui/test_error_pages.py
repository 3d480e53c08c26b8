"""403, 404 and 500 pages in the site's layout, saying what happened."""

from __future__ import annotations

import uuid

from django.test import RequestFactory
from django.urls import reverse
from django.views.defaults import server_error


def test_a_viewer_is_told_why_an_operator_action_is_refused(client, viewer, story):
    client.force_login(viewer)
    response = client.get(reverse("snapshots:rewind", kwargs={"session_id": story.pk, "number": 1}))
    assert response.status_code == 403
    page = response.content.decode()
    assert "Operators only: viewers can read but not change sessions" in page
    assert 'class="topbar"' in page and "victor" in page  # the layout, logged in


def test_404_is_in_the_layout(client, viewer, story):
    client.force_login(viewer)
    response = client.get(reverse("snapshots:session", kwargs={"session_id": uuid.uuid4()}))
    assert response.status_code == 404
    page = response.content.decode()
    assert "Not found" in page and 'class="topbar"' in page and "<p></p>" not in page


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

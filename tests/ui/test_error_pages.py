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

"""A session's export from its page: an operator queues it, watches it, downloads the file."""

from __future__ import annotations

import orjson
import pytest

from snapshots_app.models import Job, JobStatus
from snapshots_app.transfer import transfer_export_start
from tests.factories import make_session


@pytest.fixture
def exports_here(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    return tmp_path


def test_an_operator_exports_a_session_from_its_page_and_downloads_every_version(
    client, operator, story, exports_here, django_capture_on_commit_callbacks
):
    client.force_login(operator)
    page = client.get(f"/sessions/{story.pk}/").content.decode()
    assert 'id="export"' in page and 'id="exports"' in page and "Export #" not in page
    assert "{#" not in page and "#}" not in page  # the section's template comments stay out of the page

    with django_capture_on_commit_callbacks(execute=True):  # the job runs when the request commits
        queued = client.post(f"/sessions/{story.pk}/export/")
    assert queued.status_code == 302 and queued["Location"].endswith(f"/sessions/{story.pk}/#exports")
    job = Job.objects.get(session=story)
    assert job.status == JobStatus.DONE and job.created_by_label == "olga"

    page = client.get(f"/sessions/{story.pk}/").content.decode()
    assert "Export started" in page and f"Export #{job.pk} by olga" in page and "5 versions" in page
    link = f"/sessions/{story.pk}/export/{job.pk}/file/"
    assert f'href="{link}"' in page
    download = client.get(link)
    assert download.status_code == 200 and download["Content-Type"] == "application/x-ndjson"
    assert "attachment" in download["Content-Disposition"]
    records = [orjson.loads(line) for line in b"".join(download.streaming_content).splitlines()]
    assert [r["number"] for r in records if r["type"] == "version"] == [1, 2, 3, 4, 5]
    assert records[-1]["type"] == "end"


def test_a_second_click_while_an_export_is_under_way_starts_no_other(client, operator, story, exports_here):
    """A double click on Export queued two jobs, and wrote the session out twice."""
    client.force_login(operator)
    first = client.post(f"/sessions/{story.pk}/export/", follow=True)  # (queued: no worker runs it here)
    again = client.post(f"/sessions/{story.pk}/export/", follow=True)
    job = Job.objects.get(session=story)
    assert "Export started" in first.content.decode()
    assert f"Export #{job.pk} of this session is still under way" in again.content.decode()
    Job.objects.filter(pk=job.pk).update(status=JobStatus.DONE)
    client.post(f"/sessions/{story.pk}/export/")
    assert Job.objects.filter(session=story).count() == 2  # once it is done, another may start


def test_a_viewer_sees_no_export_and_may_neither_start_nor_download_one(client, viewer, story, exports_here):
    job = transfer_export_start(project=story.project, session=story)
    client.force_login(viewer)
    page = client.get(f"/sessions/{story.pk}/").content.decode()
    assert 'id="export"' not in page and 'id="exports"' not in page
    assert client.post(f"/sessions/{story.pk}/export/").status_code == 403
    assert client.get(f"/sessions/{story.pk}/export/").status_code == 403
    assert client.get(f"/sessions/{story.pk}/export/{job.pk}/file/").status_code == 403
    assert Job.objects.count() == 1


def test_an_export_shows_how_far_it_got_why_it_failed_and_when_its_file_is_gone(
    client, operator, team, story, exports_here, django_capture_on_commit_callbacks
):
    client.force_login(operator)
    waiting = transfer_export_start(project=team, session=story)  # no worker took it
    page = client.get(f"/sessions/{story.pk}/").content.decode()
    assert f"Export #{waiting.pk}" in page and "waiting for a worker" in page and "<progress" in page
    # Unfinished, the section asks for itself again (an event may never come: no worker, a dead one).
    section = client.get(f"/sessions/{story.pk}/export/").content.decode()
    assert 'id="exports"' in section
    assert f'hx-get="/sessions/{story.pk}/export/" hx-trigger="every 2s"' in section and "<html" not in section

    Job.objects.filter(pk=waiting.pk).update(status=JobStatus.FAILED, error="disk full")
    assert "failed: disk full" in client.get(f"/sessions/{story.pk}/").content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        client.post(f"/sessions/{story.pk}/export/")
    done = Job.objects.filter(session=story).latest("id")
    for path in (exports_here / "exports").iterdir():
        path.unlink()
    page = client.get(f"/sessions/{story.pk}/").content.decode()
    assert "its file is no longer there" in page and f"/export/{done.pk}/file/" not in page
    assert "every 2s" not in page  # all finished: nothing to ask for again
    gone = client.get(f"/sessions/{story.pk}/export/{done.pk}/file/", follow=True)
    assert "the export file is no longer there; export again" in gone.content.decode()


def test_an_export_is_downloaded_only_from_its_own_sessions_page_and_an_empty_session_has_none(
    client, operator, team, story, exports_here, django_capture_on_commit_callbacks
):
    other = make_session(team, "run-43")
    with django_capture_on_commit_callbacks(execute=True):
        job = transfer_export_start(project=team, session=story)
    client.force_login(operator)
    assert client.get(f"/sessions/{other.pk}/export/{job.pk}/file/").status_code == 404
    assert 'id="export"' not in client.get(f"/sessions/{other.pk}/").content.decode()
    refused = client.post(f"/sessions/{other.pk}/export/", follow=True)
    assert "no versions yet: there is nothing to export" in refused.content.decode()
    assert not Job.objects.filter(session=other).exists()

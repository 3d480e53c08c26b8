"""Static files as the web process serves them: through the ASGI application, as uvicorn runs it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings


def _get(path: str, headers: list[tuple[bytes, bytes]], method: str = "GET") -> tuple[dict, bytes, list[str]]:
    """(the response start, its body, the warnings raised while it was served)."""
    from config.asgi import application

    async def request() -> tuple[dict, bytes]:
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "scheme": "http", "http_version": "1.1",
                 "headers": [(b"host", b"localhost"), *headers],
                 "client": ("127.0.0.1", 50000), "server": ("localhost", 80)}
        app = ApplicationCommunicator(application, scope)
        await app.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await app.receive_output(10)
        body, part = b"", {"more_body": True}
        while part.get("more_body"):
            part = await app.receive_output(10)
            assert part["type"] == "http.response.body", part
            body += part.get("body", b"")
        await app.wait(5)
        return start, body

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start, body = async_to_sync(request)()
    return start, body, [str(warning.message) for warning in caught]


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "headers", "status", "part"), [
    ("GET", [], 200, slice(None)),
    ("GET", [(b"range", b"bytes=10-99")], 206, slice(10, 100)),
    ("HEAD", [], 200, slice(0)),
], ids=["whole", "range", "head"])
def test_a_static_file_is_streamed_without_django_buffering_it_first(method, headers, status, part):
    """Django read WhiteNoise's file iterator whole before the first byte under ASGI, and said so in a
    warning that `make run` printed on the first page: read like an error by a newcomer."""
    expected = (Path(settings.STATIC_ROOT) / "js" / "app.js").read_bytes()

    start, body, said = _get("/static/js/app.js", headers, method)

    assert start["status"] == status
    assert body == expected[part]
    assert [text for text in said if "StreamingHttpResponse" in text] == []


@pytest.mark.django_db
def test_a_static_file_the_browser_holds_is_not_modified():
    etag = {name.lower(): value for name, value in _get("/static/js/app.js", [])[0]["headers"]}[b"etag"]
    start, body, said = _get("/static/js/app.js", [(b"if-none-match", etag)])
    assert (start["status"], body) == (304, b"")
    assert [text for text in said if "StreamingHttpResponse" in text] == []

"""Files sent as responses, read a chunk at a time under ASGI (the server the web process runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from django.core.handlers.asgi import ASGIRequest
from django.http import FileResponse, HttpRequest, StreamingHttpResponse
from django.utils.http import content_disposition_header

CHUNK = 256 * 1024


async def file_chunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    """`handle`'s bytes a chunk at a time, read off the event loop; it is closed at the end. Django reads
    a response's synchronous iterator whole under ASGI, in a thread, before its first byte goes out."""
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        handle.close()


def file_download(request: HttpRequest, path: Path, content_type: str) -> StreamingHttpResponse:
    """`path` as an attachment, read a chunk at a time as the client takes it. Under ASGI (the server
    the web process runs) Django reads a FileResponse's file whole into memory before its first byte
    goes out, so there the file is read by an async iterator instead (a 1 GB export held 1 GB of the
    web process, and its client waited for all of it to be read)."""
    handle = path.open("rb")
    if not isinstance(request, ASGIRequest):  # the test client's and any WSGI server's handler
        return FileResponse(handle, as_attachment=True, filename=path.name, content_type=content_type)
    response = StreamingHttpResponse(file_chunks(handle), content_type=content_type)
    response["Content-Length"] = str(path.stat().st_size)
    response["Content-Disposition"] = content_disposition_header(True, path.name)
    return response

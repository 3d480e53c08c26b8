"""Files read for responses under ASGI, the server the web process runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import IO

CHUNK = 256 * 1024


async def file_chunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    """`handle`'s bytes a chunk at a time, read off the event loop; it is closed at the end. Django reads
    a response's synchronous iterator whole under ASGI, in a thread, before its first byte goes out."""
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        handle.close()

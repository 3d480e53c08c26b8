"""Side effects that follow a commit but must not hold up the caller: live-update events, queueing
Celery tasks, warming caches.

A write is acknowledged once committed; what it triggers afterwards runs here, on one daemon thread
per process, in submission order. None of it may be needed for correctness: events are best effort,
a finalize that never got queued is caught up by the periodic `finalize_pending` task, and a cache is
only an accelerator. At interpreter exit the queue is drained (briefly), so short-lived commands such
as `seed_demo` still announce and finalize what they wrote.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from asgiref.sync import async_to_sync
from django.db import close_old_connections, transaction

logger = logging.getLogger(__name__)

DRAIN_AT_EXIT_SECONDS = 10.0

_jobs: queue.Queue[Callable[[], None]] = queue.Queue()
_lock = threading.Lock()
_owner: tuple[int, threading.Thread] | None = None  # (pid, thread): a forked child starts its own


_loop_of_thread = threading.local()


def _run() -> None:
    # One event loop for the thread's life: channels-redis keeps its connections per loop, and
    # async_to_sync would start a new thread with a new loop (and new connections) every time.
    _loop_of_thread.loop = asyncio.new_event_loop()
    asyncio.set_event_loop(_loop_of_thread.loop)
    while True:
        job = _jobs.get()
        try:
            job()
        except Exception:  # one failing side effect must not stop the ones after it
            logger.exception("background job %r failed", job)
        finally:
            close_old_connections()  # jobs may touch the database (eager Celery runs tasks inline)
            _jobs.task_done()


def _ensure_thread() -> None:
    global _owner
    with _lock:
        if _owner is None or _owner[0] != os.getpid() or not _owner[1].is_alive():
            thread = threading.Thread(target=_run, name="session-rewind-background", daemon=True)
            thread.start()
            _owner = (os.getpid(), thread)


def submit(job: Callable[[], None]) -> None:
    """Run `job` soon on the background thread."""
    _ensure_thread()
    _jobs.put(job)


def after_commit(job: Callable[[], None]) -> None:
    """Run `job` on the background thread once the current transaction commits (never if it rolls back)."""
    transaction.on_commit(lambda: submit(job))


def run_async(function: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Await `function()` from synchronous code: on the background thread's own event loop when
    called there, else through asgiref."""
    loop = getattr(_loop_of_thread, "loop", None)
    if loop is not None:
        loop.run_until_complete(function())
    else:
        async_to_sync(function)()


def drain(timeout: float = 5.0) -> bool:
    """Wait until every submitted job has run; False if `timeout` seconds passed first."""
    done = threading.Event()

    def wait() -> None:
        _jobs.join()
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return done.wait(timeout)


def _drain_at_exit() -> None:
    if _owner is not None and _owner[0] == os.getpid():
        drain(DRAIN_AT_EXIT_SECONDS)


# Before the interpreter joins threads, not at atexit: by then concurrent.futures refuses new work,
# and asgiref (live events) needs it. Hooks run last-registered first, so this precedes its own.
_register = getattr(threading, "_register_atexit", atexit.register)
_register(_drain_at_exit)

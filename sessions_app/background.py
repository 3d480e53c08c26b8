"""Side effects that follow a commit but must not hold up the caller: live-update events, queueing
Celery tasks, warming caches.

A write is acknowledged once committed; what it triggers afterwards runs here, on one daemon thread
per process, in submission order. None of it may be needed for correctness: events are best effort,
a finalize that never got queued is caught up by the periodic `finalize_pending` task, and a cache is
only an accelerator. At interpreter exit the queue is drained (briefly), so short-lived commands such
as `seed_demo` still announce and finalize what they wrote.

Work that follows every write of a busy key (a session an engine writes step after step) can be
coalesced (`after_commit_coalesced`): the first item after a quiet interval goes out at once, the
ones after it are merged and go out together when the interval is over. Measured: one publish,
finalize message and head-cache write per version cost a 200 KB write ~35% of its time on two
cores (that thread, Redis and the broker compete with the writer and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, TypeVar

from asgiref.sync import async_to_sync
from django.db import close_old_connections, transaction

logger = logging.getLogger(__name__)

DRAIN_AT_EXIT_SECONDS = 10.0

_jobs: queue.Queue[Callable[[], None]] = queue.Queue()
_lock = threading.Lock()
_owner: tuple[int, threading.Thread] | None = None  # (pid, thread): a forked child starts its own


_loop_of_thread = threading.local()

T = TypeVar("T")


class _Coalescer:
    """Coalesced items per key. Items are added on the committing thread (under a lock, without
    waking the background thread unless something is due sooner), and sent on the background thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[Hashable, tuple[Callable[[Any], None], Callable[[Any, Any], Any], Any]] = {}
        self.last_sent: dict[Hashable, float] = {}
        self.due: list[tuple[float, int, Hashable]] = []  # (when, tie-breaker, key), a heap
        self.counter = 0

    def add(self, key: Hashable, item: Any, send: Callable[[Any], None], merge: Callable[[Any, Any], Any],
            interval: float) -> None:
        now = time.monotonic()
        with self.lock:
            waiting = self.pending.get(key)
            if waiting is not None:
                self.pending[key] = (send, merge, merge(waiting[2], item))
                return
            last = self.last_sent.get(key, -interval)
            send_now = now - last >= interval
            if send_now:
                self.last_sent[key] = now
            else:
                self.pending[key] = (send, merge, item)
                self.counter += 1
                heapq.heappush(self.due, (last + interval, self.counter, key))
        # Either send now, or wake the thread so that it waits until this item is due, not longer.
        submit((lambda: send(item)) if send_now else _nothing)

    def seconds_to_next(self) -> float | None:
        with self.lock:
            return None if not self.due else max(0.0, self.due[0][0] - time.monotonic())

    def send_due(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        ready = []
        with self.lock:
            while self.due and (everything or self.due[0][0] <= now):
                _, _, key = heapq.heappop(self.due)
                send, _merge, item = self.pending.pop(key)
                self.last_sent[key] = now
                ready.append((send, item))
            if len(self.last_sent) > 10_000:  # forget keys quiet for a minute (ample for any interval)
                self.last_sent = {key: when for key, when in self.last_sent.items() if now - when < 60}
        for send, item in ready:
            _call(send, item)


class OutageLog:
    """The log of one kind of best-effort send (live updates, finalize messages) while what it needs
    is down: the first failure is logged with its reason, the ones after it are counted and reported
    at most once per `every` seconds, and the first success after them says the outage is over.

    Each failure logged its own warning with a traceback (~25 lines): with Redis down, 20 sessions
    written by engines made 64,000 log lines in 10 s, burying the one line that said what was wrong.
    The tracebacks are still there at DEBUG."""

    def __init__(self, logger: logging.Logger, what: str, *, every: float = 60.0) -> None:
        self.logger, self.what, self.every = logger, what, every
        self.lock = threading.Lock()
        self.failures = 0  # since the outage began
        self.began = 0.0
        self.reported = 0.0

    def failed(self, exc: BaseException, detail: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.failures += 1
            if self.failures == 1:
                self.began = now
            elif now - self.reported < self.every:
                self.logger.debug("%s: %s", self.what, detail, exc_info=exc)
                return
            self.reported, failures = now, self.failures
        reason = type(exc).__name__ + (f": {str(exc).strip().splitlines()[0]}" if str(exc).strip() else "")
        since = "" if failures == 1 else f" ({failures} times over {now - self.began:.0f} s)"
        self.logger.warning("%s failed%s: %s; %s", self.what, since, reason, detail)
        self.logger.debug("%s: %s", self.what, detail, exc_info=exc)

    def succeeded(self) -> None:
        if not self.failures:  # (read without the lock: the common case costs nothing)
            return
        with self.lock:
            failures, self.failures = self.failures, 0
            lasted = time.monotonic() - self.began
        if failures:
            self.logger.warning("%s: working again, after %s failures over %.0f s", self.what, failures, lasted)


def _nothing() -> None:
    """A job that only wakes the thread (to recompute how long to wait)."""


_coalescer = _Coalescer()


def _forget_parent_work() -> None:
    """A forked child (a pre-forking server's worker) starts with nothing waiting: its parent sends
    what it had, and a lock held at the fork would stay held."""
    global _coalescer
    _coalescer = _Coalescer()


os.register_at_fork(after_in_child=_forget_parent_work)


def _call(job: Callable[..., None], *args: Any) -> None:
    try:
        job(*args)
    except Exception:  # one failing side effect must not stop the ones after it
        logger.exception("background job %r failed", job)
    finally:
        close_old_connections()  # jobs may touch the database (eager Celery runs tasks inline)


def _run() -> None:
    # One event loop for the thread's life: channels-redis keeps its connections per loop, and
    # async_to_sync would start a new thread with a new loop (and new connections) every time.
    _loop_of_thread.loop = asyncio.new_event_loop()
    asyncio.set_event_loop(_loop_of_thread.loop)
    while True:
        try:
            job = _jobs.get(timeout=_coalescer.seconds_to_next())
        except queue.Empty:
            _coalescer.send_due()
            continue
        try:
            if job is not _nothing:
                _call(job)
            _coalescer.send_due()
        finally:
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


def after_commit_coalesced(
    key: Hashable, item: T, send: Callable[[T], None], *, merge: Callable[[T, T], T], interval: float
) -> None:
    """Once the current transaction commits, `send(item)` on the background thread, at most once per
    `interval` seconds per `key`: an item arriving within `interval` of the last send waits, merged
    (`merge(waiting, newer)`) with the ones after it, and is sent when the interval is over. Never
    for a rolled-back transaction. `drain` sends whatever is waiting."""
    transaction.on_commit(lambda: _coalescer.add(key, item, send, merge, interval))


def run_async(function: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Await `function()` from synchronous code: on the background thread's own event loop when
    called there, else through asgiref."""
    loop = getattr(_loop_of_thread, "loop", None)
    if loop is not None:
        loop.run_until_complete(function())
    else:
        async_to_sync(function)()


def drain(timeout: float = 5.0) -> bool:
    """Wait until every submitted job has run, and coalesced items waiting for their interval have
    been sent; False if `timeout` seconds passed first."""
    submit(lambda: _coalescer.send_due(everything=True))
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

"""A real `celery worker` process on the test database and Redis, for the worker tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from snapshots_app.models import Job

ROOT = Path(__file__).resolve().parents[2]
VISIBILITY_TIMEOUT = 2  # seconds before a killed worker's unacknowledged task is delivered again
WORKER_APPLICATION_NAME = f"rewind-test-worker-{os.getpid()}"


class WorkerProcess:
    """`celery -A config worker --pool=solo` against pytest's database; can be SIGKILLed and restarted."""

    def __init__(self, env: dict[str, str], log: Path, *, pool: tuple[str, ...] = ("--pool=solo",)) -> None:
        self.env = env
        self.log = log
        self.pool = pool  # ("--pool=prefork", "--concurrency=1"): tasks run in a child process
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from config.celery import app

        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [str(ROOT / ".venv/bin/celery"), "-A", "config", "worker", *self.pool, "--loglevel=INFO",
             "--without-gossip", "--without-mingle", "-n", f"workers-test-{os.getpid()}@%h"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker exited at start; see {self.log}:\n{self.log.read_text()[-3000:]}")
            if app.control.ping(timeout=0.5):
                return
        raise RuntimeError(f"celery worker did not become ready; see {self.log}")

    def children(self) -> list[int]:
        """The pool's child processes (a prefork pool's: where its tasks run)."""
        assert self.process is not None
        found = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in found]

    def kill(self) -> None:
        """SIGKILL the worker (no warm shutdown, no ack): what a crash or OOM kill does."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


def _purge_queue() -> None:
    """Drop messages left in *our* Redis database by earlier runs (never FLUSHDB: only Celery's keys)."""
    from config.celery import app

    app.control.purge()
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        client.delete("unacked", "unacked_index", "unacked_mutex")


@pytest.fixture(scope="session")
def worker_var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-var")


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, worker_var_dir, tmp_path_factory) -> Iterator[WorkerProcess]:
    database = connection.settings_dict
    url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    if database.get("PASSWORD"):
        url = f"postgres://{database['USER']}:{database['PASSWORD']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "DATABASE_URL": url,
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": os.environ.get("SECRET_KEY", "worker-tests"),
        "VAR_DIR": str(worker_var_dir),
        "CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        # A killed worker's job is stale by the time the broker delivers it again.
        "JOB_HEARTBEAT_SECONDS": "1",
        "JOB_STALE_SECONDS": str(VISIBILITY_TIMEOUT),
        # Small GC batches: many short transactions, so a test can kill the worker between them.
        "COMPACTION_BATCH_SIZE": "4",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PGAPPNAME": WORKER_APPLICATION_NAME,  # its connections, for tests that cut them
    }
    _purge_queue()
    worker = WorkerProcess(env, tmp_path_factory.mktemp("worker-log") / "worker.log")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def worker(celery_worker: WorkerProcess, transactional_db, settings, worker_var_dir) -> WorkerProcess:
    """The running worker, with this test's rows committed (transactional_db) so it can see them."""
    settings.VAR_DIR = worker_var_dir
    if celery_worker.process is None:
        celery_worker.start()
    return celery_worker


def wait_for(condition: Callable[[], object], *, timeout: float = 60, interval: float = 0.05, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def wait_finished(job: Job, *, timeout: float = 120) -> Job:
    def finished() -> Job | None:
        job.refresh_from_db()
        return job if job.is_finished else None

    wait_for(finished, timeout=timeout, what=f"job {job.pk} ({job.kind}) to finish")
    return job


@pytest.fixture
def eager():
    """Tasks run here, when they are sent (after commit), instead of through the broker: for tests
    of what a task does, in-process (the `worker` tests cover the broker and real workers)."""
    from config.celery import app

    previous, app.conf.task_always_eager = app.conf.task_always_eager, True
    yield
    app.conf.task_always_eager = previous

"""Outages of what the API stands on: Redis gone (the cache is an accelerator only), the database
gone (a clear 503 to retry, not a 500), and a database restart behind the connection pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings as django_settings

from config.cache import FailSoftRedisCache
from config.celery import app as celery_app
from snapshots_app.models import Job, Version
from tests.liveserver import LiveServer, database_url, free_port

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: every connection is refused


def test_with_redis_unreachable_writes_reads_and_job_starts_still_work(
    project, session, writer, settings, django_capture_on_commit_callbacks
):
    settings.CACHES = {"default": {"BACKEND": "config.cache.FailSoftRedisCache", "LOCATION": UNREACHABLE_REDIS,
                                   "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}
    previous, celery_app.conf.task_always_eager = celery_app.conf.task_always_eager, True
    try:
        base = f"/api/v1/sessions/{session.pk}/"
        for n in range(1, 4):  # the throttle counts in the cache: it lets requests through meanwhile
            written = writer.post(f"{base}versions/", {"state": {"n": n}}, format="json", HTTP_IDEMPOTENCY_KEY=f"s{n}")
            assert written.status_code == 201, written.content
        head = writer.get(f"{base}head/")
        assert head.status_code == 200 and head.json()["state"] == {"n": 3}
        with django_capture_on_commit_callbacks(execute=True):  # the job is sent (and run) after commit
            job = writer.post("/api/v1/integrity-scrub/", HTTP_IDEMPOTENCY_KEY="scrub-during-outage")
        assert job.status_code == 202
    finally:
        celery_app.conf.task_always_eager = previous
        FailSoftRedisCache._down_until = 0.0  # the next tests' cache is reachable: ask it at once
    assert list(Version.objects.filter(session=session).values_list("number", flat=True).order_by("number")) == [1, 2, 3]
    assert Job.objects.get(pk=job.json()["id"]).status == "done"


def _get(url: str, **headers: str) -> tuple[int, Any, Any]:
    """Status, headers (case-insensitive) and JSON body of a GET."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.headers, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read() or b"null")


def _server(**env: str) -> LiveServer:
    server = LiveServer(free_port(), {
        **os.environ, "REDIS_URL": django_settings.REDIS_URL, "SECRET_KEY": "resilience-tests-only",
        "CELERY_TASK_ALWAYS_EAGER": "true", "DEBUG": "false", **env,
    })
    server.start()
    return server


@pytest.mark.django_db(transaction=True)
def test_with_the_database_gone_the_api_answers_503_to_retry_and_readyz_names_it():
    gone = database_url().rsplit("/", 1)[0] + "/session_rewind_no_such_database"
    server = _server(DATABASE_URL=gone, DB_POOL_SIZE="2", DB_POOL_TIMEOUT="1")
    try:
        status, headers, body = _get(f"{server}/api/v1/sessions/", Authorization="Bearer sr_0123456789ab_not-a-real-secret")
        assert (status, body["code"], headers.get("Retry-After")) == (503, "database_unavailable", "5")
        # Through the pool (as `make serve` runs): it cannot tell an unreachable database from all its
        # connections busy, and says both.
        assert body["detail"].startswith("No database connection came free in time (the database is unreachable")
        assert "nothing was written" in body["detail"]
        status, _, body = _get(f"{server}/readyz")
        assert status == 503 and body["failed"] == ["database"]
    finally:
        server.stop()


@pytest.mark.django_db(transaction=True)
def test_with_redis_gone_readyz_says_degraded_and_keeps_the_process_in_rotation(project, session):
    """A load balancer takes a web process out of rotation while /readyz answers 503. It did so for
    Redis or the broker down, so a Redis outage took every web process out at once and engines' writes,
    which need only the database, were refused at the balancer. Only the database makes it 503 now."""
    from sessions_app.services import api_key_create

    _, token = api_key_create(project=project, name="probe", scopes="read,write")
    server = _server(DATABASE_URL=database_url(), REDIS_URL=UNREACHABLE_REDIS, CELERY_TASK_ALWAYS_EAGER="false")
    try:
        status, _, body = _get(f"{server}/readyz")
        assert (status, body["status"], body["failed"]) == (200, "degraded", ["redis", "broker"])
        assert body["checks"]["database"] == "postgresql" and "Connection refused" in body["checks"]["redis"]
        request = urllib.request.Request(
            f"{server}/api/v1/sessions/{session.pk}/versions/", data=b'{"state": {"n": 1}}', method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=15) as response:
            assert response.status == 201
    finally:
        server.stop()
    assert Version.objects.filter(session=session).count() == 1


@pytest.mark.django_db(transaction=True)
def test_after_the_database_drops_every_pooled_connection_no_request_fails(project, session):
    from sessions_app.services import api_key_create

    _, token = api_key_create(project=project, name="pool", scopes="read")
    server = _server(DATABASE_URL=database_url(), DB_POOL_SIZE="4", PGAPPNAME="rewind-pool-test")
    try:
        url = f"{server}/api/v1/sessions/{session.pk}/"
        for _ in range(8):
            assert _get(url, Authorization=f"Bearer {token}")[0] == 200
        # What a PostgreSQL restart does to the pool: every connection it holds is cut.
        with psycopg.connect(database_url(), autocommit=True) as admin:
            cut = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE application_name = 'rewind-pool-test'").fetchone()[0]
        assert cut >= 1
        assert [_get(url, Authorization=f"Bearer {token}")[0] for _ in range(8)] == [200] * 8
    finally:
        server.stop()


@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_without_length_is_refused_not_read_as_empty(project, session):
    import http.client

    from sessions_app.services import api_key_create

    _, token = api_key_create(project=project, name="chunked", scopes="read,write")
    server = _server(DATABASE_URL=database_url())
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
        body = iter([b'{"state": ', b'{"n": 1}}'])
        connection.request("POST", f"/api/v1/sessions/{session.pk}/versions/", body=body, encode_chunked=True,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 411 and json.loads(response.read())["code"] == "length_required"
    finally:
        server.stop()
    assert not Version.objects.filter(session=session).exists()


def _with_the_broker_unreachable(script: str) -> subprocess.CompletedProcess:
    """Run `script` in a web process of its own (manage.py shell) whose Redis (broker, cache, channel
    layer) refuses every connection, on the test database."""
    env = {**{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
           "DATABASE_URL": database_url(), "REDIS_URL": UNREACHABLE_REDIS, "SECRET_KEY": "x"}
    result = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=Path(__file__).parents[2],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.django_db  # the test database exists
def test_with_the_broker_unreachable_sending_a_task_fails_at_once_and_says_why():
    """What the web process's background thread meets for each finalize or job start while Redis is
    down. Nothing reads task results (jobs keep theirs in the database), so sending one must not wait
    on the result store: it retried 20 times a second apart per message, logging CRITICAL "The Celery
    application must be restarted" (it need not be) before giving up."""
    script = (
        "import time\n"
        "from snapshots_app import tasks\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    tasks.finalize_versions.delay([0])\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, round(time.monotonic() - started, 1))\n"
    )
    result = _with_the_broker_unreachable(script)
    error, seconds = result.stdout.strip().splitlines()[-1].split()
    assert error == "OperationalError"  # kombu's: the broker refused the connection
    assert float(seconds) < 5
    assert "must be restarted" not in result.stderr


@pytest.mark.django_db(transaction=True)  # the web process below is another process
def test_a_job_started_while_the_broker_is_down_says_so_and_is_sent_once_it_is_back(project, reader, caplog):
    """A job start answers 202 with the broker down (its row is committed). The job used to sit
    "queued" with nothing saying why, and was sent again only 10 minutes after it was asked for; it
    now says when its message could not be sent, and beat's next requeue run sends it."""
    script = (
        "from sessions_app import background\n"
        "from sessions_app.models import Project\n"
        "from snapshots_app.integrity import integrity_scrub_start\n"
        f"job = integrity_scrub_start(project=Project.objects.get(pk={project.pk}))\n"
        "background.drain(30)\n"  # the message is sent after commit, from the background thread
        "print(job.pk)\n"
    )
    result = _with_the_broker_unreachable(script)
    job_id = int(result.stdout.strip().splitlines()[-1])

    shown = reader.get(f"/api/v1/jobs/{job_id}/").json()
    assert shown["status"] == "queued" and shown["send_failed_at"] is not None
    # One line in the log, as a failed finalize send: Celery's chained retries logged ~115 per job started.
    assert f"could not enqueue job {job_id} (" in result.stderr and "Traceback" not in result.stderr

    from snapshots_app import tasks

    previous, celery_app.conf.task_always_eager = celery_app.conf.task_always_eager, True
    try:
        assert tasks.jobs_requeue_stale() == 1  # its first run once the broker is back: no 10-minute wait
    finally:
        celery_app.conf.task_always_eager = previous
    assert f"job {job_id} (scrub) sent again: the broker refused its message" in caplog.text  # the log says why
    shown = reader.get(f"/api/v1/jobs/{job_id}/").json()
    assert shown["status"] == "done" and shown["send_failed_at"] is None


@pytest.mark.django_db(transaction=True)  # the web process below is another process
def test_with_redis_down_each_failed_announcement_is_counted_not_logged_with_a_traceback(project, session):
    """Every write's live update and finalize message fail while Redis is down. Each failure logged a
    warning with its traceback: 20 sessions written by engines made 64,000 log lines in 10 s. The
    first failure of each kind is logged with its reason, the rest are counted (at most one report a
    minute), and the writes are all there."""
    script = (
        "from django.conf import settings\n"
        "from sessions_app import background\n"
        "from sessions_app.models import WorkflowSession\n"
        "from snapshots_app.services import snapshot_record\n"
        "settings.SESSION_NOTIFY_INTERVAL_MS = 0\n"  # every write announced on its own: one failure each
        f"session = WorkflowSession.objects.get(pk='{session.pk}')\n"
        "for n in range(30):\n"
        "    snapshot_record(session=session, state={'n': n})\n"
        "assert background.drain(60)\n"
    )
    log = _with_the_broker_unreachable(script).stderr
    assert log.count("live updates (channel layer) failed") == 1
    assert "live update version.created for project" in log  # what the first one was
    assert log.count("finalize messages (Celery broker) failed") == 1
    assert "finalize_pending catches up" in log
    assert "Traceback" not in log
    assert Version.objects.filter(session=session).count() == 30


def test_an_outage_log_reports_what_it_counted_and_when_it_is_over(caplog):
    import logging

    from sessions_app.background import OutageLog

    outage = OutageLog(logging.getLogger("tests.outage"), "live updates", every=0.2)
    outage.succeeded()  # no outage: nothing to say
    for n in range(5):
        outage.failed(ConnectionError("Error 111 connecting to 127.0.0.1:6390"), f"event {n} not delivered")
    time.sleep(0.25)
    outage.failed(ConnectionError("Error 111 connecting to 127.0.0.1:6390"), "event 5 not delivered")
    outage.succeeded()
    outage.succeeded()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings[0] == "live updates failed: ConnectionError: Error 111 connecting to 127.0.0.1:6390; event 0 not delivered"
    assert warnings[1].startswith("live updates failed (6 times over 0 s): ConnectionError: ")
    assert warnings[1].endswith("; event 5 not delivered")
    assert warnings[2].startswith("live updates: working again, after 6 failures over ")
    assert len(warnings) == 3


def test_a_hung_redis_costs_the_requests_using_it_then_none_while_a_probe_waits_for_it(caplog):
    """Every request in flight as each 5 s back-off ended asked the hung Redis again and waited out its
    socket timeout (10 at a time, every 7 s, under 10 engines): one background probe asks now."""
    import socket
    import threading

    from config.cache import RETRY_AFTER

    hung = socket.socket()  # accepts connections (the kernel does), never answers: a stopped Redis
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    port = hung.getsockname()[1]
    options = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
    cache = FailSoftRedisCache(f"redis://127.0.0.1:{port}/0", {"OPTIONS": options})
    FailSoftRedisCache._down_until = 0.0
    try:
        started = time.monotonic()
        assert cache.get("k", "missed") == "missed"  # the request using it when it hung: its timeout
        assert time.monotonic() - started >= 0.4
        assert FailSoftRedisCache._down_until > 0

        # The back-off is over: requests still do without it at once, while one probe asks beside them.
        FailSoftRedisCache._down_until = time.monotonic() - 1
        waits: list[float] = []

        def request() -> None:
            began = time.monotonic()
            cache.get("k")
            waits.append(time.monotonic() - began)

        threads = [threading.Thread(target=request) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(waits) == 10 and max(waits) < 0.2, waits
        deadline = time.monotonic() + 5
        while FailSoftRedisCache._probing.locked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert FailSoftRedisCache._down_until > time.monotonic() + RETRY_AFTER - 1  # the probe found it hung still

        # Redis answers again: the next probe says so, and requests use the cache from then on.
        answering = FailSoftRedisCache(django_settings.CACHES["default"]["LOCATION"], {})
        FailSoftRedisCache._down_until = time.monotonic() - 1
        with caplog.at_level("INFO", logger="config.cache"):
            assert answering.get("k", "missed") == "missed"  # (this request does not wait for the probe)
            while FailSoftRedisCache._down_until and time.monotonic() < deadline + 5:
                time.sleep(0.05)
        assert FailSoftRedisCache._down_until == 0.0 and "cache available again" in caplog.text
        answering.set("k", "kept")
        assert answering.get("k") == "kept"
        answering.delete("k")
    finally:
        hung.close()
        FailSoftRedisCache._down_until = 0.0


class _PausableProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding while keeping every connection open: what a
    stopped server, or a proxy or network path that stopped passing packets, looks like."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self.target = (host, port)
        self.paused = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[Any] = []
        self.upstream_ports: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            self.upstream_ports.append(upstream.getsockname()[1])
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: Any, sink: Any) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            while self.paused.is_set():
                time.sleep(0.05)
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        """Closes every connection, and ends the server processes that served them (at once: the test
        database is dropped while they would still be noticing)."""
        from django.db import connection

        self.listener.close()
        for sock in self.sockets:
            sock.close()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE client_port = ANY(%s)",
                           [self.upstream_ports])


@pytest.mark.django_db(transaction=True)
def test_with_the_database_hung_readyz_says_so_within_seconds_and_again_once_it_answers():
    """A hung PostgreSQL (connections accepted, nothing answered) kept /readyz waiting for as long as
    the hang lasted: a load balancer's own timeout then said nothing of why."""
    from django.db import connection

    db = connection.settings_dict
    proxy = _PausableProxy(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))
    url = database_url().replace(f":{db['PORT'] or 5432}/", f":{proxy.port}/")
    server = _server(DATABASE_URL=url, DB_POOL_SIZE="2")
    try:
        assert _get(f"{server}/readyz")[0] == 200
        proxy.paused.set()
        started = time.monotonic()
        status, _, body = _get(f"{server}/readyz")
        assert status == 503 and body["failed"] == ["database"], body
        assert "did not answer within 3 s" in body["checks"]["database"]
        assert time.monotonic() - started < 10
        proxy.paused.clear()
        deadline = time.monotonic() + 30
        while _get(f"{server}/readyz")[0] != 200:  # its connections answer again (or new ones are made)
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        proxy.paused.clear()
        server.stop()
        proxy.close()

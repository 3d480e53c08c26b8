"""The service runs on the real stack: PostgreSQL, the Redis channel layer, health probes, settings."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def _url() -> str:
    """The test database's URL, for a child process."""
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.django_db
def test_database_is_postgresql_when_database_url_says_so():
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        pytest.skip("embedded run: DATABASE_URL is not set")
    assert url.startswith("postgres")
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        assert "PostgreSQL" in cursor.fetchone()[0]


@pytest.mark.django_db
def test_database_connections_probe_a_host_that_vanished():
    """The socket itself carries TCP keepalives and a user timeout, so a request waiting on a database
    host that is gone fails in about a minute instead of the kernel's ~15 (README: DB_TCP_KEEPALIVE)."""
    import socket

    if connection.vendor != "postgresql":
        pytest.skip("embedded run: SQLite has no socket")
    connection.ensure_connection()
    probe = socket.socket(fileno=os.dup(connection.connection.fileno()))
    try:
        if probe.family == socket.AF_UNIX:
            pytest.skip("a Unix socket has no TCP keepalives")
        assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
    finally:
        probe.close()  # (its own descriptor, a dup: the connection stays open)


def test_keepalive_settings_named_in_database_url_win():
    url = "postgres://postgres@127.0.0.1:5432/x?keepalives_idle=120&tcp_user_timeout=0"
    result = manage("shell", "-c", "from django.conf import settings; o = settings.DATABASES['default']['OPTIONS'];"
                    "print(o['keepalives_idle'], o['tcp_user_timeout'], o['keepalives_count'])",
                    env={"DATABASE_URL": url, "SECRET_KEY": "x"})
    assert result.stdout.strip().splitlines()[-1].split() == ["120", "0", "3"], result.stderr


def test_message_sent_through_redis_channel_layer_arrives(settings):
    if not os.environ.get("REDIS_URL"):
        pytest.skip("embedded run: REDIS_URL is not set")
    layer = get_channel_layer()
    assert type(layer).__module__.startswith("channels_redis")

    async def roundtrip():
        channel = await layer.new_channel()
        await layer.group_add("foundation-test", channel)
        await layer.group_send("foundation-test", {"type": "hello", "text": "over redis"})
        message = await layer.receive(channel)
        await layer.group_discard("foundation-test", channel)
        return message

    assert async_to_sync(roundtrip)() == {"type": "hello", "text": "over redis"}


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_the_favicon_every_browser_asks_for_is_no_content_not_a_logged_404(client, caplog):
    response = client.get("/favicon.ico")
    assert response.status_code == 204 and not response.content
    assert not [record for record in caplog.records if "Not Found" in record.getMessage()]


@pytest.mark.django_db
def test_readyz_is_200_when_database_redis_and_broker_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["failed"] == []
    assert set(body["checks"]) == {"database", "redis", "broker"}


@pytest.mark.django_db
def test_readyz_names_the_failed_dependency(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = client.get("/readyz")
    assert response.status_code == 200  # degraded, still serving: see test_resilience
    assert response.json()["status"] == "degraded"
    assert "redis" in response.json()["failed"]
    assert "database" not in response.json()["failed"]


@pytest.fixture
def full_redis():
    """A Redis of the test's own (on a free port), past its maxmemory: started per policy."""
    import shutil
    import socket
    import time

    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here")
    started = []

    def start(policy: str) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        started.append(subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--maxmemory-policy", policy], stdout=subprocess.DEVNULL))
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.mset({f"filler:{n}": b"x" * 4096 for n in range(2000)})
        # Well past its limit, so that no check's write slips in while a failed one frees its buffers.
        client.config_set("maxmemory", client.info("memory")["used_memory"] // 2)
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


@pytest.mark.django_db
def test_readyz_names_a_redis_that_is_full_or_a_broker_that_would_evict_job_messages(client, settings, full_redis):
    """A Redis at its maxmemory answers PING and refuses every write: /readyz said "ok" while no job
    could be queued. A broker whose Redis evicts when full drops queued jobs without a word."""
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.REDIS_URL = settings.CELERY_BROKER_URL = full_redis("noeviction")
    body = client.get("/readyz").json()
    assert body["status"] == "degraded" and body["failed"] == ["redis", "broker"], body
    assert "OutOfMemoryError" in body["checks"]["broker"], body
    settings.REDIS_URL = settings.CELERY_BROKER_URL = full_redis("allkeys-lru")
    body = client.get("/readyz").json()
    assert body["failed"] == ["broker"] and "maxmemory-policy is allkeys-lru" in body["checks"]["broker"], body


def test_login_page_renders(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    assert b"Log in" in response.content


def test_dashboard_requires_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_malformed_database_url_fails_with_one_clear_line():
    result = manage("check", env={"DATABASE_URL": "mysql//nope", "SECRET_KEY": "x"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DATABASE_URL" in lines[0]


def test_unreachable_database_fails_with_one_clear_line():
    result = manage("migrate", env={"DATABASE_URL": "postgres://postgres@127.0.0.1:1/nowhere", "SECRET_KEY": "x"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("session-rewind: database unreachable") and "127.0.0.1:1" in lines[0]


def test_ensure_database_creates_the_database_the_url_names_once(request):
    """`make serve`, `make worker` and `make beat` run it first: on a fresh machine PostgreSQL has no
    `session_rewind` database, and `make serve` stopped at "database ... does not exist"."""
    url = _url()
    name = f"ensure_{uuid.uuid4().hex[:12]}"
    fresh = url.rsplit("/", 1)[0] + "/" + name
    request.addfinalizer(lambda: _drop(name))
    first = manage("ensure_database", env={"DATABASE_URL": fresh, "SECRET_KEY": "x"})
    assert first.returncode == 0 and first.stdout.strip() == f"created database {name!r}", first.stderr
    assert manage("ensure_database", env={"DATABASE_URL": fresh, "SECRET_KEY": "x"}).stdout == ""  # there already
    assert manage("check", "--database", "default", env={"DATABASE_URL": fresh, "SECRET_KEY": "x"}).returncode == 0
    unreachable = manage("ensure_database", env={"DATABASE_URL": "postgres://postgres@127.0.0.1:1/nowhere", "SECRET_KEY": "x"})
    assert unreachable.returncode == 1 and unreachable.stderr.startswith("CommandError: could not create database 'nowhere'")
    assert len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr


def _drop(name: str) -> None:
    import psycopg

    with psycopg.connect(_url().rsplit("/", 1)[0] + "/postgres", autocommit=True) as maintenance:
        maintenance.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_bad_boolean_setting_fails_with_one_clear_line():
    result = manage("check", env={"DEBUG": "maybe"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["session-rewind: configuration error: DEBUG='maybe' is not a boolean (use 1/0, true/false, yes/no, on/off)"]


def test_a_depth_limit_the_encoder_cannot_honour_fails_with_one_clear_line():
    result = manage("check", env={"STATE_MAX_DEPTH": "300"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "session-rewind: configuration error: STATE_MAX_DEPTH='300' must be at most 254"
    ]


def test_beat_keeps_its_schedule_file_in_var():
    """`make beat` and `make serve` keep beat's schedule in the ignored var/, not as untracked files beside manage.py."""
    dry_run = subprocess.run(["make", "-n", "beat"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    beat = [line for line in dry_run.stdout.splitlines() if "celery -A config beat" in line]
    assert beat and "--schedule=var/celerybeat-schedule" in beat[-1], dry_run.stdout + dry_run.stderr
    procfile = (ROOT / "config" / "Procfile").read_text()
    assert "--schedule=var/celerybeat-schedule" in procfile


def test_production_settings_pass_check_deploy():
    result = manage(
        "check", "--deploy", "--fail-level", "WARNING",
        env={
            "DATABASE_URL": os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/session_rewind"),
            "SECRET_KEY": "a-long-random-production-secret-" + "k" * 40,
            "DEBUG": "0", "HTTPS": "1", "ALLOWED_HOSTS": "rewind.example.com",
        },
    )
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.django_db
def test_pages_send_a_content_security_policy_without_inline_script(client, settings):
    """Markup that got into a page past escaping could not run: scripts come from our own URLs only,
    the page cannot be framed, and the live pages may open their WebSocket to their own host."""
    settings.ALLOWED_HOSTS = ["rewind.example.com", "testserver"]
    policy = client.get("/accounts/login/", HTTP_HOST="rewind.example.com")["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["script-src"] == "'self'" and directives["default-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    assert directives["connect-src"] == "'self' ws://rewind.example.com wss://rewind.example.com"
    settings.CONTENT_SECURITY_POLICY = ""
    assert "Content-Security-Policy" not in client.get("/accounts/login/")


def test_pool_and_persistent_connections_cannot_both_be_set():
    result = manage("check", env={"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/x", "SECRET_KEY": "x",
                                  "DB_POOL_SIZE": "4", "DB_CONN_MAX_AGE": "60"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "session-rewind: configuration error: DB_POOL_SIZE and DB_CONN_MAX_AGE cannot both be set: the pool keeps connections"
    ]


@pytest.mark.django_db  # the test database exists
@pytest.mark.parametrize(("pool_size", "backends"), [("4", {"1", "2"}), ("", {"5"})])
def test_with_a_pool_a_connection_closed_after_a_request_serves_the_next(pool_size, backends):
    """What each request does under ASGI: open, query, close. With DB_POOL_SIZE the connection (and
    the statements it prepared) goes back to the pool instead of away."""
    script = (
        "from django.db import connection\n"
        "pids = []\n"
        "for _ in range(5):\n"
        "    with connection.cursor() as cursor:\n"
        "        cursor.execute('SELECT pg_backend_pid()')\n"
        "        pids.append(cursor.fetchone()[0])\n"
        "    connection.close()\n"
        "print(len(set(pids)))\n"
    )
    env = {"DATABASE_URL": _url(), "SECRET_KEY": "x", "DB_POOL_SIZE": pool_size}
    result = manage("shell", "-c", script, env=env)
    assert result.returncode == 0, result.stderr
    # Five requests: one or two pooled connections (the pool may still be opening its first), or five.
    assert result.stdout.strip().splitlines()[-1] in backends


@pytest.mark.django_db  # the test database exists
def test_a_pool_whose_connections_were_all_cut_serves_the_next_request_at_once():
    """What a PostgreSQL restart (or pg_terminate_backend) does to a busy web process's pool: every
    connection in it is dead. The next request must get a fresh one, not wait DB_POOL_TIMEOUT while
    psycopg_pool backs off between the dead ones (1, 2, 4 s) and then fail with 503."""
    script = (
        "import threading, time, psycopg\n"
        "from django.db import connection\n"
        "def use():\n"
        "    with connection.cursor() as cursor:\n"
        "        cursor.execute('SELECT pg_sleep(0.3)')\n"
        "    connection.close()\n"
        "threads = [threading.Thread(target=use) for _ in range(6)]\n"  # six at once: the pool grows to six
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        f"with psycopg.connect({_url()!r}, autocommit=True) as admin:\n"
        "    cut = admin.execute(\"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \"\n"
        "                        \"WHERE application_name = 'rewind-cut-pool' AND pid <> pg_backend_pid()\").fetchone()[0]\n"
        "time.sleep(0.2)\n"
        "started = time.monotonic()\n"
        "with connection.cursor() as cursor:\n"
        "    cursor.execute('SELECT 1')\n"
        "print(cut, round(time.monotonic() - started, 2))\n"
    )
    env = {"DATABASE_URL": _url(), "SECRET_KEY": "x", "DB_POOL_SIZE": "6", "DB_POOL_TIMEOUT": "5",
           "PGAPPNAME": "rewind-cut-pool"}
    result = manage("shell", "-c", script, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    cut, seconds = result.stdout.strip().splitlines()[-1].split()
    assert int(cut) >= 4  # the pool had grown (min_size is 1), and all of it was cut
    assert float(seconds) < 1.0


def test_a_scheduled_send_beat_could_not_make_is_one_line_not_a_stack_and_a_traceback(caplog):
    """With Redis down, beat logged ~100 lines for each scheduled send (its call stack, then the
    chained traceback), every minute: the one line that says what is wrong was lost in them."""
    import logging

    from celery import Celery
    from celery.beat import ScheduleEntry, Scheduler

    app = Celery("beat-probe")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens there: the broker is down
    scheduler = Scheduler(app, lazy=True)
    entry = ScheduleEntry(name="requeue-stale-jobs", task="snapshots_app.tasks.jobs_requeue_stale", app=app)
    with caplog.at_level(logging.ERROR, logger="celery.beat"):
        scheduler.apply_entry(entry)
    record = next(record for record in caplog.records if record.name == "celery.beat")
    assert record.getMessage().startswith("Message Error: Couldn't apply scheduled task requeue-stale-jobs: ")
    assert "Connection refused" in record.getMessage() and "\n" not in record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text and 'File "' not in caplog.text

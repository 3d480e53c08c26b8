"""Session Rewind settings: one module, driven by environment variables.

With nothing set it runs on the embedded default (SQLite file, in-memory channel layer, local-memory
cache, Celery tasks executed eagerly in-process). DATABASE_URL switches to PostgreSQL; REDIS_URL
switches the channel layer, the cache and the Celery broker to Redis.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at most {maximum}")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")
EMBEDDED = not DATABASE_URL

DEBUG = env_bool("DEBUG", default=False)
# HTTPS=1 in production behind TLS: secure cookies, HSTS, redirect. Off for `make run` on plain http.
HTTPS = env_bool("HTTPS", default=False)


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if not EMBEDDED and not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DATABASE_URL is set and DEBUG is off")
    # Embedded default: a random key generated once and kept beside the SQLite file.
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_htmx",
    "sessions_app",
    "snapshots_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.ContentSecurityPolicyMiddleware",
    "config.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "config.middleware.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "config.middleware.SignInAgainMiddleware",
    "config.middleware.MethodNotAllowedPageMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "config.middleware.DatabaseUnavailableMiddleware",  # last: the first to see what a view raised
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict:
    if EMBEDDED:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "db.sqlite3",
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"},
        }
    scheme = urlsplit(DATABASE_URL).scheme
    if scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a postgres:// URL (got scheme {scheme or 'none'!r}); "
            "unset it to use the embedded SQLite default"
        )
    try:
        config = dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 0))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is malformed: {exc}") from None
    if not config.get("NAME"):
        raise ImproperlyConfigured("DATABASE_URL names no database (expected postgres://user@host:port/dbname)")
    config.setdefault("OPTIONS", {})["connect_timeout"] = env_int("DB_CONNECT_TIMEOUT", 5, minimum=1)
    # A database host that vanishes (failover, a dropped network path) sends no reset: a request waiting
    # on its answer waited for the kernel's retransmissions, about 15 minutes, holding its worker. TCP
    # keepalives (probed after DB_TCP_KEEPALIVE s idle, every 10 s, 3 times) and tcp_user_timeout (data
    # unacknowledged as long) end such a connection in about DB_TCP_KEEPALIVE + 30 s, with an error.
    # A slow query on a live server is unaffected: its kernel answers the probes. (TCP only; a Unix
    # socket ignores them.)
    keepalive = env_int("DB_TCP_KEEPALIVE", 30, minimum=1)
    for name, value in {"keepalives": 1, "keepalives_idle": keepalive, "keepalives_interval": 10, "keepalives_count": 3,
                        "tcp_user_timeout": (keepalive + 30) * 1000}.items():
        config["OPTIONS"].setdefault(name, value)  # (DATABASE_URL's own ?keepalives_idle= wins)
    # JIT compiles a plan once its estimated cost is high, and a recursive walk of a state tree is
    # estimated at 100,000 rows: measured 115 ms of compilation for a 0.3 ms query. Our statements
    # are all short; none gains from it.
    config["OPTIONS"].setdefault("options", "-c jit=off")
    # Parameters bound by the server, so psycopg prepares a statement once it has run it a few times
    # and PostgreSQL stops re-planning the hot ones: planning was ~0.1-0.5 ms of every version lookup,
    # session lock and node probe. Set DB_SERVER_SIDE_BINDING=0 behind a transaction-pooling bouncer.
    if config["OPTIONS"].setdefault("server_side_binding", env_bool("DB_SERVER_SIDE_BINDING", True)):
        config["OPTIONS"].setdefault("prepare_threshold", 5)  # Django's default (None) never prepares
    pool_size = env_int("DB_POOL_SIZE", 0, minimum=0)
    if pool_size:
        # psycopg's pool (Django >= 5.1): under ASGI every request runs on a thread of its own, so
        # only a pool keeps connections, and the statements they prepared, from one request to the next.
        if config.get("CONN_MAX_AGE"):
            raise ImproperlyConfigured("DB_POOL_SIZE and DB_CONN_MAX_AGE cannot both be set: the pool keeps connections")
        config["OPTIONS"]["pool"] = {"min_size": 1, "max_size": pool_size, "timeout": env_int("DB_POOL_TIMEOUT", 5, minimum=1)}
        # Django's backend but for the pool's check of a connection leaving it: after a PostgreSQL
        # restart every pooled connection is dead, and Django's check met them one at a time, waiting
        # 1, 2, 4 s between them, so the first request after the restart failed (config.postgresql).
        config["ENGINE"] = "config.postgresql"
    # Without a pool, a reused connection (DB_CONN_MAX_AGE) is checked before its first query.
    config["CONN_HEALTH_CHECKS"] = True
    return dict(config)


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Live-update events a socket's channel may hold while its consumer is busy (rendering, or a slow
# browser): beyond it the layer drops the oldest. Events are small (ids and numbers; the consumer
# renders the HTML), and channels' own default of 100 was reached by one busy session's bursts.
CHANNELS_CAPACITY = env_int("CHANNELS_CAPACITY", 1000, minimum=10)

if REDIS_URL:
    if urlsplit(REDIS_URL).scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured("REDIS_URL must be a redis:// URL")
    CACHES = {
        "default": {
            "BACKEND": "config.cache.FailSoftRedisCache",  # an outage is a miss, not an error
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env_str("CACHE_KEY_PREFIX", "rewind"),
            "TIMEOUT": 3600,
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": env_str("CHANNELS_PREFIX", "rewind"),
                       "capacity": CHANNELS_CAPACITY},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "TIMEOUT": 3600}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": CHANNELS_CAPACITY}}}

# Celery: a Redis broker when configured, otherwise tasks run eagerly inside the web process.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL) or "memory://localhost/"
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", REDIS_URL) or None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", default=not (REDIS_URL or env_str("CELERY_BROKER_URL")))
CELERY_TASK_EAGER_PROPAGATES = True
# Nothing reads task results (a job keeps its outcome in its row). Kept, each message sent made the
# sender subscribe to its result in Redis, and with Redis down that retried 20 times a second apart
# per message, then logged CRITICAL "The Celery application must be restarted", which it need not be.
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
# The per-write change summaries (finalize_versions, one message per 100 new versions) have a queue of
# their own: on the one queue, a job (an export, a compaction) waited behind a write burst's backlog
# (110 s after 24,000 versions, "waiting for a worker" with every worker busy). A worker started
# without -Q takes from both, in turn.
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_TASK_QUEUES = (Queue("celery"), Queue("finalize"))
CELERY_TASK_ROUTES = {"snapshots_app.tasks.finalize_versions": {"queue": "finalize"}}
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker whose broker is down keeps trying to reconnect for as long as it takes (Celery's default,
# 100 tries, ends after ~45 minutes of a Redis outage: the worker exits, and under `make serve` the
# rest of the stack with it).
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# A task whose worker died unacknowledged is delivered again after this many seconds (on the next
# worker start or restore sweep); it must exceed the longest task. Tests lower it to see redelivery.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=1),
    # A broker that is down or hung must not hold a request (a job start) for long: the job row is
    # committed and stays queued, and jobs_requeue_stale sends it again.
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
}
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
CELERY_TIMEZONE = "UTC"
# Background work (snapshots_app.tasks); README "Workers" says what runs when.
JOB_REQUEUE_EVERY = 60.0  # seconds between jobs_requeue_stale runs (a job's condition counts on it)
CELERY_BEAT_SCHEDULE = {
    "finalize-missed-versions": {"task": "snapshots_app.tasks.finalize_pending", "schedule": 300.0},
    # Cheap (a partial index holds the unfinished jobs); often, so a dead worker's job resumes within ~2.5 min.
    "requeue-stale-jobs": {"task": "snapshots_app.tasks.jobs_requeue_stale", "schedule": JOB_REQUEUE_EVERY},
    "integrity-scrub": {
        "task": "snapshots_app.tasks.integrity_scrub_scheduled",
        "schedule": float(env_int("INTEGRITY_SCRUB_EVERY", 3600, minimum=60)),
    },
    "transfer-files": {"task": "snapshots_app.tasks.transfer_files_sweep", "schedule": 3600.0},
    "jobs-sweep": {"task": "snapshots_app.tasks.jobs_sweep", "schedule": 24 * 3600.0},
    "compaction": {
        "task": "snapshots_app.tasks.compaction_scheduled",
        "schedule": float(env_int("COMPACTION_EVERY", 24 * 3600, minimum=60)),
    },
}
# Versions one scheduled scrub run verifies per project (a rolling window; 0 = all of them).
INTEGRITY_SCRUB_BUDGET = env_int("INTEGRITY_SCRUB_BUDGET", 5000)
# Nodes garbage collection deletes per transaction (each holds the project's write lock briefly).
COMPACTION_BATCH_SIZE = env_int("COMPACTION_BATCH_SIZE", 2000, minimum=1)
# A running job stamps its heartbeat this often; one silent for JOB_STALE_SECONDS is taken for dead
# (its worker was killed or lost the database) and sent again (snapshots_app.jobs).
JOB_HEARTBEAT_SECONDS = env_int("JOB_HEARTBEAT_SECONDS", 15, minimum=1)
JOB_STALE_SECONDS = env_int("JOB_STALE_SECONDS", 90, minimum=2)
# Finished jobs (and their results) are deleted this many days after they finished (0 = kept for good).
JOB_KEEP_DAYS = env_int("JOB_KEEP_DAYS", 90, minimum=0)
if JOB_STALE_SECONDS <= JOB_HEARTBEAT_SECONDS:
    raise ImproperlyConfigured("JOB_STALE_SECONDS must be longer than JOB_HEARTBEAT_SECONDS")
# Compaction re-encodes nodes with a zstd dictionary trained per project (about a third smaller).
COMPACTION_RECOMPRESS = env_bool("COMPACTION_RECOMPRESS", default=True)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "sessions:list"
# The sign-in page says "You are signed out." (it said nothing, as if the click had not worked; the
# messages framework cannot say it: its storage, the session, is flushed by the sign-out).
LOGOUT_REDIRECT_URL = "/accounts/login/?signed_out=1"
CSRF_FAILURE_VIEW = "sessions_app.views.csrf_failure"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
FORMAT_MODULE_PATH = ["config.formats"]  # dates and times to the second, with the zone (see there)
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
STATICFILES_DIRS: list = [BASE_DIR / "static"]
# htmx and its WebSocket extension come from npm (package.json); collectstatic copies them in.
for prefix, folder in (
    ("vendor/htmx", BASE_DIR / "node_modules" / "htmx.org" / "dist"),
    ("vendor/htmx-ext-ws", BASE_DIR / "node_modules" / "htmx-ext-ws" / "dist"),
):
    if folder.is_dir():
        STATICFILES_DIRS.append((prefix, folder))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
WHITENOISE_MANIFEST_STRICT = False

if HTTPS:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Scripts only from our own static files (the pages have no inline script, nor inline event handlers:
# markup that got into a page through some escaping mistake could not run). Inline styles stay allowed
# (the admin's and a few templates' style attributes). `{host}` is the request's host: the live pages'
# WebSocket (ws:/wss: are not 'self' to browsers before CSP 3). Set to empty to send no policy.
CONTENT_SECURITY_POLICY = os.environ.get(
    "CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self' ws://{host} wss://{host}; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'",
).strip()
SESSION_COOKIE_HTTPONLY = True
# Messages live in the server-side session, not in a cookie: the admin's "copy this key now" message
# carries a new API key's secret, which the default (cookie first) storage sent to the browser and
# back in a signed but readable cookie.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

# After a write, one process announces a session's new versions (live timeline, finalize task,
# head cache) at most once per this many milliseconds: the first at once, the rest together when the
# interval is over. 0 = after every write.
SESSION_NOTIFY_INTERVAL_MS = env_int("SESSION_NOTIFY_INTERVAL_MS", 500)
# An open session list gathers the changes of its project for this many milliseconds and shows them
# together (one membership check, one query, one message), so a tab costs what the interval allows,
# not what the number of events would: the first change after a quiet interval goes out at once.
# 0 = each change as soon as the one before it was shown.
LIVE_LIST_BATCH_MS = env_int("LIVE_LIST_BATCH_MS", 500)

# The state store's input limits (bad input gets a clear 4xx; see snapshots_app.canonical).
STATE_MAX_BYTES = env_int("STATE_MAX_BYTES", 16 * 1024 * 1024, minimum=1024)
# At most 254 containers deep: orjson, which encodes every state, refuses deeper nesting.
STATE_MAX_DEPTH = env_int("STATE_MAX_DEPTH", 200, minimum=2, maximum=254)
# A session's metadata (engine-set labels, links, settings: not state) as JSON. Every session list
# carries it, so a few oversized ones would make every page of the list heavy.
SESSION_METADATA_MAX_BYTES = env_int("SESSION_METADATA_MAX_BYTES", 64 * 1024, minimum=1024)
# Request bodies may carry a state plus metadata; a little headroom over the state limit.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("REQUEST_MAX_BYTES", STATE_MAX_BYTES + 1024 * 1024, minimum=1024)
# An uploaded export file (POST /api/v1/imports/) may be far larger than any one state: it is spooled
# to disk as it arrives, never held whole in memory.
IMPORT_MAX_BYTES = env_int("IMPORT_MAX_BYTES", 4 * 1024**3, minimum=1024)
# Export files (each can hold a whole project's states) are deleted this many days after they were
# written, by the hourly transfer_files_sweep; so are uploads no import job is waiting for.
EXPORT_KEEP_DAYS = env_int("EXPORT_KEEP_DAYS", 7, minimum=1)

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {LOG_LEVEL!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "filters": {"refusals_without_traceback": {"()": "config.logs.RefusalsWithoutTraceback"},
                "beat_sends_without_traceback": {"()": "config.logs.BeatSendsWithoutTraceback"}},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "celery.app.trace": {"level": "WARNING"},
        "django.request": {"filters": ["refusals_without_traceback"]},
        "celery.beat": {"filters": ["beat_sends_without_traceback"]},
    },
}

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "sessions_app.api.schema.ProblemAutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "sessions_app.api.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["sessions_app.api.auth.IsAuthenticatedPrincipal", "sessions_app.api.auth.HoldsLeastRole"],
    "DEFAULT_THROTTLE_CLASSES": ["sessions_app.api.auth.PrincipalRateThrottle"],
    "DEFAULT_PARSER_CLASSES": ["sessions_app.api.http.OrjsonParser"],
    "DEFAULT_RENDERER_CLASSES": ["sessions_app.api.http.OrjsonRenderer"],
    "DEFAULT_PAGINATION_CLASS": "sessions_app.api.pagination.CursorPage",
    "EXCEPTION_HANDLER": "sessions_app.api.problems.exception_handler",
    "DEFAULT_METADATA_CLASS": "sessions_app.api.http.NameOnlyMetadata",
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "sessions_app.api.http.ContentNegotiation",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
# Requests per API key (or user) per period; empty = unlimited. Beyond it: 429 with Retry-After.
# Per second: an engine checkpointing in a tight loop sends ~30 requests a second for as long as it
# runs (1,200/min throttled it after 40 s, then stalled it 20 s); a per-second window keeps the
# throttle's history (read and written on every request) at 100 entries, and a Retry-After at 1 s.
API_RATE_LIMIT = env_str("API_RATE_LIMIT", "100/s")
# DRF reads only a period's first letter ("10/month" would be per minute): accept only what it means.
if API_RATE_LIMIT and not re.fullmatch(r"[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)", API_RATE_LIMIT):
    raise ImproperlyConfigured(
        f"API_RATE_LIMIT must be <requests>/<second|minute|hour|day> (e.g. 1200/min) or empty, not {API_RATE_LIMIT!r}"
    )
# Lifetime of a new API key when its creator names no expiry (days; 0 = it never expires). A key
# given an expiry, or explicitly none, keeps that; changing this never touches existing keys.
API_KEY_DEFAULT_LIFETIME_DAYS = env_int("API_KEY_DEFAULT_LIFETIME_DAYS", 0, maximum=36500)
# Sign-in (dashboard and admin): after this many failed attempts for one username from one address
# within LOGIN_LOCKOUT_SECONDS, that pair is refused until the window passes (an address gets five
# times as many, over all usernames). 0 = no limit. Counted in the cache: with Redis down, no limit.
LOGIN_FAILURES_MAX = env_int("LOGIN_FAILURES_MAX", 10)
LOGIN_LOCKOUT_SECONDS = env_int("LOGIN_LOCKOUT_SECONDS", 15 * 60, minimum=1)
SPECTACULAR_SETTINGS = {
    "TITLE": "Session Rewind API",
    "DESCRIPTION": "Versioned state store for workflow and agent sessions.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "SessionStatusEnum": "sessions_app.models.SessionStatus",
        "VersionKindEnum": "snapshots_app.models.VersionKind",
        "ChangeKindEnum": ["added", "removed", "changed"],
        "ApiKeyStatusEnum": "sessions_app.models.ApiKey.Status",
        "ApiKeyCreatorStatusEnum": "sessions_app.selectors.CreatorStatus",
    },
}

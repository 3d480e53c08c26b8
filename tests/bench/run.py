"""State-store benchmark: the store vs a full-copy JSONB baseline, on PostgreSQL, in one run.

    DATABASE_URL=postgres://… REDIS_URL=redis://… python -m tests.bench.run [--quick]

It never touches the database DATABASE_URL names: it uses a sibling database whose name ends in
`_bench` (created and migrated if missing) and empties its tables before each profile, so sizes
are this run's rows only. Cache keys get their own prefix and Celery tasks go to an in-memory
broker, so nothing reaches shared Redis queues or real workers.

Per profile it writes the same seeded traces (tests.bench.workload) into the store (through
snapshot_record) and into a plain table with one JSONB row per version (how django-reversion and
django-simple-history keep history), then times random reads and random diffs on both, checks
that both sides agree, and reports storage against the information floor: zstd of the first
snapshot plus zstd of each successive JSON Patch (level FLOOR_ZSTD_LEVEL).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import zstandard

from tests.bench.workload import PROFILES, QUICK, Profile, Trace

FLOOR_ZSTD_LEVEL = 19
BASELINE_TABLE = "bench_fullcopy_version"
STORE_TABLES = ("snapshots_app_version", "snapshots_app_statenode")
CACHE_PREFIX = "rewind-bench"
STATEMENT_WARMUP = 12  # see _warm_statements


def bench_database_url(url: str) -> str:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        raise SystemExit("DATABASE_URL names no database")
    if not name.endswith("_bench"):
        name += "_bench"
    return urlunsplit(parts._replace(path="/" + name))


def setup_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")
    os.environ["CACHE_KEY_PREFIX"] = CACHE_PREFIX
    os.environ["CHANNELS_PREFIX"] = CACHE_PREFIX
    # finalize_versions would otherwise be queued for real workers, which read another database.
    os.environ["CELERY_BROKER_URL"] = "memory://"
    os.environ["CELERY_TASK_ALWAYS_EAGER"] = "false"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("ensure_database")
    call_command("migrate", verbosity=0, interactive=False)
    logging.getLogger("kombu").setLevel(logging.ERROR)


def clear_caches() -> None:
    from django.conf import settings
    from django.core.cache import cache

    from snapshots_app import store

    if settings.REDIS_URL:
        client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        keys = list(client.scan_iter(f"{CACHE_PREFIX}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    else:
        cache.clear()
    store.node_lru.clear()


def reset_tables() -> None:
    from django.db import connection

    assert connection.settings_dict["NAME"].endswith("_bench"), "refusing to empty a non-bench database"
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {BASELINE_TABLE}")
        cursor.execute(
            f"CREATE TABLE {BASELINE_TABLE} (id bigserial PRIMARY KEY, session_id uuid NOT NULL, "
            "number integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), state jsonb NOT NULL, "
            "UNIQUE (session_id, number))"
        )
        # No RESTART IDENTITY: ids (and the zstd dictionary ids derived from them) are never reused.
        cursor.execute(f"TRUNCATE {BASELINE_TABLE}, sessions_app_project CASCADE")
        # Sizes are taken after our own VACUUM; autovacuum's snapshots could keep dead rows alive.
        for table in (*STORE_TABLES, BASELINE_TABLE):
            cursor.execute(
                f"ALTER TABLE {table} SET (autovacuum_enabled = off, toast.autovacuum_enabled = off)"
            )
    clear_caches()


def table_bytes(tables: tuple[str, ...]) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {', '.join(tables)}")
        cursor.execute("SELECT " + " + ".join(f"pg_total_relation_size('{t}')" for t in tables))
        return int(cursor.fetchone()[0])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Result:
    profile: Profile
    versions: int = 0
    logical_bytes: int = 0
    store_write_s: float = 0.0
    base_write_s: float = 0.0
    store_reads: list[float] = field(default_factory=list)
    base_reads: list[float] = field(default_factory=list)
    store_diffs: list[float] = field(default_factory=list)
    base_diffs: list[float] = field(default_factory=list)
    store_step_diffs: list[float] = field(default_factory=list)
    base_step_diffs: list[float] = field(default_factory=list)
    store_field_diffs: list[float] = field(default_factory=list)
    base_field_diffs: list[float] = field(default_factory=list)
    # Per random pair: paths changed, and the share of both states' JSON bytes that is old/new values
    # any diff must hand back (what no storage layout can skip).
    changed_paths: list[int] = field(default_factory=list)
    changed_share: list[float] = field(default_factory=list)
    store_bytes: int = 0
    base_bytes: int = 0
    floor_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _WriteBreakdown:
    """Times the stages of snapshot_record while active, so the table can say where a write's time
    goes: each stage is a function the write calls through its module or class, wrapped for the run."""

    STAGES = (  # (module, owner, attribute, stage)
        ("snapshots_app.rows", None, "version_append_if_head", "the statement with its commit"),
        ("snapshots_app.canonical", None, "validate_state", "validation"),
        ("snapshots_app.store", "ProjectStore", "plan", "the tree (split, encode, hash)"),
        ("snapshots_app.store", "ProjectStore", "node_rows", "compressing new nodes"),
        ("snapshots_app.canonical", None, "checksum", "SHA-256"),
        ("snapshots_app.canonical", None, "dumps_state", "canonical JSON"),
    )

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {stage: 0.0 for *_, stage in self.STAGES}
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> None:
        import importlib

        for module, owner, attribute, stage in self.STAGES:
            target = importlib.import_module(module)
            if owner is not None:
                target = getattr(target, owner)
            original = getattr(target, attribute)
            self._saved.append((target, attribute, original))
            setattr(target, attribute, self._timed(original, stage))

    def _timed(self, function: Any, stage: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - started

        return timed

    def __exit__(self, *exc: object) -> None:
        for target, attribute, original in reversed(self._saved):
            setattr(target, attribute, original)
        self._saved.clear()

    def describe(self, total: float, writes: int) -> str:
        parts = [(stage, seconds) for stage, seconds in self.seconds.items()]
        parts.append(("the rest (metadata checks, the Version object, after-commit scheduling)",
                      total - sum(self.seconds.values())))
        return ", ".join(f"{stage} {seconds / writes * 1000:.2f}" for stage, seconds in parts)


def run_profile(profile: Profile, *, seed: int, reads: int, diffs: int) -> Result:
    from django.db import connection

    from sessions_app.services import project_create, session_get_or_create
    from snapshots_app.canonical import dumps as canonical_dumps
    from snapshots_app.diff import apply_patch, diff_values
    from snapshots_app.services import snapshot_record

    reset_tables()
    result = Result(profile)
    breakdown = _WriteBreakdown()
    floor = zstandard.ZstdCompressor(level=FLOOR_ZSTD_LEVEL)
    project = project_create(name=f"Bench {profile.name}", slug=f"bench-{profile.name}")
    sessions = []
    with breakdown:  # its stages timed within every store write (nothing else calls them here)
        for index in range(profile.sessions):
            session, _ = session_get_or_create(project=project, external_id=f"{profile.name}-{index}")
            sessions.append(session)
            previous = None
            for number, (state, metadata) in enumerate(Trace(profile, seed * 1000 + index).states(), start=1):
                # Alternate who goes first so neither side always finds PostgreSQL's caches warmer.
                order = (0, 1) if number % 2 else (1, 0)
                for side in order:
                    if side == 0:
                        started = time.perf_counter()
                        snapshot_record(session=session, state=state, **metadata)
                        result.store_write_s += time.perf_counter() - started
                    else:
                        started = time.perf_counter()
                        with connection.cursor() as cursor:
                            cursor.execute(
                                f"INSERT INTO {BASELINE_TABLE} (session_id, number, state) VALUES (%s, %s, %s::jsonb)",
                                [session.pk, number, orjson.dumps(state).decode()],
                            )
                        result.base_write_s += time.perf_counter() - started
                current = orjson.dumps(state, option=orjson.OPT_SORT_KEYS)
                result.logical_bytes += len(current)
                result.versions += 1
                current_value = orjson.loads(current)
                if previous is None:
                    result.floor_bytes += len(floor.compress(current))
                else:
                    patch = diff_values(previous, current_value).patch
                    result.floor_bytes += len(floor.compress(orjson.dumps(patch)))
                previous = current_value

    from sessions_app import background

    background.drain(60)  # after-commit side effects still queued must not run into the reads
    n = result.versions
    result.notes.append(
        f"store write = {_ms(result.store_write_s / n)} ms: {breakdown.describe(result.store_write_s, n)} ms. "
        "The statement takes the locks, inserts the nodes and the version row and moves the session (a session's "
        "first write takes a few); live-update publish, finalize queueing and head-cache refresh follow on a "
        "background thread, once per SESSION_NOTIFY_INTERVAL_MS per session at most"
    )
    result.store_bytes = table_bytes(STORE_TABLES)
    result.base_bytes = table_bytes((BASELINE_TABLE,))
    _warm_statements(profile, sessions[0])
    clear_caches()
    rng = random.Random(seed)
    picks = [(rng.choice(sessions), rng.randint(1, profile.versions)) for _ in range(reads)]
    for session, number in picks:
        store_state, base_state = _timed_reads(result, session, number)
        if orjson.dumps(store_state, option=orjson.OPT_SORT_KEYS) != orjson.dumps(base_state, option=orjson.OPT_SORT_KEYS):
            raise AssertionError(f"store and baseline disagree on {session.external_id} v{number}")
    pairs = []
    for _ in range(diffs):
        session = rng.choice(sessions)
        a, b = sorted(rng.sample(range(1, profile.versions + 1), 2))
        pairs.append((session, a, b))
    # What the timeline's "what did this step change" asks: a version against the one before it.
    steps = [(session, number - 1, number) for session, number in
             ((rng.choice(sessions), rng.randint(2, profile.versions)) for _ in range(diffs))]
    for (session, a, b), times in [*((pair, (result.store_diffs, result.base_diffs)) for pair in pairs),
                                   *((pair, (result.store_step_diffs, result.base_step_diffs)) for pair in steps)]:
        store_diff, states = _timed_diffs(times, session, a, b)
        # Array diffs may align differently from the in-memory diff; both must turn a into b.
        if canonical_dumps(apply_patch(states[a], store_diff.patch)) != canonical_dumps(states[b]):
            raise AssertionError(f"store and baseline diffs disagree on {session.external_id} v{a}..v{b}")
        if times[0] is result.store_diffs:
            values = sum(len(orjson.dumps(change[side])) for change in store_diff.changes
                         for side in ("old", "new") if side in change)
            result.changed_paths.append(len(store_diff.changes))
            result.changed_share.append(values / sum(len(orjson.dumps(state)) for state in states.values()))
    _compact(result, project, picks[:20])
    _one_field_diffs(result, sessions, rng)
    return result


def _one_field_diffs(result: Result, sessions: list[Any], rng: random.Random, count: int = 20) -> None:
    """Two versions that differ in one field: a session's head and a new version with one field set
    (after everything else is measured, so nothing above counts these versions), diffed cold."""
    from django.db import connection

    from sessions_app import background
    from snapshots_app.selectors import version_with_state_bytes
    from snapshots_app.services import snapshot_record

    for probe in range(count):
        session = rng.choice(sessions)
        state = orjson.loads(version_with_state_bytes(session=session, number=session.head_number)[1])
        state["probe"] = probe
        snapshot_record(session=session, state=state)
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {BASELINE_TABLE} (session_id, number, state) VALUES (%s, %s, %s::jsonb)",
                           [session.pk, session.head_number, orjson.dumps(state).decode()])
        background.drain(10)  # the write's after-commit work must not run into the timing
        clear_caches()
        store_diff, _ = _timed_diffs((result.store_field_diffs, result.base_field_diffs), session,
                                     session.head_number - 1, session.head_number)
        if [change["path"] for change in store_diff.changes] != ["/probe"]:
            raise AssertionError(f"a one-field diff of {session.external_id} found {len(store_diff.changes)} changes")


def _warm_statements(profile: Profile, session: Any) -> None:
    """Run both sides' read and diff statements STATEMENT_WARMUP times, untimed, on one session.

    PostgreSQL plans a statement afresh on each of its first ~11 executions on a connection:
    psycopg prepares it after 5, then the server plans it per execution 5 more times before it
    settles on a generic plan. For the store's recursive reads that is ~0.4 ms a time, a cost each
    pooled connection of a web process pays once; in 200 timed reads it would be ~5 %, p95's share.
    The caller empties the store's caches afterwards, so the timed reads still start cold."""
    throwaway = Result(profile)
    for number in range(1, STATEMENT_WARMUP + 1):
        version = 1 + number % profile.versions
        _timed_reads(throwaway, session, version)
        _timed_diffs(([], []), session, version, 1 + (number + 1) % profile.versions)


def _compact(result: Result, project: Any, picks: list[tuple[Any, int]]) -> None:
    """Run compaction (garbage collection + zstd dictionary re-encoding; no retention, so every
    version stays), measure the tables again after VACUUM FULL, and check reads still agree."""

    from snapshots_app.compaction import compaction_run

    rewritten = _rewritten_bytes(STORE_TABLES)
    started = time.perf_counter()
    compaction_run(project=project, apply_retention=False)
    seconds = time.perf_counter() - started
    after = _rewritten_bytes(STORE_TABLES)
    clear_caches()
    for session, number in picks:
        store_state, base_state = _timed_reads(Result(result.profile), session, number)
        if orjson.dumps(store_state, option=orjson.OPT_SORT_KEYS) != orjson.dumps(base_state, option=orjson.OPT_SORT_KEYS):
            raise AssertionError(f"after compaction, store and baseline disagree on {session.external_id} v{number}")
    base_rewritten = _rewritten_bytes((BASELINE_TABLE,))
    result.extra["storage, tables rewritten"] = (
        _size(rewritten), _size(base_rewritten),
        f"{rewritten / result.floor_bytes:.2f}x / {base_rewritten / result.floor_bytes:.1f}x floor (VACUUM FULL)",
    )
    result.extra["storage after compaction"] = (
        _size(after), "", f"{after / result.floor_bytes:.2f}x floor; compaction took "
        f"{seconds * 1000 / result.versions:.2f} s per 1,000 versions",
    )


def _rewritten_bytes(tables: tuple[str, ...]) -> int:
    """Table size after VACUUM FULL. PostgreSQL 15 here packs a freshly rewritten table loosely
    after bulk UPDATEs; a second rewrite packs it tight, so both sides get two."""
    from django.db import connection

    with connection.cursor() as cursor:
        for _ in range(2):
            cursor.execute(f"VACUUM FULL {', '.join(tables)}")
    return table_bytes(tables)


def _timed_reads(result: Result, session: Any, number: int) -> tuple[Any, Any]:
    from django.db import connection

    from snapshots_app.selectors import version_with_state_bytes

    started = time.perf_counter()
    # As the API's version endpoint reads (it splices the verified bytes into its response; parsed
    # here, as the baseline's are).
    store_state = orjson.loads(version_with_state_bytes(session=session, number=number)[1])
    result.store_reads.append(time.perf_counter() - started)
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT state::text FROM {BASELINE_TABLE} WHERE session_id = %s AND number = %s",
                       [session.pk, number])
        base_state = orjson.loads(cursor.fetchone()[0])
    result.base_reads.append(time.perf_counter() - started)
    return store_state, base_state


def _timed_diffs(times: tuple[list[float], list[float]], session: Any, a: int, b: int) -> tuple[Any, Any]:
    from django.db import connection

    from snapshots_app.diff import diff_values
    from snapshots_app.selectors import version_pair_diff

    started = time.perf_counter()
    # As the API's diff endpoint does it: both ends and the top of their trees in one round trip.
    store_diff = version_pair_diff(session=session, number=a, other_number=b)[2]
    times[0].append(time.perf_counter() - started)
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT number, state::text FROM {BASELINE_TABLE} WHERE session_id = %s AND number IN (%s, %s)",
                       [session.pk, a, b])
        states = {number: orjson.loads(text) for number, text in cursor.fetchall()}
    diff_values(states[a], states[b])
    times[1].append(time.perf_counter() - started)
    return store_diff, states


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(result: Result) -> str:
    p = result.profile
    n = result.versions
    rows = [
        ("writes/s", f"{n / result.store_write_s:.1f}", f"{n / result.base_write_s:.1f}",
         f"{result.base_write_s / result.store_write_s:.2f}x of baseline"),
        ("read p50 (ms)", _ms(statistics.median(result.store_reads)), _ms(statistics.median(result.base_reads)), ""),
        ("read p95 (ms)", _ms(percentile(result.store_reads, 0.95)), _ms(percentile(result.base_reads, 0.95)),
         f"{percentile(result.store_reads, 0.95) / percentile(result.base_reads, 0.95):.2f}x of baseline"),
        ("diff p50 (ms)", _ms(statistics.median(result.store_diffs)), _ms(statistics.median(result.base_diffs)),
         f"{statistics.median(result.store_diffs) / statistics.median(result.base_diffs):.3f}x of baseline"),
        ("diff p95 (ms)", _ms(percentile(result.store_diffs, 0.95)), _ms(percentile(result.base_diffs, 0.95)),
         f"a random pair differs in {statistics.median(result.changed_paths):.0f} paths (p50) whose old and new "
         f"values are {statistics.median(result.changed_share):.0%} of both states' bytes"),
        ("diff p50, one step (ms)", _ms(statistics.median(result.store_step_diffs)),
         _ms(statistics.median(result.base_step_diffs)),
         f"{statistics.median(result.store_step_diffs) / statistics.median(result.base_step_diffs):.3f}x of baseline "
         "(a version against the one before it)"),
        ("diff p50, one field (ms)", _ms(statistics.median(result.store_field_diffs)),
         _ms(statistics.median(result.base_field_diffs)),
         f"{statistics.median(result.store_field_diffs) / statistics.median(result.base_field_diffs):.3f}x of baseline "
         "(two versions that differ in one field, caches emptied before each)"),
        ("storage", _size(result.store_bytes), _size(result.base_bytes),
         f"{result.store_bytes / result.base_bytes:.3f}x of baseline"),
        ("bytes/version", _size(result.store_bytes / n), _size(result.base_bytes / n), ""),
        ("x information floor", f"{result.store_bytes / result.floor_bytes:.2f}",
         f"{result.base_bytes / result.floor_bytes:.1f}", f"floor {_size(result.floor_bytes)}"),
    ]
    rows += [(name, store, base, note) for name, (store, base, note) in result.extra.items()]
    lines = [
        f"### {p.name}: {p.sessions} sessions x {p.versions} versions, "
        f"avg state {_size(result.logical_bytes / n)} ({_size(result.logical_bytes)} of JSON written)",
        "",
        "| | store | full-copy baseline | |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [f"| {name} | {store} | {base} | {note} |" for name, store, base, note in rows]
    lines += ["", *result.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (under a minute)")
    parser.add_argument("--profile", action="append", choices=sorted(PROFILES), help="run only these profiles")
    parser.add_argument("--sessions", type=int, help="override the session count of every profile")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reads", type=int, default=None, help="random reads per profile (default 200, quick 40)")
    parser.add_argument("--diffs", type=int, default=None, help="random diffs per profile (default 100, quick 20)")
    args = parser.parse_args(argv)

    url = os.environ.get("DATABASE_URL", "")
    if urlsplit(url).scheme not in ("postgres", "postgresql"):
        raise SystemExit("the benchmark needs PostgreSQL: set DATABASE_URL=postgres://…")
    database_url = bench_database_url(url)
    setup_django(database_url)

    profiles = QUICK if args.quick else PROFILES
    chosen = [profiles[name] for name in (args.profile or profiles)]
    if args.sessions:
        chosen = [p.scaled(sessions=args.sessions) for p in chosen]
    reads = args.reads or (40 if args.quick else 200)
    diffs = args.diffs or (20 if args.quick else 100)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW default_toast_compression")
        toast = cursor.fetchone()[0]
        cursor.execute("SHOW server_version")
        server = cursor.fetchone()[0]
    print(f"PostgreSQL {server} (TOAST compression {toast}), database {connection.settings_dict['NAME']}; "
          f"seed {args.seed}; {reads} random reads and {diffs} random diffs per profile; "
          f"floor = zstd level {FLOOR_ZSTD_LEVEL}", flush=True)
    started = time.perf_counter()
    for profile in chosen:
        t0 = time.perf_counter()
        result = run_profile(profile, seed=args.seed, reads=reads, diffs=diffs)
        print()
        print(table(result))
        print(f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

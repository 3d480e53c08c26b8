"""Racing two database calls in tests: wait until one is blocked on a lock the other holds."""

from __future__ import annotations

import threading
import time

from django.db import connection


def someone_waits_on_a_lock(racer: threading.Thread, timeout: float = 20) -> bool:
    """Wait until another connection of this database waits for a lock (the racing call in `racer` is
    blocked): True then; False if `racer` ended first, or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while racer.is_alive() and time.monotonic() < deadline:
            cursor.execute("SELECT pg_stat_clear_snapshot()")  # (in a transaction: else one snapshot for all of it)
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
            if cursor.fetchone()[0]:
                return True
            time.sleep(0.02)
    return False

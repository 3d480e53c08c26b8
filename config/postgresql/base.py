"""Django's PostgreSQL backend, with a pool (DB_POOL_SIZE) that recovers at once from cut connections.

The pool checks each connection as it leaves it (an empty query): after a PostgreSQL restart every
pooled connection is dead, and unchecked each one failed a request. psycopg_pool, though, meets the
dead ones one at a time and waits 1, 2, 4 s between them, so with four or more in the pool the first
request after the database came back (or after pg_terminate_backend) waited DB_POOL_TIMEOUT and
answered 503. One dead connection usually means they all are: on the first, every idle one is
checked at once (the pool replaces each it discards), and the request gets a fresh one in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool


def check_pooled_connection(conn: Any, pool: ConnectionPool) -> None:
    """psycopg's own check; when it fails, the pool's other idle connections are checked too."""
    try:
        ConnectionPool.check_connection(conn)
    except Exception:
        pool.check()  # discards the dead ones and opens replacements (with psycopg's check: no recursion)
        raise


class DatabaseWrapper(base.DatabaseWrapper):
    # Django's, which its type stubs leave out.
    _connection_pools: dict[str, ConnectionPool]
    _configure_connection: Callable[[Any], None]

    @property
    def pool(self) -> ConnectionPool | None:
        options = self.settings_dict["OPTIONS"].get("pool")
        if options and self.alias != NO_DB_ALIAS and self.alias not in self._connection_pools:
            # Built here as Django builds it (django.db.backends.postgresql.base), but with our check;
            # Django's property then finds it. setdefault: threads racing at startup keep one pool.
            pool: ConnectionPool = ConnectionPool(
                kwargs={**self.get_connection_params(), "autocommit": True},
                open=False,
                configure=self._configure_connection,
                check=lambda conn: check_pooled_connection(conn, pool),
                **({} if options is True else options),
            )
            self._connection_pools.setdefault(self.alias, pool)
        return super().pool

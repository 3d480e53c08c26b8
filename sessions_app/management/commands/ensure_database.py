"""Create the PostgreSQL database DATABASE_URL names when it does not exist yet: `make serve`,
`make worker`, `make beat` and `make bench` run it first, so a fresh machine's PostgreSQL (which has
only its `postgres` database) needs no `createdb` by hand. Nothing to do for SQLite, which creates
its file on first use."""

from __future__ import annotations

from typing import Any

import psycopg
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from psycopg import sql


class Command(BaseCommand):
    help = "Create the PostgreSQL database DATABASE_URL names if it does not exist (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql":
            return
        params = connection.get_connection_params()
        name = params.pop("dbname")
        try:
            # The server's maintenance database, with the same host, port, user and password.
            with psycopg.connect(**{**params, "dbname": "postgres"}, autocommit=True) as maintenance:
                if maintenance.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                    return
                maintenance.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise CommandError(f"could not create database {name!r}: {str(exc).strip().splitlines()[0]}") from None
        self.stdout.write(f"created database {name!r}")

"""PostgreSQL for the backend-parametrized tests: reachability, and reusable empty schemas.

Creating a schema and migrating it costs ~0.5 s of DDL on a busy 2-core machine, which the
queue contract tests (~70 of them per backend) cannot afford each. ``SchemaPool`` keeps, per
test process, the schemas it made: a test takes one (a new one, migrated by the queue when
it opens, or one a finished test gave back), and giving it back deletes every row and
restarts the identity sequences (milliseconds), so the next test sees a fresh, empty database
at the latest schema. Schemas are dropped when the test process ends. Tests of migrations
themselves use ``trainfleet.testing.postgres.fresh_schema`` instead.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import pytest

from trainfleet.testing.postgres import TEST_URL, fresh_schema, unreachable_reason

_reason: list[str | None] = []  # the server's reachability, checked once per process


def require_postgres() -> None:
    """Skip the test when the PostgreSQL test server is unreachable; under ``CI=true`` (the
    server is part of CI's environment) fail it instead, so CI never passes by skipping."""
    if not _reason:
        _reason.append(unreachable_reason())
    reason = _reason[0]
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(f"{reason} (start one, or point TRAINFLEET_TEST_PG at one)")


class SchemaPool:
    def __init__(self, url: str = TEST_URL):
        self.url = url
        self._made = ExitStack()
        self._free: list[str] = []

    def take(self) -> str:
        """A URL whose search_path is an empty schema of its own."""
        return self._free.pop() if self._free else self._made.enter_context(fresh_schema())

    def give_back(self, url: str) -> None:
        """Empty the schema for the next test (its tables stay, at the latest version)."""
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                    " AND tablename != 'schema_migrations'"
                )
            ]
            for table in tables:
                conn.execute(f'DELETE FROM "{table}"')
            idents = conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND is_identity = 'YES'"
            ).fetchall()
            for table, column in idents:
                conn.execute(
                    "SELECT setval(pg_get_serial_sequence(%s, %s), 1, false)", (table, column)
                )
        self._free.append(url)

    def close(self) -> None:
        self._made.close()

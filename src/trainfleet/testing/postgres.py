"""A fresh PostgreSQL schema per test, on the real server (127.0.0.1:5432, trust auth).

Each test gets ``CREATE SCHEMA tf_<random>`` and a URL whose libpq ``options`` put that
schema first on the ``search_path``, so every connection the code under test opens (pool,
leader lock, a ``trainfleet serve`` subprocess) sees only its own tables, tests run in
parallel without clashing, and dropping the schema afterwards removes everything.

Without a reachable server the test is skipped with a clear message, except under ``CI=true``
where the server is part of the environment and its absence is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

TEST_URL = os.environ.get("TRAINFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def unreachable_reason(url: str = TEST_URL) -> str | None:
    """Why the server cannot be used here, or None when it can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(url, connect_timeout=3):
            return None
    except psycopg.OperationalError as err:
        return f"no PostgreSQL at {url}: {str(err).strip().splitlines()[0]}"


def require_server(url: str = TEST_URL) -> None:
    """In a test: skip it when no server is reachable, or fail it under ``CI=true``."""
    import pytest

    reason = unreachable_reason(url)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def schema_url(url: str, schema: str) -> str:
    """``url`` with ``schema`` first on every connection's search_path."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-c search_path={schema}')}"


@contextmanager
def fresh_schema(url: str = TEST_URL) -> Iterator[str]:
    """Create an empty schema, yield a URL that uses it, drop it (and all in it) after."""
    import psycopg

    schema = f"tf_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema_url(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

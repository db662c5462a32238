"""The leader's vacuum of ``jobs`` on PostgreSQL (``queue.vacuum``): only where the server's
autovacuum is off, only past the threshold of dead rows, and then for real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fleetkit import manifest_of
from pgkit import require_postgres
from trainfleet.queue import vacuum
from trainfleet.queue.sqlite import PostgresQueue, SQLiteQueue
from trainfleet.testing.postgres import fresh_schema
from trainfleet.testing.wait import wait_until


@pytest.mark.parametrize(
    ("autovacuum", "dead", "live", "vacuums"),
    [
        (False, 1_000, 0, False),  # MIN_DEAD is tolerated
        (False, 1_001, 0, True),
        (False, 5_999, 100_000, False),  # and 5% of the live rows
        (False, 6_001, 100_000, True),
        (True, 1_000_000, 10, False),  # autovacuum runs: it is left to it
    ],
)
def test_the_threshold(autovacuum: bool, dead: int, live: int, vacuums: bool) -> None:
    assert vacuum.needs_vacuum(autovacuum, dead, live) is vacuums


def test_sqlite_has_nothing_to_vacuum(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.db")
    try:
        assert vacuum.vacuum_jobs_if_bloated(queue.db) is None
    finally:
        queue.close()


@pytest.fixture
def pg() -> Iterator[tuple[str, PostgresQueue]]:
    require_postgres()
    with fresh_schema() as url:
        queue = PostgresQueue(url, pool_size=2)
        try:
            yield url, queue
        finally:
            queue.close()


def _stats(url: str) -> tuple[bool, int, bool]:
    """(autovacuum on, dead rows counted, vacuumed by hand yet) for this schema's ``jobs``."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('autovacuum') = 'on', n_dead_tup, last_vacuum IS NOT NULL"
            " FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass"
        ).fetchone()
    assert row is not None
    return bool(row[0]), int(row[1]), bool(row[2])


def _rewrite_jobs(url: str) -> None:
    """A new version of every job row, twice (as a fair-share level change makes one), its
    statistics sent at once rather than at the backend's next flush."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            conn.execute("UPDATE jobs SET updated_at = updated_at + 1")
        conn.execute("SELECT pg_stat_force_next_flush()")


def test_the_leader_vacuums_jobs_past_the_threshold(
    pg: tuple[str, PostgresQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, queue = pg
    monkeypatch.setattr(vacuum, "MIN_DEAD", 50)
    queue.apply_manifest(manifest_of("".join(f'[[jobs]]\nname = "j{i}"\n' for i in range(40))))
    assert vacuum.vacuum_jobs_if_bloated(queue.db) is None  # 40 live rows, none dead
    _rewrite_jobs(url)  # 80 dead rows
    wait_until(lambda: _stats(url)[1] >= 80, timeout_s=15, what="the dead rows counted")
    autovacuum, _, _ = _stats(url)
    done = vacuum.vacuum_jobs_if_bloated(queue.db)
    if autovacuum:  # a server that runs autovacuum is left to it
        assert done is None and not _stats(url)[2]
        return
    assert done is not None and done.dead >= 80
    assert _stats(url)[2]  # VACUUM ran on jobs
    assert queue.counts() == {"pending": 40}  # and nothing else changed

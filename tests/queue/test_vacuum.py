"""The leader's vacuum of ``jobs`` on PostgreSQL (``queue.vacuum``): only where autovacuum
is off for ``jobs`` (the server's setting or the table's), only past the threshold of dead
rows beyond what the last vacuum left, never waiting long for its lock, and then for real."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from fleetkit import manifest_of
from pgkit import require_postgres
from trainfleet.queue import vacuum
from trainfleet.queue.db import PgConn
from trainfleet.queue.sqlite import PostgresQueue, SQLiteQueue
from trainfleet.testing.postgres import TEST_URL, fresh_schema
from trainfleet.testing.wait import wait_until


@pytest.mark.parametrize(
    ("autovacuum", "dead", "live", "left", "vacuums"),
    [
        (False, 1_000, 0, 0, False),  # MIN_DEAD is tolerated
        (False, 1_001, 0, 0, True),
        (False, 5_999, 100_000, 0, False),  # and 5% of the live rows
        (False, 6_001, 100_000, 0, True),
        (True, 1_000_000, 10, 0, False),  # autovacuum runs: it is left to it
        (False, 1_500, 0, 500, False),  # past what the last vacuum left
        (False, 1_501, 0, 500, True),
        (False, 16_001, 100_000, 10_000, True),
    ],
)
def test_the_threshold(autovacuum: bool, dead: int, live: int, left: int, vacuums: bool) -> None:
    assert vacuum.needs_vacuum(autovacuum, dead, live, left) is vacuums


@pytest.mark.parametrize(
    ("server", "table", "autovacuum"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_autovacuum_is_off_for_jobs_where_the_server_or_the_table_turns_it_off(
    server: bool, table: bool, autovacuum: bool
) -> None:
    assert vacuum.JobsStats(server, table, dead=0, live=0).autovacuum is autovacuum


def test_sqlite_has_nothing_to_vacuum(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.db")
    vac = vacuum.Vacuum()
    try:
        assert vac.run_if_bloated(queue.db) is None
    finally:
        queue.close()


def _queue_in(
    place: Callable[[], AbstractContextManager[str]],
) -> Iterator[tuple[str, PostgresQueue]]:
    """A queue (and its URL) in a schema or database ``place`` makes, closed afterwards."""
    require_postgres()
    with place() as url:
        queue = PostgresQueue(url, pool_size=2)
        try:
            yield url, queue
        finally:
            queue.close()


@pytest.fixture
def pg() -> Iterator[tuple[str, PostgresQueue]]:
    yield from _queue_in(fresh_schema)


@contextmanager
def _fresh_database() -> Iterator[str]:
    """A database of its own, for a test that holds a snapshot open: a snapshot holds back
    what VACUUM may remove in its whole database (every schema), and only there."""
    name = f"tf_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(TEST_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield urlsplit(TEST_URL)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(TEST_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")  # FORCE: and its sessions


@pytest.fixture
def own_db() -> Iterator[tuple[str, PostgresQueue]]:
    yield from _queue_in(_fresh_database)


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
    vac = vacuum.Vacuum()  # what the leader's loop holds
    monkeypatch.setattr(vacuum, "MIN_DEAD", 50)
    queue.apply_manifest(manifest_of("".join(f'[[jobs]]\nname = "j{i}"\n' for i in range(40))))
    assert vac.run_if_bloated(queue.db) is None  # 40 live rows, none dead
    _rewrite_jobs(url)  # 80 dead rows
    wait_until(lambda: _stats(url)[1] >= 80, timeout_s=15, what="the dead rows counted")
    autovacuum, _, _ = _stats(url)
    done = vac.run_if_bloated(queue.db)
    if autovacuum:  # a server that runs autovacuum is left to it
        assert done is None and not _stats(url)[2]
        return
    assert done is not None and done.dead >= 80
    assert _stats(url)[2]  # VACUUM ran on jobs
    assert queue.counts() == {"pending": 40}  # and nothing else changed


def _jobs(queue: PostgresQueue, url: str) -> None:
    """40 pending jobs, and autovacuum off for ``jobs`` by its reloption, so the leader
    vacuums it whatever the server's setting (with ``MIN_DEAD`` 50: past 52 dead rows)."""
    queue.apply_manifest(manifest_of("".join(f'[[jobs]]\nname = "j{i}"\n' for i in range(40))))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE jobs SET (autovacuum_enabled = false)")


def _dead(url: str) -> int:
    return _stats(url)[1]


def _vacuum_count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_vacuum_an_old_transaction_holds_back_runs_again_only_past_what_it_left(
    own_db: tuple[str, PostgresQueue],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, queue = own_db
    vac = vacuum.Vacuum()  # what the leader's loop holds
    monkeypatch.setattr(vacuum, "MIN_DEAD", 50)
    caplog.set_level(logging.INFO, logger=vacuum.__name__)
    _jobs(queue, url)
    with psycopg.connect(url, autocommit=True) as old:
        old.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        old.execute("SELECT count(*) FROM jobs")  # its snapshot: every row as it is now
        _rewrite_jobs(url)  # 80 dead rows, all of them still seen by `old`
        wait_until(lambda: _dead(url) >= 80, timeout_s=15, what="the dead rows counted")
        first = vac.run_if_bloated(queue.db)
        assert first is not None and first.left >= 80  # it could remove none of them
        [warning] = _warnings(caplog)
        assert "an old transaction" in warning and f"pid {old.info.backend_pid}" in warning

        vacuums = _vacuum_count(url)
        assert vac.run_if_bloated(queue.db) is None  # not again at the next check
        assert _vacuum_count(url) == vacuums

        _rewrite_jobs(url)  # 80 more: past the 80 it left by more than 52
        wait_until(lambda: _dead(url) >= 160, timeout_s=15, what="the dead rows counted")
        again = vac.run_if_bloated(queue.db)
        assert again is not None and again.left >= 160
        assert len(_warnings(caplog)) == 1  # said once, not at every vacuum it holds back
        old.execute("COMMIT")

    with psycopg.connect(url, autocommit=True) as conn:  # a vacuum other than the leader's
        conn.execute("VACUUM jobs")
    assert _dead(url) == 0
    assert vac.run_if_bloated(queue.db) is None
    _rewrite_jobs(url)  # 80 dead rows: past the threshold again, counted from none left
    wait_until(lambda: _dead(url) >= 80, timeout_s=15, what="the dead rows counted")
    done = vac.run_if_bloated(queue.db)
    assert done is not None and done.left == 0  # nothing holds them back any more
    assert len(_warnings(caplog)) == 1


def test_a_vacuum_gives_up_waiting_for_its_lock_and_the_next_check_retries(
    pg: tuple[str, PostgresQueue],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, queue = pg
    vac = vacuum.Vacuum()  # what the leader's loop holds
    monkeypatch.setattr(vacuum, "MIN_DEAD", 50)
    monkeypatch.setattr(vacuum, "LOCK_TIMEOUT_S", 0.5)
    caplog.set_level(logging.WARNING, logger=vacuum.__name__)
    _jobs(queue, url)
    _rewrite_jobs(url)
    wait_until(lambda: _dead(url) >= 80, timeout_s=15, what="the dead rows counted")
    results: list[vacuum.Vacuumed | None] = []
    with psycopg.connect(url) as holder:  # a transaction: the lock lasts until its end
        holder.execute("LOCK TABLE jobs IN SHARE UPDATE EXCLUSIVE MODE")  # VACUUM's own lock
        check = threading.Thread(
            target=lambda: results.append(vac.run_if_bloated(queue.db)), daemon=True
        )
        started = time.monotonic()
        check.start()
        try:
            check.join(timeout=30)
            waited_s = time.monotonic() - started
            assert not check.is_alive(), "VACUUM still waits for its lock"
        finally:
            holder.rollback()  # frees a VACUUM that waits
            check.join(timeout=30)
    assert results == [None] and waited_s >= 0.5
    [warning] = _warnings(caplog)
    assert "waiting for its lock" in warning
    assert not _stats(url)[2]  # no VACUUM ran
    assert vac.run_if_bloated(queue.db) is not None  # the next check, lock free
    assert _stats(url)[2]


def test_the_tables_autovacuum_reloption_is_read_and_lets_the_leader_vacuum(
    pg: tuple[str, PostgresQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, queue = pg
    vac = vacuum.Vacuum()  # what the leader's loop holds
    monkeypatch.setattr(vacuum, "MIN_DEAD", 50)

    def table_autovacuum(option: str) -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE jobs {option}")
            stats = vacuum.read_stats(PgConn(conn))
        assert stats.autovacuum == (stats.server_autovacuum and stats.table_autovacuum)
        return stats.table_autovacuum

    queue.apply_manifest(manifest_of("".join(f'[[jobs]]\nname = "j{i}"\n' for i in range(40))))
    # migration 2's other autovacuum settings on jobs leave it on
    assert table_autovacuum("RESET (autovacuum_enabled)")
    assert not table_autovacuum("SET (autovacuum_enabled = off)")
    assert table_autovacuum("SET (autovacuum_enabled = on)")
    assert not table_autovacuum("SET (autovacuum_enabled = false)")
    _rewrite_jobs(url)
    wait_until(lambda: _dead(url) >= 80, timeout_s=15, what="the dead rows counted")
    # Vacuumed whatever the server's setting: where it is on, only the reloption says so.
    assert vac.run_if_bloated(queue.db) is not None
    assert _stats(url)[2]

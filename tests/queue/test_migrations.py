"""Schema migrations on both backends: an issue-8 database upgrades without losing a row and
the queue then claims from it; a newer schema is refused; a dry run changes nothing; a failed
migration leaves the database at the last whole version; racing upgraders apply each once."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetkit import make_cap
from trainfleet.errors import SchemaTooNew
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue import migrations as mig
from trainfleet.queue import open_queue
from trainfleet.queue.db import Conn, Database, Dialect, open_database
from trainfleet.queue.migrations import Migration, latest, migrate, schema_state
from trainfleet.queue.schema_v1 import SQLITE_DDL, add_legacy_columns, sqlite_statements
from trainfleet.testing.postgres import fresh_schema, require_server

TABLES = ("jobs", "events", "runs", "rounds")
RUN_ID = "ab" * 32


def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL schema; skipped without a server, except in CI."""
    require_server()
    with fresh_schema() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_url()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'queue.db'}"
    else:
        yield from postgres_url()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = open_database(db_url)
    yield database
    database.close()


def make_issue8(db: Database) -> None:
    """What the issue-8 release left behind: its tables (on SQLite with no record of a
    version, as it made them), a pending job, a finished replica task, events, a run and
    its round."""
    if db.dialect == Dialect.SQLITE:
        with db.tx() as conn:
            for statement in sqlite_statements():
                conn.execute(statement)
    else:
        migrate(db, to=1)
    with db.tx() as conn:
        insert_issue8_rows(conn)


def insert_issue8_rows(conn: Conn) -> None:
    spec = JobSpec(name="a", kind="command", command=["true"], timeout_s=90)
    replica = json.loads(JobSpec(name="r", kind="command", command=["true"]).model_dump_json())
    replica.update(kind="replica", task={"run": "r", "run_id": RUN_ID, "round": 3, "replica": 1})
    jobs = [
        ("a" * 64, 1, "a", spec.model_dump_json(), "pending", 1000.0),
        ("b" * 64, 2, "r/3/1", json.dumps(replica), "completed", None),
    ]
    for jid, seq, name, body, state, pending_since in jobs:
        conn.execute(
            "INSERT INTO jobs (id, seq, name, spec, state, priority, require_cuda, min_vram_gib,"
            " min_ram_gib, min_cores, created_at, updated_at, pending_since, manifest_hash)"
            " VALUES (?, ?, ?, ?, ?, 0, 0, 0, 0, 1, 1000, 1000, ?, 'm')",
            (jid, seq, name, body, state, pending_since),
        )
        conn.execute(
            "INSERT INTO events (job_id, at, kind, from_state, to_state)"
            " VALUES (?, 1000, 'created', NULL, 'pending')",
            (jid,),
        )
    conn.execute(
        "INSERT INTO runs (id, seq, name, spec, state, round, num_rounds, created_at,"
        " updated_at) VALUES (?, 1, 'r', '{}', 'running', 3, 10, 1000, 1000)",
        (RUN_ID,),
    )
    conn.execute(
        "INSERT INTO rounds (run_id, round, state, weights, weights_size, opened_at)"
        " VALUES (?, 3, 'open', ?, 10, 1000)",
        (RUN_ID, "cd" * 32),
    )


def counts(db: Database) -> dict[str, int]:
    with db.read() as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}


def recorded(db: Database) -> list[int]:
    with db.read() as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        return [row[0] for row in rows]


def tables(db: Database) -> set[str]:
    with db.read() as conn:
        if db.dialect == Dialect.SQLITE:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        else:
            sql = (
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        return {row[0] for row in conn.execute(sql)}


def test_an_empty_database_is_built_at_the_latest_version_once(db: Database) -> None:
    assert schema_state(db).version == 0
    assert [m.version for m in migrate(db)] == list(range(1, latest() + 1))
    assert recorded(db) == list(range(1, latest() + 1))
    assert migrate(db) == []  # a second start has nothing to do
    assert schema_state(db).version == latest()


def test_an_issue8_database_upgrades_without_losing_a_row_and_then_serves(
    db: Database, db_url: str
) -> None:
    make_issue8(db)
    state = schema_state(db)
    assert state.version == 1
    before = counts(db)
    assert before == {"jobs": 2, "events": 2, "runs": 1, "rounds": 1}
    migrate(db)
    assert counts(db) == before
    assert recorded(db) == list(range(1, latest() + 1))
    with db.read() as conn:
        rows = conn.execute(
            "SELECT name, kind, run_id, round, replica, timeout_s FROM jobs ORDER BY seq"
        ).fetchall()
    assert [tuple(r) for r in rows] == [
        ("a", "command", None, None, None, 90.0),
        ("r/3/1", "replica", RUN_ID, 3, 1, 3600.0),
    ]
    db.close()
    queue = open_queue(db_url)
    try:
        worker, _ = queue.register_worker(make_cap())
        claim = queue.claim(worker.id)
        assert claim is not None and claim.job.name == "a"
    finally:
        queue.close()


def test_an_untracked_issue8_sqlite_file_is_adopted_as_version_1(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:  # exactly as the release made it
        raw.executescript(SQLITE_DDL)
    db = open_database(str(path))
    try:
        assert schema_state(db) == mig.SchemaState(1, untracked=True)
        plan = migrate(db, dry_run=True)
        assert [m.version for m in plan] == list(range(1, latest() + 1))  # 1: adopted
        migrate(db)
        assert recorded(db) == list(range(1, latest() + 1))
    finally:
        db.close()


def test_a_file_from_before_the_issue8_column_migrations_still_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "older.db"
    ddl = SQLITE_DDL.replace("    flags TEXT NOT NULL DEFAULT '[]'\n", "").replace(
        "    pinned INTEGER NOT NULL DEFAULT 0,\n", ""
    )
    ddl = ddl.replace("    error TEXT,\n", "    error TEXT\n")
    with sqlite3.connect(path) as raw:
        raw.executescript(ddl)
        raw.execute("DROP TABLE runs")  # a release from before collaborative runs, too
    db = open_database(str(path))
    try:
        with db.read() as conn:
            assert {"flags", "pinned"}.isdisjoint(
                row["name"] for row in conn.execute("PRAGMA table_info(jobs)")
            )
        migrate(db)
        with db.read() as conn:
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
        assert {"flags", "pinned", "kind", "run_id", "timeout_s"} <= columns
        assert "runs" in tables(db)
    finally:
        db.close()


def test_a_newer_schema_is_refused_naming_both_versions_and_nothing_is_written(
    db: Database, db_url: str
) -> None:
    migrate(db)
    with db.tx() as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'future', 0)",
            (latest() + 1,),
        )
    message = f"database schema is version {latest() + 1}; this trainfleet knows up to {latest()}"
    for dry_run in (True, False):
        with pytest.raises(SchemaTooNew, match=message):
            migrate(db, dry_run=dry_run)
    db.close()
    with pytest.raises(SchemaTooNew, match="upgrade trainfleet"):
        open_queue(db_url)


def test_a_dry_run_returns_the_plan_and_changes_nothing(db: Database) -> None:
    make_issue8(db)
    names_before, counts_before = tables(db), counts(db)
    plan = migrate(db, dry_run=True)
    assert [m.version for m in plan][-1] == latest()
    assert tables(db) == names_before and counts(db) == counts_before
    with db.read() as conn:
        columns = conn.execute("SELECT * FROM jobs").fetchone().keys()
    assert "run_id" not in columns


def test_a_failed_migration_rolls_back_whole(db: Database, monkeypatch) -> None:
    migrate(db)
    broken = Migration(
        latest() + 1,
        "broken",
        ["CREATE TABLE half (a INTEGER)", "SELECT no_such_column FROM jobs"],
        ["CREATE TABLE half (a INTEGER)", "SELECT no_such_column FROM jobs"],
    )
    monkeypatch.setattr(mig, "MIGRATIONS", [*mig.MIGRATIONS, broken])
    with pytest.raises(Exception, match="no_such_column"):
        migrate(db)
    assert "half" not in tables(db)
    assert schema_state(db).version == broken.version - 1


def test_racing_upgraders_apply_each_migration_once(db_url: str) -> None:
    """Two coordinators starting at once on one database: both start, each step runs once
    (a second run would fail on the ALTERs or on schema_migrations' primary key)."""
    dbs = [open_database(db_url) for _ in range(2)]
    barrier = threading.Barrier(len(dbs))
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def start(db: Database) -> None:
        barrier.wait(timeout=10)
        try:
            applied.append([m.version for m in migrate(db)])
        except BaseException as err:  # reported below, with the other thread's result
            errors.append(err)

    threads = [threading.Thread(target=start, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert errors == []
        assert sorted(v for versions in applied for v in versions) == list(range(1, latest() + 1))
        assert recorded(dbs[0]) == list(range(1, latest() + 1))
    finally:
        for db in dbs:
            db.close()


def test_postgres_version_1_has_the_sqlite_columns(pg_url: str) -> None:
    """The PostgreSQL translation of version 1 keeps every table and column of the release."""
    pg = open_database(pg_url)
    lite = open_database(":memory:")
    try:
        migrate(pg, to=1)
        migrate(lite, to=1)
        assert _columns(pg) == _columns(lite)
    finally:
        pg.close()
        lite.close()


def _columns(db: Database) -> dict[str, list[str]]:
    out = {}
    with db.read() as conn:
        for table in sorted(tables(db) - {"sqlite_sequence"}):
            rows = conn.execute(f"SELECT * FROM {table} WHERE 1 = 0")
            out[table] = [d[0] for d in _description(rows)]
    return out


def _description(cursor: object) -> list[tuple[str, ...]]:
    return list(getattr(cursor, "description", None) or [])


def test_add_legacy_columns_is_a_no_op_on_a_current_file(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "q.db"))
    try:
        migrate(db)
        with db.tx() as conn:
            add_legacy_columns(conn)  # nothing to add: no "duplicate column" error
    finally:
        db.close()


def test_a_version_finishes_a_database_that_already_has_part_of_it(tmp_path: Path) -> None:
    """Column additions skip the columns already there (SQLite has no ADD COLUMN IF NOT
    EXISTS), so a half-made database upgrades instead of failing on a duplicate column."""
    db = open_database(str(tmp_path / "q.db"))
    try:
        migrate(db, to=1)
        with db.tx() as conn:
            conn.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'train'")
        migrate(db)
        with db.read() as conn:
            columns = [row["name"] for row in conn.execute("PRAGMA table_info(jobs)")]
        assert columns.count("kind") == 1 and "timeout_s" in columns
    finally:
        db.close()


def test_version_4_gives_old_jobs_the_public_tier_and_adds_the_market_tables(
    db: Database,
) -> None:
    make_issue8(db)
    migrate(db)
    assert {"competitions", "submissions", "referee_reports", "market_ledger"} <= tables(db)
    assert "attest_nonces" in tables(db)
    with db.read() as conn:
        rows = conn.execute("SELECT name, panel, tier FROM jobs ORDER BY seq").fetchall()
        workers = conn.execute("SELECT attested_until, measurement FROM workers").fetchall()
    assert [tuple(r) for r in rows] == [("a", None, "public"), ("r/3/1", None, "public")]
    assert workers == []
    with db.tx() as conn:  # the ledger pays a submission once: a database fact
        entry = (
            "INSERT INTO market_ledger (competition_id, submission_id, account, amount,"
            " frontier_before, frontier_after, at) VALUES ('c', 's', 'h', 1.0, 2.0, 1.9, 0)"
        )
        conn.execute(entry)
    with pytest.raises(Exception, match=r"(?i)unique"), db.tx() as conn:
        conn.execute(entry)


def test_version_5_fills_allowed_hosts_and_claims_still_check_the_spec(
    db: Database, db_url: str
) -> None:
    """The claim's SQL filter column is filled from old specs; a row the filter lets through
    wrongly (its column left NULL) is still refused by the spec's own check."""
    make_issue8(db)
    migrate(db, to=4)
    pinned = JobSpec(name="p", kind="command", command=["true"], allowed_hosts=["h1", "h2"])
    legacy = JobSpec(name="q", kind="command", command=["true"], allowed_hosts=["h1"])
    with db.tx() as conn:
        for jid, seq, spec in (("c" * 64, 3, pinned), ("d" * 64, 4, legacy)):
            conn.execute(
                "INSERT INTO jobs (id, seq, name, spec, state, priority, require_cuda,"
                " min_vram_gib, min_ram_gib, min_cores, created_at, updated_at, pending_since,"
                " manifest_hash) VALUES (?, ?, ?, ?, 'pending', 5, 0, 0, 0, 1, 1000, 1000,"
                " 1000, 'm')",
                (jid, seq, spec.name, spec.model_dump_json()),
            )
    migrate(db)
    with db.read() as conn:
        rows = conn.execute("SELECT name, allowed_hosts FROM jobs ORDER BY seq").fetchall()
    assert [tuple(r) for r in rows] == [
        ("a", None),
        ("r/3/1", None),
        ("p", ",h1,h2,"),
        ("q", ",h1,"),
    ]
    with db.tx() as conn:  # as if the backfill had missed it: the filter passes the row
        conn.execute("UPDATE jobs SET allowed_hosts = NULL WHERE name = 'q'")
    db.close()
    queue = open_queue(db_url)
    try:
        other, _ = queue.register_worker(make_cap("h3"))
        claim = queue.claim(other.id)
        assert claim is not None and claim.job.name == "a"  # neither p nor q: not its hosts
        mine, _ = queue.register_worker(make_cap("h2"))
        claim = queue.claim(mine.id)
        assert claim is not None and claim.job.name == "p"
    finally:
        queue.close()


def test_version_8_finds_old_and_new_events_of_a_job_by_its_seq(db: Database, db_url: str) -> None:
    """Events written before version 8 get their job's seq; the queue then reads a job's old
    events and its new ones through the seq index, and no other job's."""
    make_issue8(db)
    migrate(db, to=7)
    migrate(db)
    with db.read() as conn:
        rows = conn.execute("SELECT job_id, job_seq FROM events ORDER BY seq").fetchall()
        if db.dialect == Dialect.SQLITE:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        else:
            names = {
                r[0]
                for r in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
                )
            }
    assert [tuple(r) for r in rows] == [("a" * 64, 1), ("b" * 64, 2)]
    assert "events_by_job_seq" in names and "events_by_job" not in names
    db.close()
    queue = open_queue(db_url)
    try:
        worker, _ = queue.register_worker(make_cap())
        claim = queue.claim(worker.id)
        assert claim is not None and claim.job.id == "a" * 64
        assert [e.kind for e in queue.events("a" * 64)] == ["created", "claimed"]
        assert [e.kind for e in queue.events("b" * 64)] == ["created"]
        with queue.db.read() as conn:  # every new event carries its job's seq
            seqs = conn.execute("SELECT job_seq FROM events WHERE kind = 'claimed'").fetchall()
        assert [r[0] for r in seqs] == [1]
    finally:
        queue.close()

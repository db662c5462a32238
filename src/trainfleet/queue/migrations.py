"""Versioned schema migrations, one history for SQLite and PostgreSQL.

A database records the migrations applied to it in ``schema_migrations``. ``migrate(db)``
applies the ones it lacks, in order, each in its own write transaction, so a crash leaves the
database at a whole version and the next start resumes from there. The queue calls it when it
opens: a coordinator started on an older database upgrades it without losing a row.

- Version 1 is the issue-8 release's schema (``schema_v1``). A SQLite file from that release
  has its tables but no ``schema_migrations``: it counts as version 1 and is adopted by
  running version 1 again (``CREATE ... IF NOT EXISTS`` and the two columns older files lack),
  which adds only what is missing, then recording it.
- A database newer than this code (a later trainfleet upgraded it) is refused with
  ``SchemaTooNew``, before anything is written: running old code on it could corrupt it.
- Several coordinators starting at once on one PostgreSQL database: each migration's
  transaction takes an advisory lock and re-reads the version under it, so exactly one
  applies each step and the others find it done. SQLite's ``BEGIN IMMEDIATE`` does the same.

A new version is appended to ``MIGRATIONS`` (never edit a released one), with its SQLite and
PostgreSQL steps side by side; a step is a SQL statement, an ``AddColumns``, or a function of
the connection. Write steps so that re-running them is harmless (``IF NOT EXISTS``): a
database adopted as version 1 may already hold part of a later version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

from trainfleet.errors import SchemaTooNew, SchemaUnknown
from trainfleet.queue import schema_v1
from trainfleet.queue.db import Conn, Database, Dialect

__all__ = [
    "MIGRATIONS",
    "Migration",
    "SchemaState",
    "SchemaTooNew",
    "latest",
    "migrate",
    "schema_state",
]

Step = Union[str, "AddColumns", Callable[[Conn], None]]


@dataclass(frozen=True)
class Migration:
    """One schema version: its steps on each backend (a step may appear in both lists)."""

    version: int
    name: str
    sqlite: Sequence[Step]
    postgres: Sequence[Step]

    def steps(self, dialect: Dialect) -> Sequence[Step]:
        return self.postgres if dialect == Dialect.POSTGRES else self.sqlite

    def describe(self, dialect: Dialect) -> list[str]:
        """Its steps as text, for ``trainfleet db upgrade --dry-run --sql``."""
        lines: list[str] = []
        for step in self.steps(dialect):
            if isinstance(step, str):
                lines.append(step)
            elif isinstance(step, AddColumns):
                lines.extend(step.sql(dialect))
            else:
                lines.append(f"-- {(step.__doc__ or step.__name__).strip().splitlines()[0]}")
        return lines


@dataclass(frozen=True)
class AddColumns:
    """Add columns to a table, each only where missing: SQLite has no ``ADD COLUMN IF NOT
    EXISTS``, and a file adopted as version 1 may already hold some of them. Types are
    written for SQLite and translated for PostgreSQL like version 1's."""

    table: str
    columns: tuple[tuple[str, str], ...]  # (name, SQLite type and constraints)

    def sql(self, dialect: Dialect) -> list[str]:
        if dialect == Dialect.POSTGRES:
            return [
                f"ALTER TABLE {self.table} ADD COLUMN IF NOT EXISTS {name}"
                f" {schema_v1.to_postgres(kind)}"
                for name, kind in self.columns
            ]
        return [f"ALTER TABLE {self.table} ADD COLUMN {n} {k}" for n, k in self.columns]

    def __call__(self, conn: Conn) -> None:
        if conn.dialect == Dialect.POSTGRES:
            missing = self.sql(conn.dialect)
        else:
            have = {row["name"] for row in conn.execute(f"PRAGMA table_info({self.table})")}
            missing = [
                sql
                for (name, _), sql in zip(self.columns, self.sql(conn.dialect), strict=True)
                if name not in have
            ]
        for statement in missing:
            conn.execute(statement)


# Version 2 (issue 9): jobs get real columns for what queries used to json_extract from the
# spec, so the same SQL runs on both engines and the indexes are plain column indexes.
JOB_COLUMNS = AddColumns(
    "jobs",
    (
        ("kind", "TEXT NOT NULL DEFAULT 'train'"),
        ("run_id", "TEXT"),  # the task's; NULL for jobs that are not a run's replica task
        ("round", "INTEGER"),
        ("replica", "INTEGER"),
        ("timeout_s", "REAL NOT NULL DEFAULT 3600"),
    ),
)
JOB_INDEXES = [
    "DROP INDEX IF EXISTS jobs_by_task",  # v1's index on json_extract of the spec
    "CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (run_id, round)",
    "CREATE INDEX IF NOT EXISTS jobs_by_lease ON jobs (state, heartbeat_at)",  # the reaper
]
V2_SQLITE: list[Step] = [
    JOB_COLUMNS,
    "UPDATE jobs SET kind = COALESCE(json_extract(spec, '$.kind'), 'train'),"
    " run_id = json_extract(spec, '$.task.run_id'),"
    " round = json_extract(spec, '$.task.round'),"
    " replica = json_extract(spec, '$.task.replica'),"
    " timeout_s = COALESCE(CAST(json_extract(spec, '$.timeout_s') AS REAL), 3600)",
    *JOB_INDEXES,
]
V2_POSTGRES: list[Step] = [
    JOB_COLUMNS,
    "UPDATE jobs SET kind = COALESCE(spec::jsonb ->> 'kind', 'train'),"
    " run_id = spec::jsonb -> 'task' ->> 'run_id',"
    " round = (spec::jsonb -> 'task' ->> 'round')::bigint,"
    " replica = (spec::jsonb -> 'task' ->> 'replica')::bigint,"
    " timeout_s = COALESCE((spec::jsonb ->> 'timeout_s')::double precision, 3600)",
    *JOB_INDEXES,
    # Claims rewrite pending rows constantly; vacuum the claim index long before dead
    # tuples pile up (a bloated pending index slowed claims 10x in a measurement).
    "ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.01,"
    " autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0)",
]

# Version 3 (issue 9, batch claims): a worker may hold ``slots`` active jobs (default 1); a
# claim of a multi-slot worker finds its jobs by worker, and the host-priority rule reads
# the idle workers of the higher-priority hosts only.
V3_STEPS: list[Step] = [
    AddColumns("workers", (("slots", "INTEGER NOT NULL DEFAULT 1"),)),
    "CREATE INDEX IF NOT EXISTS jobs_by_worker ON jobs (worker_id, state)",
    "CREATE INDEX IF NOT EXISTS workers_by_host ON workers (host, state)",
]

# Version 4 (issue 10): the training market (competitions, submissions, their referee
# reports and the append-only ledger whose UNIQUE submission_id makes "pay once" a database
# fact), attestation (a worker's attested_until and measurement, single-use nonces), and two
# job columns: ``panel`` (a referee job's submission id: a panel's jobs go to distinct hosts)
# and ``tier`` ('private' jobs go to attested workers only).
V4_TABLES = [
    "CREATE TABLE IF NOT EXISTS competitions (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
    " spec TEXT NOT NULL, baseline TEXT NOT NULL, baseline_score REAL NOT NULL,"
    " frontier TEXT NOT NULL, frontier_score REAL NOT NULL, frontier_submission TEXT,"
    " created_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS submissions (id TEXT PRIMARY KEY, seq INTEGER NOT NULL,"
    " competition_id TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,"
    " producer TEXT NOT NULL, claim REAL NOT NULL, state TEXT NOT NULL,"
    " frontier TEXT NOT NULL, frontier_score REAL NOT NULL, trusted_score REAL,"
    " improvement REAL, paid REAL NOT NULL DEFAULT 0, verdict TEXT NOT NULL DEFAULT '',"
    " created_at REAL NOT NULL, decided_at REAL)",
    "CREATE INDEX IF NOT EXISTS submissions_by_competition ON submissions (competition_id, seq)",
    "CREATE TABLE IF NOT EXISTS referee_reports (submission_id TEXT NOT NULL,"
    " idx INTEGER NOT NULL, job_id TEXT NOT NULL, worker_id TEXT NOT NULL, host TEXT NOT NULL,"
    " ok INTEGER NOT NULL, mean REAL, lo REAL, hi REAL, improvement REAL, lower REAL,"
    " certified INTEGER NOT NULL, reason TEXT NOT NULL, created_at REAL NOT NULL,"
    " PRIMARY KEY (submission_id, idx))",
    "CREATE TABLE IF NOT EXISTS market_ledger (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " competition_id TEXT NOT NULL, submission_id TEXT NOT NULL UNIQUE, account TEXT NOT NULL,"
    " amount REAL NOT NULL, frontier_before REAL NOT NULL, frontier_after REAL NOT NULL,"
    " at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS attest_nonces (nonce TEXT PRIMARY KEY, worker_id TEXT NOT NULL,"
    " issued_at REAL NOT NULL, expires_at REAL NOT NULL, used_at REAL)",
]
V4_COLUMNS: list[Step] = [
    AddColumns("jobs", (("panel", "TEXT"), ("tier", "TEXT NOT NULL DEFAULT 'public'"))),
    AddColumns("workers", (("attested_until", "REAL"), ("measurement", "TEXT"))),
    "CREATE INDEX IF NOT EXISTS jobs_by_panel ON jobs (panel)",
]
V4_SQLITE: list[Step] = [*V4_TABLES, *V4_COLUMNS]
V4_POSTGRES: list[Step] = [*(schema_v1.to_postgres(s) for s in V4_TABLES), *V4_COLUMNS]

# Version 5 (issue 9, the claim's scan): ``jobs.allowed_hosts``, the job's hosts as
# ``",a,b,"`` (NULL: any host), so a claim's SQL skips the pinned jobs its host may not take
# instead of checking each in Python on every claim (``claims._choose``). Only a filter in
# front of the spec's own check: a row it lets through wrongly (a NULL left on a job, a
# name holding a comma) is still refused by the claim, so the backfill cannot make a claim
# wrong, only slower.
V5_COLUMN = AddColumns("jobs", (("allowed_hosts", "TEXT"),))
# The claim's scan reads the pending rows in claim order and filters them on these columns:
# with all of them in the index, a row the filter drops costs no read of the table.
V5_INDEX = (
    "CREATE INDEX IF NOT EXISTS jobs_pending_claim ON jobs (priority DESC, seq, allowed_hosts,"
    " require_cuda, min_vram_gib, min_ram_gib, min_cores, tier, in_manifest, pinned)"
    " WHERE state = 'pending'"
)
V5_SQLITE: list[Step] = [
    V5_COLUMN,
    V5_INDEX,
    "UPDATE jobs SET allowed_hosts = ',' || (SELECT group_concat(value, ',')"
    " FROM json_each(jobs.spec, '$.allowed_hosts')) || ','"
    " WHERE json_type(jobs.spec, '$.allowed_hosts') = 'array'"
    " AND json_array_length(jobs.spec, '$.allowed_hosts') > 0",
]
V5_POSTGRES: list[Step] = [
    V5_COLUMN,
    V5_INDEX,
    "UPDATE jobs SET allowed_hosts = ',' || (SELECT string_agg(h, ',')"
    " FROM jsonb_array_elements_text(spec::jsonb -> 'allowed_hosts') AS h) || ','"
    " WHERE CASE WHEN jsonb_typeof(spec::jsonb -> 'allowed_hosts') = 'array'"
    " THEN jsonb_array_length(spec::jsonb -> 'allowed_hosts') > 0 ELSE false END",
]

# Version 6 (issue 11): disaggregated pipelines. ``pipelines`` holds one row per pipeline
# identity (its secret, hex, never served to readers; its attempt key, which signs the
# attempt tokens of its jobs and is never handed to any of them; its teacher's model digest,
# kept from the artifact GC); ``pipeline_samples`` is the durable ref queue: one row per sample, its
# current ref (JSON) and state; ``jobs.pipeline_id`` finds a pipeline's producer/consumer jobs.
V6_TABLES = [
    "CREATE TABLE IF NOT EXISTS pipelines (id TEXT PRIMARY KEY, seq INTEGER NOT NULL,"
    " name TEXT NOT NULL, spec TEXT NOT NULL, secret TEXT NOT NULL,"
    " attempt_key TEXT NOT NULL, state TEXT NOT NULL,"
    " teacher_job TEXT NOT NULL, teacher_model TEXT, consumers INTEGER NOT NULL,"
    " in_manifest INTEGER NOT NULL DEFAULT 1, detail TEXT NOT NULL DEFAULT '',"
    " created_at REAL NOT NULL, updated_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS pipelines_by_name ON pipelines (name, seq)",
    "CREATE INDEX IF NOT EXISTS pipelines_by_teacher_model ON pipelines (teacher_model)",
    "CREATE TABLE IF NOT EXISTS pipeline_samples (pipeline_id TEXT NOT NULL,"
    " sample_id TEXT NOT NULL, idx INTEGER NOT NULL, bucket INTEGER NOT NULL,"
    " ref TEXT NOT NULL, producer_job TEXT NOT NULL, producer_epoch INTEGER NOT NULL,"
    " state TEXT NOT NULL, released INTEGER NOT NULL DEFAULT 0, consumer_job TEXT,"
    " consumer_epoch INTEGER, step INTEGER, leased_until REAL, produced_at REAL NOT NULL,"
    " consumed_at REAL, committed_at REAL, released_at REAL,"
    " times_produced INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (pipeline_id, sample_id))",
    "CREATE INDEX IF NOT EXISTS pipeline_samples_by_state ON pipeline_samples"
    " (pipeline_id, state, idx)",
]
V6_COLUMNS: list[Step] = [
    AddColumns("jobs", (("pipeline_id", "TEXT"),)),
    "CREATE INDEX IF NOT EXISTS jobs_by_pipeline ON jobs (pipeline_id)",
]
V6_SQLITE: list[Step] = [*V6_TABLES, *V6_COLUMNS]
V6_POSTGRES: list[Step] = [*(schema_v1.to_postgres(s) for s in V6_TABLES), *V6_COLUMNS]

# Version 7 (issue 12): operator experience.
# - ``jobs.submitter``: who the work is for (the spec's ``submitter``), and ``jobs.fair``: the
#   submitter's fair-share level (0 = least recent use), kept by the leader's fair-share tick;
#   the claim orders pending jobs by priority, then fair level, then seq, so the claim index
#   is rebuilt with ``fair`` after ``priority``. ``jobs.charged_at``: up to when the current
#   attempt's time has been charged to its submitter.
# - ``fair_usage``: each submitter's decayed use in job-hours as of ``at``, and its level.
# - ``jobs.origin``: 'submit' for a job added by ``trainfleet submit`` (kept across reloads),
#   else 'manifest' (a run's, a market's or a pipeline's jobs are told apart by their kind).
# - a job with ``after`` starts in state 'waiting' (no column: the state says it).
V7_COLUMNS = AddColumns(
    "jobs",
    (
        ("submitter", "TEXT NOT NULL DEFAULT 'operator'"),
        ("fair", "INTEGER NOT NULL DEFAULT 0"),
        ("charged_at", "REAL"),
        ("origin", "TEXT NOT NULL DEFAULT 'manifest'"),
    ),
)
V7_TABLES = [
    "CREATE TABLE IF NOT EXISTS fair_usage (submitter TEXT PRIMARY KEY,"
    " usage_h REAL NOT NULL DEFAULT 0, at REAL NOT NULL, level INTEGER NOT NULL DEFAULT 0)",
]
V7_INDEXES: list[Step] = [
    "DROP INDEX IF EXISTS jobs_pending_claim",
    "CREATE INDEX IF NOT EXISTS jobs_pending_claim ON jobs (priority DESC, fair, seq,"
    " allowed_hosts, require_cuda, min_vram_gib, min_ram_gib, min_cores, tier, in_manifest,"
    " pinned) WHERE state = 'pending'",
    "CREATE INDEX IF NOT EXISTS jobs_by_submitter ON jobs (submitter, state)",
]
V7_SQLITE: list[Step] = [V7_COLUMNS, *V7_TABLES, *V7_INDEXES]
V7_POSTGRES: list[Step] = [
    V7_COLUMNS,
    *(schema_v1.to_postgres(s) for s in V7_TABLES),
    *V7_INDEXES,
]

# Version 8 (issue 9): the events of a job are found by the job's ``seq`` (``events.job_seq``,
# with ``job_id`` still on every row) instead of by its id. The id is a hash, so an index on
# it takes each new event at a random place: one more page of the log written per event
# (measured with ``bench.queue_inproc``: 3.7 of the 7.7 pages the write-ahead log took per
# claim cycle were that index's). Jobs are claimed in about their ``seq`` order, so the
# events of the jobs in flight land on a few pages. Every insert fills ``job_seq`` from the
# job's row (``sqlite_schema.insert_event``); jobs are never deleted.
# The indexes every query of which asks for active jobs only (a worker's held jobs, the
# reaper's silent ones) hold only those rows now: a handful instead of the whole table, so
# a finished job leaves them and no write touches them after.
V8_STEPS: list[Step] = [
    AddColumns("events", (("job_seq", "INTEGER"),)),
    "UPDATE events SET job_seq = jobs.seq FROM jobs WHERE jobs.id = events.job_id",  # a join
    "CREATE INDEX IF NOT EXISTS events_by_job_seq ON events (job_seq, seq)",
    "DROP INDEX IF EXISTS events_by_job",
    "DROP INDEX IF EXISTS jobs_by_worker",
    "CREATE INDEX IF NOT EXISTS jobs_by_worker ON jobs (worker_id)"
    " WHERE state IN ('claimed', 'running')",
    "DROP INDEX IF EXISTS jobs_by_lease",
    "CREATE INDEX IF NOT EXISTS jobs_by_lease ON jobs (heartbeat_at)"
    " WHERE state IN ('claimed', 'running')",
]

# Version 9 (issue 9): PostgreSQL's claim index ends its order with ``id``. A claim there reads
# the pending rows in keyset pages ordered by ``priority DESC, fair, seq, id``
# (``claims._pending``; ``id`` breaks ties so a page boundary never skips a row); with the
# index ordered only to ``seq``, the planner read every pending row the worker could take and
# sorted them for each page (3,800 rows, 4-7 ms, in ``bench.queue``'s PostgreSQL arm). With
# ``id`` in the index the page is its first rows. SQLite reads the scan lazily in the index's
# order without ``id`` and keeps its index.
V9_POSTGRES: list[Step] = [
    "DROP INDEX IF EXISTS jobs_pending_claim",
    "CREATE INDEX IF NOT EXISTS jobs_pending_claim ON jobs (priority DESC, fair, seq, id,"
    " allowed_hosts, require_cuda, min_vram_gib, min_ram_gib, min_cores, tier, in_manifest,"
    " pinned) WHERE state = 'pending'",
]

MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "issue-8 schema",
        [*schema_v1.sqlite_statements(), schema_v1.add_legacy_columns],
        schema_v1.postgres_statements(),
    ),
    Migration(
        2, "job columns kind/run_id/round/replica/timeout_s, lease index", V2_SQLITE, V2_POSTGRES
    ),
    Migration(3, "worker slots, jobs by worker, workers by host", V3_STEPS, V3_STEPS),
    Migration(4, "market, attestation, tiers", V4_SQLITE, V4_POSTGRES),
    Migration(5, "jobs.allowed_hosts for the claim's filter", V5_SQLITE, V5_POSTGRES),
    Migration(6, "pipelines, the durable ref queue, jobs.pipeline_id", V6_SQLITE, V6_POSTGRES),
    Migration(
        7,
        "submitters and fair share, job origin, waiting jobs, claim index with fair level",
        V7_SQLITE,
        V7_POSTGRES,
    ),
    Migration(8, "events found by their job's seq, indexes of active jobs", V8_STEPS, V8_STEPS),
    Migration(9, "PostgreSQL's claim index in the claim's keyset order", [], V9_POSTGRES),
]


def latest() -> int:
    """The newest schema version this code knows."""
    return MIGRATIONS[-1].version


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands. ``version`` 0: empty; ``untracked``: issue-8 tables without
    ``schema_migrations`` (version 1, adopted on upgrade)."""

    version: int
    untracked: bool = False
    known: int = field(default_factory=latest)

    @property
    def pending(self) -> list[Migration]:
        """What ``migrate`` would apply, in order (raises ``SchemaTooNew`` past ``known``)."""
        self.check()
        first = 1 if self.untracked else self.version + 1
        return [m for m in MIGRATIONS if m.version >= first]

    def check(self) -> None:
        if self.version > self.known:
            raise SchemaTooNew(
                f"database schema is version {self.version}; this trainfleet knows up to"
                f" {self.known}: upgrade trainfleet"
            )


def schema_state(db: Database) -> SchemaState:
    with db.read() as conn:
        return _read_state(conn)


def migrate(db: Database, *, dry_run: bool = False, to: int | None = None) -> list[Migration]:
    """Bring ``db`` up to the latest version (or version ``to``); return the migrations
    applied (with ``dry_run``: those it would apply, changing nothing). Raises
    ``SchemaTooNew`` before any write."""
    plan = [m for m in schema_state(db).pending if to is None or m.version <= to]
    if dry_run:
        return plan
    applied = []
    for migration in plan:
        with db.tx() as conn:
            state = _read_state(conn)  # again, under the lock: another process may have won
            if migration not in state.pending:
                continue
            for step in migration.steps(conn.dialect):
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            _record(conn, migration)
        applied.append(migration)
    return applied


def _record(conn: Conn, migration: Migration) -> None:
    real = "DOUBLE PRECISION" if conn.dialect == Dialect.POSTGRES else "REAL"
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        f" (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL)"
    )
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
        (migration.version, migration.name, time.time()),
    )


def _read_state(conn: Conn) -> SchemaState:
    if _has_table(conn, "schema_migrations"):
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        version = row[0] or 0
        if not isinstance(version, int) or version < 0:  # compared with ints next: no 500
            raise SchemaUnknown(
                f"schema_migrations holds version {str(version)[:40]!r}, not one trainfleet"
                " writes: this database belongs to something else"
            )
        return SchemaState(version)
    if _has_table(conn, "jobs"):
        return SchemaState(1, untracked=True)
    return SchemaState(0)


def _has_table(conn: Conn, name: str) -> bool:
    if conn.dialect == Dialect.POSTGRES:  # in the schema the search_path resolves to
        sql = (
            "SELECT 1 FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = ?"
        )
    else:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return conn.execute(sql, (name,)).fetchone() is not None

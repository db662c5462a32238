"""Schema version 1: the tables exactly as the issue-8 release made them.

Kept verbatim, never edited: a database from that release is version 1, and every later
change is a new migration in ``migrations``. The release made its tables with this DDL
(``CREATE ... IF NOT EXISTS``) and then added two columns that older files lacked
(``LEGACY_COLUMNS``); running both again on such a file is a no-op except for what it is
missing, which is how an untracked issue-8 file is adopted as version 1.

PostgreSQL never ran the issue-8 release; its version 1 is a mechanical translation of the
same DDL (``postgres_statements``), so both backends share one history from then on.
"""

from __future__ import annotations

import re

from trainfleet.queue.db import Conn

SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, policy TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    require_cuda INTEGER NOT NULL,
    min_vram_gib REAL NOT NULL,
    min_ram_gib REAL NOT NULL,
    min_cores INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    num_failures INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    host TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    pending_since REAL,
    claimed_at REAL,
    heartbeat_at REAL,
    finished_at REAL,
    in_manifest INTEGER NOT NULL DEFAULT 1,
    pinned INTEGER NOT NULL DEFAULT 0,
    manifest_hash TEXT NOT NULL,
    result TEXT,
    error TEXT,
    flags TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_by_claim_order ON jobs (state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (name);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    worker_id TEXT,
    epoch INTEGER,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    capability TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    current_job TEXT
);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    at REAL NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_job ON logs (job_id, seq);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    name TEXT NOT NULL,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    capability TEXT NOT NULL,
    manifest_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_job ON artifacts (job_id);
CREATE TABLE IF NOT EXISTS routers (
    fit_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    body TEXT NOT NULL,
    published_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shard_hashes (
    dataset_digest TEXT NOT NULL,
    shard_key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    job_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (dataset_digest, shard_key)
);
CREATE TABLE IF NOT EXISTS shard_plans (
    dataset_digest TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    shards TEXT NOT NULL,
    planned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollments (
    host TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    rotated_at REAL NOT NULL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs
    (json_extract(spec, '$.task.run_id'), json_extract(spec, '$.task.round'));
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    num_rounds INTEGER NOT NULL,
    weights TEXT,
    weights_size INTEGER NOT NULL DEFAULT 0,
    momentum TEXT,
    in_manifest INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs (name, seq);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    weights TEXT NOT NULL,
    weights_size INTEGER NOT NULL,
    target_s REAL,
    opened_at REAL NOT NULL,
    quorum_at REAL,
    closed_at REAL,
    accepted INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    late_applied INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    heldout_loss REAL,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    next_weights TEXT,
    wall_s REAL,
    detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, round)
);
CREATE INDEX IF NOT EXISTS rounds_by_weights ON rounds (weights);
CREATE TABLE IF NOT EXISTS contributions (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    replica INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    norm REAL,
    inner_steps_done INTEGER NOT NULL DEFAULT 0,
    compute_s REAL,
    staleness INTEGER NOT NULL DEFAULT 0,
    applied_in_round INTEGER,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, epoch)
);
CREATE INDEX IF NOT EXISTS contributions_by_round ON contributions (run_id, round, replica);
CREATE TABLE IF NOT EXISTS log_usage (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    chars INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt)
);
"""

# Columns added after a table's first release: (table, column, DDL), added when missing.
LEGACY_COLUMNS = (
    ("jobs", "flags", "ALTER TABLE jobs ADD COLUMN flags TEXT NOT NULL DEFAULT '[]'"),
    ("jobs", "pinned", "ALTER TABLE jobs ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"),
)


def statements(ddl: str) -> list[str]:
    """One DDL script as single statements: a migration runs them inside its own
    transaction, which ``executescript`` would commit."""
    return [s.strip() for s in ddl.split(";") if s.strip()]


def sqlite_statements() -> list[str]:
    return statements(SQLITE_DDL)


def add_legacy_columns(conn: Conn) -> None:
    """Add the columns a file from before the issue-8 column migrations lacks."""
    for table, column, ddl in LEGACY_COLUMNS:
        columns = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(ddl)


def postgres_statements() -> list[str]:
    """The same tables in PostgreSQL types: 64-bit integers (sizes, byte counts and seqs
    outgrow 32 bits), DOUBLE PRECISION for REAL, identity columns for AUTOINCREMENT.

    The one expression index (``jobs_by_task``, on json_extract of the spec) is left out:
    it only served SQLite's JSON queries, and version 2 replaces it by real columns on both.
    """
    return [to_postgres(s) for s in sqlite_statements() if "json_extract" not in s]


def to_postgres(sql: str) -> str:
    sql = sql.replace(
        "INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    )
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)

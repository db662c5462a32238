"""The SQLite queue's tables, and how their rows are read and written.

This is the storage layer under ``SQLiteQueue``: the DDL, how a connection is opened (WAL,
busy timeout), the converters from ``sqlite3.Row`` to the backend-neutral records of
``queue.base``, and the few row helpers every operation shares (meta values, host policies,
job lookup, the event log). Nothing here opens a transaction; callers pass a connection that
is already inside one where they need atomicity.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable

from trainfleet.capability.model import Capability
from trainfleet.capability.policy import effective_capability
from trainfleet.errors import BadRequest, NotFound
from trainfleet.manifest.spec import HostPolicy, JobSpec
from trainfleet.queue.base import (
    ArtifactRecord,
    Event,
    JobRecord,
    JobRef,
    LogLine,
    WorkerRecord,
)

SCHEMA = """
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
MIGRATIONS = (
    ("jobs", "flags", "ALTER TABLE jobs ADD COLUMN flags TEXT NOT NULL DEFAULT '[]'"),
    ("jobs", "pinned", "ALTER TABLE jobs ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"),
)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an earlier release up to ``SCHEMA``."""
    for table, column, ddl in MIGRATIONS:
        columns = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(ddl)


def connect(path: str) -> sqlite3.Connection:
    """Open a connection in autocommit mode (transactions are explicit), rows by name."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def token_hash(token: str) -> str:
    """What is stored for a worker's bearer token: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


# rows -> records ------------------------------------------------------------------------
def job_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        name=row["name"],
        state=row["state"],
        spec=JobSpec.model_validate_json(row["spec"]),
        priority=row["priority"],
        attempt=row["attempt"],
        num_failures=row["num_failures"],
        epoch=row["epoch"],
        worker_id=row["worker_id"],
        host=row["host"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        pending_since=row["pending_since"],
        claimed_at=row["claimed_at"],
        heartbeat_at=row["heartbeat_at"],
        finished_at=row["finished_at"],
        in_manifest=bool(row["in_manifest"]),
        pinned=bool(row["pinned"]),
        manifest_hash=row["manifest_hash"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        flags=json.loads(row["flags"]),
    )


def worker_record(
    row: sqlite3.Row,
    hosts: dict[str, HostPolicy],
    clock: Callable[[], float],
    offline_after_s: float,
) -> WorkerRecord:
    """An online worker not seen for ``offline_after_s`` is reported as offline."""
    cap = Capability.model_validate_json(row["capability"])
    effective, notes = effective_capability(cap, hosts.get(row["host"]))
    state = row["state"]
    if state == "online" and clock() - row["last_seen"] > offline_after_s:
        state = "offline"
    return WorkerRecord(
        id=row["id"],
        host=row["host"],
        capability=cap,
        effective=effective,
        notes=notes,
        state=state,
        registered_at=row["registered_at"],
        last_seen=row["last_seen"],
        current_job=row["current_job"],
    )


def event_record(row: sqlite3.Row) -> Event:
    return Event(**dict(row))


def log_line(row: sqlite3.Row) -> LogLine:
    return LogLine(**dict(row))


def artifact_record(row: sqlite3.Row) -> ArtifactRecord:
    d = dict(row)
    d.pop("id")
    d["capability"] = Capability.model_validate_json(d["capability"])
    return ArtifactRecord(**d)


# shared row helpers ---------------------------------------------------------------------
def read_meta(conn: sqlite3.Connection, key: str, default: str) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row["value"] if row else default


def read_hosts(conn: sqlite3.Connection) -> dict[str, HostPolicy]:
    """The host policies of the last applied manifest, by host name."""
    rows = conn.execute("SELECT name, policy FROM hosts").fetchall()
    return {r["name"]: HostPolicy.model_validate_json(r["policy"]) for r in rows}


def insert_event(
    conn: sqlite3.Connection,
    at: float,
    job_id: str,
    kind: str,
    from_state: str | None,
    to_state: str | None,
    worker_id: str | None = None,
    epoch: int | None = None,
    detail: str = "",
) -> None:
    """Append one transition (or note) to a job's event log."""
    conn.execute(
        "INSERT INTO events (job_id, at, kind, from_state, to_state, worker_id, epoch, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (job_id, at, kind, from_state, to_state, worker_id, epoch, detail),
    )


def load_job(conn: sqlite3.Connection, job_id: str) -> JobRecord:
    """The job with exactly this id, as it stands now."""
    return job_record(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def find_job_row(conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
    """Resolve a job reference: a full id, a name, or an unambiguous hex id prefix.

    A name several jobs had (editing a job's hyperparameters makes a new job under the same
    name) resolves to the one in the current manifest; ``same_name_refs`` lists the others.
    """
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (ref,)).fetchone()
    if row is not None:
        return row
    rows = conn.execute("SELECT * FROM jobs WHERE name = ? ORDER BY seq", (ref,)).fetchall()
    current = [r for r in rows if r["in_manifest"]]
    if len(rows) > 1 and len(current) == 1:
        return current[0]
    if not rows and len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref):
        rows = conn.execute(
            "SELECT * FROM jobs WHERE id >= ? AND id < ? ORDER BY seq LIMIT 2",
            (ref, ref + "g"),
        ).fetchall()
    if len(rows) > 1:
        names = ", ".join(f"{r['name']} ({r['id'][:12]}, {r['state']})" for r in rows)
        raise BadRequest(f"{ref!r} is ambiguous: {names}; use a longer id")
    if not rows:
        raise NotFound(f"no job {ref!r}")
    return rows[0]


def same_name_refs(conn: sqlite3.Connection, job_id: str) -> list[JobRef]:
    """The other jobs named like ``job_id``, oldest first."""
    rows = conn.execute(
        "SELECT id, name, state, in_manifest, created_at FROM jobs"
        " WHERE name = (SELECT name FROM jobs WHERE id = ?) AND id != ? ORDER BY seq",
        (job_id, job_id),
    ).fetchall()
    return [
        JobRef(
            id=r["id"],
            name=r["name"],
            state=r["state"],
            in_manifest=bool(r["in_manifest"]),
            created_at=r["created_at"],
        )
        for r in rows
    ]


def scheduling_columns(spec: JobSpec) -> tuple[str, int, int, float, float, int]:
    """spec, priority, require_cuda, min_vram_gib, min_ram_gib, min_cores: what a claim's SQL
    prefilter reads, kept in columns beside the JSON spec."""
    return (
        spec.model_dump_json(),
        spec.priority,
        int(spec.require_cuda),
        spec.min_vram_gib,
        spec.min_ram_gib,
        spec.min_cores,
    )

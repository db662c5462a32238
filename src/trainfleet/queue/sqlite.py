"""SQLite backend of the job queue (WAL mode; one coordinator process).

Every state change runs inside ``BEGIN IMMEDIATE``, which takes SQLite's single write lock up
front, so a claim's read-check-write is atomic: two workers can never claim the same job, and
a fenced write can never interleave with a requeue. Each thread gets its own connection.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainfleet.capability.model import Capability
from trainfleet.capability.policy import effective_capability
from trainfleet.errors import BadRequest, Conflict, NotFound, StaleEpoch, Unauthorized
from trainfleet.manifest.identity import manifest_hash
from trainfleet.manifest.spec import HostPolicy, JobSpec, Manifest
from trainfleet.queue.base import (
    ACTIVE_STATES,
    ArtifactRecord,
    Claim,
    Event,
    HeartbeatReply,
    JobQueue,
    JobRecord,
    LogLine,
    PlanEntry,
    QueueSettings,
    ReloadPlan,
    WorkerRecord,
)
from trainfleet.queue.explain import explain_job
from trainfleet.queue.matching import blockers
from trainfleet.queue.reload import Diff, StoredJob, diff_manifest
from trainfleet.queue.scheduling import Candidate, deferrals

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
    manifest_hash TEXT NOT NULL,
    result TEXT,
    error TEXT
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
"""

_MAX_LOG_LINE = 4096


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SQLiteQueue(JobQueue):
    """The queue on one SQLite file. ``clock`` is injectable so tests control time."""

    def __init__(
        self,
        path: str | Path,
        settings: QueueSettings | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.path = str(path)
        self.settings = settings or QueueSettings()
        self.clock = clock
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(SCHEMA)

    # connections & transactions ---------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # helpers ----------------------------------------------------------------------------
    def _meta(self, conn: sqlite3.Connection, key: str, default: str) -> str:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def _hosts(self, conn: sqlite3.Connection) -> dict[str, HostPolicy]:
        rows = conn.execute("SELECT name, policy FROM hosts").fetchall()
        return {r["name"]: HostPolicy.model_validate_json(r["policy"]) for r in rows}

    def _event(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        kind: str,
        from_state: str | None,
        to_state: str | None,
        worker_id: str | None = None,
        epoch: int | None = None,
        detail: str = "",
    ) -> None:
        conn.execute(
            "INSERT INTO events (job_id, at, kind, from_state, to_state, worker_id, epoch, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, self.clock(), kind, from_state, to_state, worker_id, epoch, detail),
        )

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
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
            manifest_hash=row["manifest_hash"],
            result=json.loads(row["result"]) if row["result"] else None,
            error=row["error"],
        )

    def _worker(self, row: sqlite3.Row, hosts: dict[str, HostPolicy]) -> WorkerRecord:
        cap = Capability.model_validate_json(row["capability"])
        effective, notes = effective_capability(cap, hosts.get(row["host"]))
        state = row["state"]
        if state == "online" and self.clock() - row["last_seen"] > self.settings.offline_after_s:
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

    def _get_row(self, conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (ref,)).fetchone()
        if row is not None:
            return row
        rows = conn.execute("SELECT * FROM jobs WHERE name = ? ORDER BY seq", (ref,)).fetchall()
        if not rows and len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref):
            rows = conn.execute(
                "SELECT * FROM jobs WHERE id >= ? AND id < ? ORDER BY seq LIMIT 2",
                (ref, ref + "g"),
            ).fetchall()
        if len(rows) > 1:
            names = ", ".join(f"{r['name']} ({r['id'][:12]})" for r in rows)
            raise BadRequest(f"{ref!r} is ambiguous: {names}; use a longer id")
        if not rows:
            raise NotFound(f"no job {ref!r}")
        return rows[0]

    def _fenced(
        self, conn: sqlite3.Connection, job_id: str, worker_id: str, epoch: int
    ) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        if row["epoch"] != epoch or row["worker_id"] != worker_id:
            raise StaleEpoch(
                f"epoch {epoch} of job {row['name']} is stale (current epoch {row['epoch']});"
                " this claim was written off and the job handed elsewhere",
                current_epoch=row["epoch"],
            )
        if row["state"] == "cancelled":
            raise Conflict(f"job {row['name']} was cancelled; nothing more is accepted for it")
        if row["state"] not in ACTIVE_STATES:
            raise Conflict(f"job {row['name']} is {row['state']}, not active")
        return row

    # operator ---------------------------------------------------------------------------
    def apply_manifest(self, manifest: Manifest, *, dry_run: bool = False) -> ReloadPlan:
        mhash = manifest_hash(manifest)
        with self._tx() as conn:
            stored = [
                StoredJob(
                    id=r["id"],
                    name=r["name"],
                    state=r["state"],
                    spec=JobSpec.model_validate_json(r["spec"]),
                    in_manifest=bool(r["in_manifest"]),
                )
                for r in conn.execute("SELECT id, name, state, spec, in_manifest FROM jobs")
            ]
            diff = diff_manifest(manifest, stored)
            if not dry_run:
                self._apply_diff(conn, manifest, mhash, diff)
        return ReloadPlan(
            manifest_hash=mhash,
            added=[
                PlanEntry(id=jid, name=spec.name, state=None if dry_run else "pending")
                for jid, spec in diff.added
            ],
            kept=diff.kept,
            changed=[entry for entry, _ in diff.changed],
            removed=diff.removed,
            applied=not dry_run,
        )

    def _apply_diff(
        self, conn: sqlite3.Connection, manifest: Manifest, mhash: str, diff: Diff
    ) -> None:
        now = self.clock()
        conn.execute("DELETE FROM hosts")
        conn.executemany(
            "INSERT INTO hosts (name, policy) VALUES (?, ?)",
            [(name, p.model_dump_json()) for name, p in manifest.hosts.items()],
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('prefer_cuda_wait_s', ?)",
            (str(manifest.defaults.prefer_cuda_wait_s),),
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('manifest_hash', ?)", (mhash,)
        )
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
        for jid, spec in diff.added:
            seq += 1
            conn.execute(
                "INSERT INTO jobs (id, seq, name, spec, state, priority, require_cuda,"
                " min_vram_gib, min_ram_gib, min_cores, created_at, updated_at, pending_since,"
                " manifest_hash) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    jid,
                    seq,
                    spec.name,
                    spec.model_dump_json(),
                    spec.priority,
                    int(spec.require_cuda),
                    spec.min_vram_gib,
                    spec.min_ram_gib,
                    spec.min_cores,
                    now,
                    now,
                    now,
                    mhash,
                ),
            )
            self._event(conn, jid, "added", None, "pending", detail=f"manifest {mhash[:12]}")
        for entry, spec in diff.changed:
            conn.execute(
                "UPDATE jobs SET spec = ?, priority = ?, require_cuda = ?, min_vram_gib = ?,"
                " min_ram_gib = ?, min_cores = ?, in_manifest = 1, updated_at = ? WHERE id = ?",
                (
                    spec.model_dump_json(),
                    spec.priority,
                    int(spec.require_cuda),
                    spec.min_vram_gib,
                    spec.min_ram_gib,
                    spec.min_cores,
                    now,
                    entry.id,
                ),
            )
            self._event(conn, entry.id, "changed", None, None, detail=json.dumps(entry.changes))
        for entry in diff.removed:
            conn.execute(
                "UPDATE jobs SET in_manifest = 0, updated_at = ? WHERE id = ?", (now, entry.id)
            )
            self._event(conn, entry.id, "removed", None, None, detail="no longer in the manifest")

    def cancel(self, job_id: str, reason: str = "cancelled by operator") -> JobRecord:
        with self._tx() as conn:
            row = self._get_row(conn, job_id)
            if row["state"] in ("completed", "failed", "cancelled"):
                raise Conflict(f"job {row['name']} is already {row['state']}")
            now = self.clock()
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?"
                " WHERE id = ?",
                (now, now, reason, row["id"]),
            )
            if row["worker_id"]:
                conn.execute(
                    "UPDATE workers SET current_job = NULL WHERE id = ? AND current_job = ?",
                    (row["worker_id"], row["id"]),
                )
            self._event(conn, row["id"], "cancelled", row["state"], "cancelled", detail=reason)
            return self._job(
                conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
            )

    def requeue(self, job_id: str, reason: str = "requeued by operator") -> JobRecord:
        with self._tx() as conn:
            row = self._get_row(conn, job_id)
            if row["state"] == "pending":
                raise Conflict(f"job {row['name']} is already pending")
            now = self.clock()
            # Bumping the epoch fences off a worker still running the old attempt.
            conn.execute(
                "UPDATE jobs SET state = 'pending', epoch = epoch + 1, num_failures = 0,"
                " worker_id = NULL, host = NULL, pending_since = ?, updated_at = ?,"
                " finished_at = NULL, error = NULL, result = NULL WHERE id = ?",
                (now, now, row["id"]),
            )
            if row["worker_id"]:
                conn.execute(
                    "UPDATE workers SET current_job = NULL WHERE id = ? AND current_job = ?",
                    (row["worker_id"], row["id"]),
                )
            self._event(conn, row["id"], "requeued", row["state"], "pending", detail=reason)
            return self._job(
                conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
            )

    # workers ----------------------------------------------------------------------------
    def register_worker(self, capability: Capability) -> tuple[WorkerRecord, str]:
        token = secrets.token_urlsafe(32)
        worker_id = f"{capability.host}-{secrets.token_hex(3)}"
        now = self.clock()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO workers (id, host, capability, token_hash, state, registered_at,"
                " last_seen) VALUES (?, ?, ?, ?, 'online', ?, ?)",
                (
                    worker_id,
                    capability.host,
                    capability.model_dump_json(),
                    _token_hash(token),
                    now,
                    now,
                ),
            )
            row = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone()
            return self._worker(row, self._hosts(conn)), token

    def authenticate_worker(self, token: str) -> str:
        row = (
            self._conn()
            .execute("SELECT id, state FROM workers WHERE token_hash = ?", (_token_hash(token),))
            .fetchone()
        )
        if row is None:
            raise Unauthorized("unknown worker credential; register again")
        if row["state"] == "stopped":
            raise Unauthorized(f"worker {row['id']} has deregistered; register again")
        return str(row["id"])

    def deregister_worker(self, worker_id: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE workers SET state = 'stopped', last_seen = ? WHERE id = ?",
                (self.clock(), worker_id),
            )

    def _touch(self, conn: sqlite3.Connection, worker_id: str) -> sqlite3.Row:
        conn.execute(
            "UPDATE workers SET last_seen = ?, state = 'online' WHERE id = ?",
            (self.clock(), worker_id),
        )
        row = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone()
        if row is None:
            raise NotFound(f"no worker {worker_id!r}")
        return row

    def _candidates(
        self, conn: sqlite3.Connection, hosts: dict[str, HostPolicy]
    ) -> list[Candidate]:
        now = self.clock()
        out = []
        for row in conn.execute("SELECT * FROM workers WHERE state = 'online'"):
            cap, _ = effective_capability(
                Capability.model_validate_json(row["capability"]), hosts.get(row["host"])
            )
            idle = (
                row["current_job"] is None and now - row["last_seen"] <= self.settings.idle_window_s
            )
            out.append(Candidate(row["id"], cap, hosts.get(row["host"]), idle))
        return out

    def claim(self, worker_id: str) -> Claim | None:
        self.reap()
        with self._tx() as conn:
            wrow = self._touch(conn, worker_id)
            if wrow["current_job"] is not None:
                held = conn.execute(
                    "SELECT state, epoch FROM jobs WHERE id = ?", (wrow["current_job"],)
                ).fetchone()
                if held is not None and held["state"] in ACTIVE_STATES:
                    raise Conflict(
                        f"worker {worker_id} still holds job {wrow['current_job'][:12]};"
                        " complete or fail it first"
                    )
            hosts = self._hosts(conn)
            policy = hosts.get(wrow["host"])
            cap, _ = effective_capability(
                Capability.model_validate_json(wrow["capability"]), policy
            )
            me = Candidate(worker_id, cap, policy, idle=True)
            others = self._candidates(conn, hosts)
            wait_s = float(self._meta(conn, "prefer_cuda_wait_s", "30"))
            now = self.clock()
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = 'pending'"
                " AND (require_cuda = 0 OR ?) AND min_vram_gib <= ? AND min_ram_gib <= ?"
                " AND min_cores <= ? ORDER BY priority DESC, seq",
                (int(cap.cuda), cap.vram_gib, cap.ram_gib, cap.cores),
            )
            for row in rows:
                spec = JobSpec.model_validate_json(row["spec"])
                if blockers(spec, cap, policy):
                    continue
                if deferrals(spec, me, others, now - row["pending_since"], wait_s):
                    continue
                return self._take(conn, row, worker_id, cap)
            return None

    def _take(
        self, conn: sqlite3.Connection, row: sqlite3.Row, worker_id: str, cap: Capability
    ) -> Claim:
        now = self.clock()
        epoch, attempt = row["epoch"] + 1, row["attempt"] + 1
        mhash = self._meta(conn, "manifest_hash", row["manifest_hash"])
        conn.execute(
            "UPDATE jobs SET state = 'claimed', epoch = ?, attempt = ?, worker_id = ?, host = ?,"
            " claimed_at = ?, heartbeat_at = ?, updated_at = ?, manifest_hash = ?, error = NULL"
            " WHERE id = ?",
            (epoch, attempt, worker_id, cap.host, now, now, now, mhash, row["id"]),
        )
        conn.execute("UPDATE workers SET current_job = ? WHERE id = ?", (row["id"], worker_id))
        self._event(
            conn,
            row["id"],
            "claimed",
            "pending",
            "claimed",
            worker_id,
            epoch,
            detail=f"attempt {attempt} on host {cap.host}",
        )
        job = self._job(conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())
        return Claim(job=job, epoch=epoch, attempt=attempt)

    def check_epoch(self, job_id: str, worker_id: str, epoch: int) -> JobRecord:
        return self._job(self._fenced(self._conn(), job_id, worker_id, epoch))

    def heartbeat(self, job_id: str, worker_id: str, epoch: int) -> HeartbeatReply:
        with self._tx() as conn:
            self._touch(conn, worker_id)
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if (
                row is not None
                and row["state"] == "cancelled"
                and row["epoch"] == epoch
                and row["worker_id"] == worker_id
            ):
                return HeartbeatReply(cancel=True, state="cancelled")
            row = self._fenced(conn, job_id, worker_id, epoch)
            now = self.clock()
            state = row["state"]
            if state == "claimed":
                state = "running"
                self._event(conn, job_id, "running", "claimed", "running", worker_id, epoch)
            conn.execute(
                "UPDATE jobs SET heartbeat_at = ?, state = ?, updated_at = ? WHERE id = ?",
                (now, state, now, job_id),
            )
            return HeartbeatReply(cancel=False, state=state)

    def append_log(self, job_id: str, worker_id: str, epoch: int, lines: list[str]) -> int:
        with self._tx() as conn:
            row = self._fenced(conn, job_id, worker_id, epoch)
            now = self.clock()
            conn.executemany(
                "INSERT INTO logs (job_id, attempt, epoch, at, line) VALUES (?, ?, ?, ?, ?)",
                [(job_id, row["attempt"], epoch, now, line[:_MAX_LOG_LINE]) for line in lines],
            )
            return len(lines)

    def record_artifact(
        self, job_id: str, worker_id: str, epoch: int, sha256: str, size: int, name: str
    ) -> ArtifactRecord:
        with self._tx() as conn:
            row = self._fenced(conn, job_id, worker_id, epoch)
            wrow = conn.execute("SELECT * FROM workers WHERE id = ?", (worker_id,)).fetchone()
            cap, _ = effective_capability(
                Capability.model_validate_json(wrow["capability"]),
                self._hosts(conn).get(wrow["host"]),
            )
            record = ArtifactRecord(
                sha256=sha256,
                size=size,
                name=name,
                job_id=job_id,
                attempt=row["attempt"],
                epoch=epoch,
                worker_id=worker_id,
                capability=cap,
                manifest_hash=row["manifest_hash"],
                created_at=self.clock(),
            )
            conn.execute(
                "INSERT INTO artifacts (sha256, size, name, job_id, attempt, epoch, worker_id,"
                " capability, manifest_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sha256,
                    size,
                    name,
                    job_id,
                    record.attempt,
                    epoch,
                    worker_id,
                    cap.model_dump_json(),
                    record.manifest_hash,
                    record.created_at,
                ),
            )
            self._event(
                conn,
                job_id,
                "artifact",
                None,
                None,
                worker_id,
                epoch,
                f"{name} {sha256[:12]} ({size} bytes)",
            )
            return record

    def complete(
        self, job_id: str, worker_id: str, epoch: int, result: dict[str, Any]
    ) -> JobRecord:
        with self._tx() as conn:
            row = self._fenced(conn, job_id, worker_id, epoch)
            now = self.clock()
            conn.execute(
                "UPDATE jobs SET state = 'completed', result = ?, finished_at = ?, updated_at = ?"
                " WHERE id = ?",
                (json.dumps(result), now, now, job_id),
            )
            conn.execute("UPDATE workers SET current_job = NULL WHERE id = ?", (worker_id,))
            self._event(conn, job_id, "completed", row["state"], "completed", worker_id, epoch)
            return self._job(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def fail(
        self,
        job_id: str,
        worker_id: str,
        epoch: int,
        error: str,
        *,
        retryable: bool = True,
        release: bool = False,
    ) -> JobRecord:
        with self._tx() as conn:
            row = self._fenced(conn, job_id, worker_id, epoch)
            conn.execute("UPDATE workers SET current_job = NULL WHERE id = ?", (worker_id,))
            kind = "released" if release else "attempt_failed"
            self._end_attempt(conn, row, error, count=not release, retryable=retryable, kind=kind)
            return self._job(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def _end_attempt(
        self,
        conn: sqlite3.Connection,
        row: sqlite3.Row,
        error: str,
        *,
        count: bool,
        retryable: bool,
        kind: str,
    ) -> None:
        """Close the active attempt: back to pending, or failed when attempts are used up."""
        now = self.clock()
        failures = row["num_failures"] + int(count)
        max_attempts = JobSpec.model_validate_json(row["spec"]).max_attempts
        if retryable and failures < max_attempts:
            to_state, finished = "pending", None
            detail = f"{error} (failure {failures}/{max_attempts}; requeued)" if count else error
        else:
            to_state, finished = "failed", now
            why = "not retryable" if not retryable else f"{failures}/{max_attempts} attempts used"
            detail = f"{error} ({why})"
        conn.execute(
            "UPDATE jobs SET state = ?, num_failures = ?, worker_id = CASE WHEN ? = 'pending'"
            " THEN NULL ELSE worker_id END, pending_since = ?, finished_at = ?, updated_at = ?,"
            " error = ? WHERE id = ?",
            (to_state, failures, to_state, now, finished, now, error, row["id"]),
        )
        self._event(
            conn, row["id"], kind, row["state"], to_state, row["worker_id"], row["epoch"], detail
        )

    def reap(self) -> list[JobRecord]:
        now = self.clock()
        deadline = now - self.settings.heartbeat_timeout_s
        conn = self._conn()
        # Cheap check outside the write lock; most calls find nothing.
        candidates = conn.execute(
            "SELECT id FROM jobs WHERE state IN ('claimed', 'running') AND heartbeat_at < ?"
            " UNION SELECT id FROM jobs WHERE state IN ('claimed', 'running')"
            " AND claimed_at + CAST(json_extract(spec, '$.timeout_s') AS REAL) + ? < ?",
            (deadline, self.settings.heartbeat_timeout_s, now),
        ).fetchall()
        if not candidates:
            return []
        reaped = []
        with self._tx() as conn:
            for (jid,) in candidates:
                row = conn.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
                if row["state"] not in ACTIVE_STATES:
                    continue
                timeout_s = JobSpec.model_validate_json(row["spec"]).timeout_s
                if row["heartbeat_at"] < deadline:
                    silent_s = now - row["heartbeat_at"]
                    why = f"lost: no heartbeat for {silent_s:.0f}s from {row['worker_id']}"
                elif now > row["claimed_at"] + timeout_s + self.settings.heartbeat_timeout_s:
                    why = f"timed out after {timeout_s:g}s on {row['worker_id']}"
                else:
                    continue
                conn.execute(
                    "UPDATE workers SET current_job = NULL WHERE id = ? AND current_job = ?",
                    (row["worker_id"], jid),
                )
                self._end_attempt(conn, row, why, count=True, retryable=True, kind="lost")
                reaped.append(
                    self._job(conn.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone())
                )
        return reaped

    # reads ------------------------------------------------------------------------------
    def get_job(self, ref: str) -> JobRecord:
        return self._job(self._get_row(self._conn(), ref))

    def list_jobs(self, state: str | None = None) -> list[JobRecord]:
        if state is None:
            rows = self._conn().execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        else:
            rows = (
                self._conn()
                .execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (state,))
                .fetchall()
            )
        return [self._job(r) for r in rows]

    def events(self, job_id: str) -> list[Event]:
        rows = (
            self._conn()
            .execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq", (job_id,))
            .fetchall()
        )
        return [Event(**dict(r)) for r in rows]

    def logs(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[LogLine]:
        rows = (
            self._conn()
            .execute(
                "SELECT seq, attempt, epoch, at, line FROM logs WHERE job_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            )
            .fetchall()
        )
        return [LogLine(**dict(r)) for r in rows]

    def artifacts(self, job_id: str) -> list[ArtifactRecord]:
        rows = (
            self._conn()
            .execute("SELECT * FROM artifacts WHERE job_id = ? ORDER BY id", (job_id,))
            .fetchall()
        )
        out = []
        for r in rows:
            d = dict(r)
            d.pop("id")
            d["capability"] = Capability.model_validate_json(d["capability"])
            out.append(ArtifactRecord(**d))
        return out

    def list_workers(self) -> list[WorkerRecord]:
        conn = self._conn()
        hosts = self._hosts(conn)
        rows = conn.execute("SELECT * FROM workers ORDER BY registered_at").fetchall()
        return [self._worker(r, hosts) for r in rows]

    def explain(self, ref: str) -> dict[str, Any]:
        conn = self._conn()
        job = self._job(self._get_row(conn, ref))
        hosts = self._hosts(conn)
        return explain_job(
            job,
            workers=[w for w in self.list_workers() if w.state == "online"],
            candidates=self._candidates(conn, hosts),
            hosts=hosts,
            prefer_cuda_wait_s=float(self._meta(conn, "prefer_cuda_wait_s", "30")),
            now=self.clock(),
        )

    def current_manifest_hash(self) -> str | None:
        value = self._meta(self._conn(), "manifest_hash", "")
        return value or None

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

"""Operator writes on the SQLite queue: reload a manifest, cancel a job, requeue a job.

``apply_manifest`` plans with ``queue.reload.diff_manifest`` and, unless it is a dry run,
writes the plan: host policies and defaults are replaced, new jobs are inserted as pending,
changed jobs get their new scheduling fields, and jobs gone from the manifest are only
marked (they stay until cancelled). Each function runs on a connection the caller has
already put inside a write transaction, and ``clock`` is the queue's clock.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

from trainfleet.errors import Conflict
from trainfleet.manifest.identity import manifest_hash
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue.base import JobRecord, PlanEntry, ReloadPlan
from trainfleet.queue.reload import Diff, StoredJob, diff_manifest
from trainfleet.queue.sqlite_schema import find_job_row, insert_event, load_job
from trainfleet.queue.sqlite_workers import release_worker


def _scheduling_columns(spec: JobSpec) -> tuple[str, int, int, float, float, int]:
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


def apply_manifest(
    conn: sqlite3.Connection, manifest: Manifest, clock: Callable[[], float], *, dry_run: bool
) -> ReloadPlan:
    mhash = manifest_hash(manifest)
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
        _apply_diff(conn, manifest, mhash, diff, clock)
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
    conn: sqlite3.Connection, manifest: Manifest, mhash: str, diff: Diff, clock: Callable[[], float]
) -> None:
    now = clock()
    conn.execute("DELETE FROM hosts")
    conn.executemany(
        "INSERT INTO hosts (name, policy) VALUES (?, ?)",
        [(name, p.model_dump_json()) for name, p in manifest.hosts.items()],
    )
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('prefer_cuda_wait_s', ?)",
        (str(manifest.defaults.prefer_cuda_wait_s),),
    )
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('manifest_hash', ?)", (mhash,))
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
                *_scheduling_columns(spec),
                now,
                now,
                now,
                mhash,
            ),
        )
        insert_event(conn, clock(), jid, "added", None, "pending", detail=f"manifest {mhash[:12]}")
    for entry, spec in diff.changed:
        conn.execute(
            "UPDATE jobs SET spec = ?, priority = ?, require_cuda = ?, min_vram_gib = ?,"
            " min_ram_gib = ?, min_cores = ?, in_manifest = 1, updated_at = ? WHERE id = ?",
            (*_scheduling_columns(spec), now, entry.id),
        )
        insert_event(
            conn, clock(), entry.id, "changed", None, None, detail=json.dumps(entry.changes)
        )
    for entry in diff.removed:
        conn.execute(
            "UPDATE jobs SET in_manifest = 0, updated_at = ? WHERE id = ?", (now, entry.id)
        )
        insert_event(
            conn, clock(), entry.id, "removed", None, None, detail="no longer in the manifest"
        )


def cancel(
    conn: sqlite3.Connection, ref: str, reason: str, clock: Callable[[], float]
) -> JobRecord:
    row = find_job_row(conn, ref)
    if row["state"] in ("completed", "failed", "cancelled"):
        raise Conflict(f"job {row['name']} is already {row['state']}")
    now = clock()
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?"
        " WHERE id = ?",
        (now, now, reason, row["id"]),
    )
    release_worker(conn, row["worker_id"], row["id"])
    insert_event(conn, clock(), row["id"], "cancelled", row["state"], "cancelled", detail=reason)
    return load_job(conn, row["id"])


def requeue(
    conn: sqlite3.Connection, ref: str, reason: str, clock: Callable[[], float]
) -> JobRecord:
    row = find_job_row(conn, ref)
    if row["state"] == "pending":
        raise Conflict(f"job {row['name']} is already pending")
    now = clock()
    # Bumping the epoch fences off a worker still running the old attempt.
    conn.execute(
        "UPDATE jobs SET state = 'pending', epoch = epoch + 1, num_failures = 0,"
        " worker_id = NULL, host = NULL, pending_since = ?, updated_at = ?,"
        " finished_at = NULL, error = NULL, result = NULL WHERE id = ?",
        (now, now, row["id"]),
    )
    release_worker(conn, row["worker_id"], row["id"])
    insert_event(conn, clock(), row["id"], "requeued", row["state"], "pending", detail=reason)
    return load_job(conn, row["id"])

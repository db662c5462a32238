"""Operator writes on the SQLite queue: reload a manifest, cancel a job, requeue a job.

``apply_manifest`` plans with ``queue.reload.diff_manifest`` and, unless it is a dry run,
writes the plan: host policies and defaults are replaced, new jobs are inserted as pending,
changed jobs get their new scheduling fields, and jobs gone from the manifest are marked
``in_manifest = 0``: they stay visible, an active one finishes its attempt, but a pending one
is no longer claimable, so an edited job's old version never runs ahead of the new one.
``requeue`` of a removed job is the explicit way to run it anyway: it marks the job
``pinned`` (claimable although not in the manifest) until a reload adds it back. A job
with ``after`` waits for its parents (``queue.deps``): requeue refuses a waiting job and
puts a failed one back to waiting; a reload whose ``after`` names do not resolve, or close
a cycle through submitted jobs, is refused before anything is written. Runs
(``[[runs]]``) are reloaded by ``sqlite_runs_reload.apply_runs`` and pipelines
(``[[pipelines]]``) by ``sqlite_pipelines_reload.apply_pipelines``; their jobs are not part of
the jobs' diff. Each
function runs on a connection the caller has already put inside a write transaction, and
``clock`` is the queue's clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from trainfleet.errors import Conflict
from trainfleet.manifest.identity import manifest_hash
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue import fairshare, sqlite_pipelines_reload, sqlite_runs_reload
from trainfleet.queue.base import JobRecord, PlanEntry, ReloadPlan
from trainfleet.queue.db import Conn
from trainfleet.queue.deps import check_reload, check_submit_cycle, waiting_for, waiting_text
from trainfleet.queue.reload import Diff, StoredJob, diff_manifest
from trainfleet.queue.sqlite_schema import (
    SPEC_COLUMNS,
    SPEC_MARKS,
    SPEC_SET,
    find_job_row,
    insert_event,
    load_job,
    scheduling_columns,
)
from trainfleet.queue.sqlite_workers import release_worker


def apply_manifest(
    conn: Conn, manifest: Manifest, clock: Callable[[], float], *, dry_run: bool
) -> ReloadPlan:
    mhash = manifest_hash(manifest)
    check_reload(conn, manifest)  # its ``after`` names and the submitted jobs (queue.deps)
    stored = [
        StoredJob(
            id=r["id"],
            name=r["name"],
            state=r["state"],
            spec=JobSpec.model_validate_json(r["spec"]),
            in_manifest=bool(r["in_manifest"]),
        )
        for r in conn.execute(
            "SELECT id, name, state, spec, in_manifest FROM jobs"
            " WHERE kind NOT IN ('replica', 'referee', 'producer', 'consumer')"
        )
    ]
    diff = diff_manifest(manifest, stored)
    if not dry_run:
        _apply_diff(conn, manifest, mhash, diff, clock)
    runs = sqlite_runs_reload.apply_runs(conn, manifest, clock, dry_run=dry_run)
    pipelines = sqlite_pipelines_reload.apply_pipelines(conn, manifest, clock, dry_run=dry_run)
    return ReloadPlan(
        manifest_hash=mhash,
        added=[
            PlanEntry(id=jid, name=spec.name, state=None if dry_run else initial_state(spec))
            for jid, spec in diff.added
        ],
        kept=diff.kept,
        changed=[entry for entry, _ in diff.changed],
        removed=diff.removed,
        applied=not dry_run,
        warnings=manifest.warnings,
        runs=runs,
        pipelines=pipelines,
    )


def initial_state(spec: JobSpec) -> str:
    """A new job waits for the jobs it names in ``after`` (state 'waiting'); others are
    pending at once."""
    return "waiting" if spec.after else "pending"


def _apply_diff(
    conn: Conn, manifest: Manifest, mhash: str, diff: Diff, clock: Callable[[], float]
) -> None:
    now = clock()
    conn.execute("DELETE FROM hosts")
    conn.executemany(
        "INSERT INTO hosts (name, policy) VALUES (?, ?)",
        [(name, p.model_dump_json()) for name, p in manifest.hosts.items()],
    )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('prefer_cuda_wait_s', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(manifest.defaults.prefer_cuda_wait_s),),
    )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (fairshare.META_KEY, manifest.fair_share.model_dump_json()),
    )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('manifest_hash', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (mhash,),
    )
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
    for jid, spec in diff.added:
        seq += 1
        conn.execute(
            f"INSERT INTO jobs (id, seq, name, state, {SPEC_COLUMNS}, created_at, updated_at,"
            " pending_since, manifest_hash)"
            f" VALUES (?, ?, ?, ?, {SPEC_MARKS}, ?, ?, ?, ?)",
            (
                jid,
                seq,
                spec.name,
                initial_state(spec),
                *scheduling_columns(spec, jid),
                now,
                now,
                now,
                mhash,
            ),
        )
        insert_event(
            conn, clock(), jid, "added", None, initial_state(spec), detail=f"manifest {mhash[:12]}"
        )
    for entry, spec in diff.changed:
        conn.execute(
            f"UPDATE jobs SET {SPEC_SET}, in_manifest = 1, pinned = 0, updated_at = ? WHERE id = ?",
            (*scheduling_columns(spec, entry.id), now, entry.id),
        )
        insert_event(
            conn, clock(), entry.id, "changed", None, None, detail=json.dumps(entry.changes)
        )
    for entry in diff.removed:
        conn.execute(
            "UPDATE jobs SET in_manifest = 0, updated_at = ? WHERE id = ?", (now, entry.id)
        )
        detail = "no longer in the manifest"
        if entry.state == "pending":
            detail += "; not claimable unless requeued"
        insert_event(conn, clock(), entry.id, "removed", None, None, detail=detail)


def cancel(conn: Conn, ref: str, reason: str, clock: Callable[[], float]) -> JobRecord:
    row = find_job_row(conn, ref)
    if row["state"] in ("completed", "failed", "cancelled"):
        raise Conflict(f"job {row['name']} is already {row['state']}")
    now = clock()
    fairshare.charge_ended(conn, row, now)
    conn.execute(
        "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?"
        " WHERE id = ?",
        (now, now, reason, row["id"]),
    )
    release_worker(conn, row["worker_id"], row["id"])
    insert_event(conn, clock(), row["id"], "cancelled", row["state"], "cancelled", detail=reason)
    return load_job(conn, row["id"])


def requeue(conn: Conn, ref: str, reason: str, clock: Callable[[], float]) -> JobRecord:
    row = find_job_row(conn, ref)
    # A removed job is requeued by pinning it: claimable although not in the manifest.
    pin = not row["in_manifest"]
    if row["state"] == "pending" and (row["pinned"] or not pin):
        raise Conflict(f"job {row['name']} is already pending")
    after = JobSpec.model_validate_json(row["spec"]).after
    if row["state"] == "waiting":
        raise Conflict(
            f"job {row['name']} is {waiting_text(waiting_for(conn, after))}; it runs when its"
            " parents complete"
        )
    to_state = "waiting" if after else "pending"  # a child waits for its parents again
    if after:
        check_submit_cycle(conn, row["name"], after)
    if pin:
        reason += " (removed from the manifest; pinned: claimable until a reload adds it back)"
    now = clock()
    fairshare.charge_ended(conn, row, now)
    # Bumping the epoch fences off a worker still running the old attempt.
    conn.execute(
        "UPDATE jobs SET state = ?, epoch = epoch + 1, num_failures = 0,"
        " worker_id = NULL, host = NULL, pending_since = ?, updated_at = ?,"
        " finished_at = NULL, error = NULL, result = NULL, pinned = ? WHERE id = ?",
        (to_state, now, now, int(pin or row["pinned"]), row["id"]),
    )
    release_worker(conn, row["worker_id"], row["id"])
    insert_event(conn, clock(), row["id"], "requeued", row["state"], to_state, detail=reason)
    return load_job(conn, row["id"])

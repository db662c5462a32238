"""Collaborative runs on the SQLite queue: the runs, rounds and contributions tables' SQL.

Rules kept here (the round rules themselves are ``coordinator.rounds``'s; a reload's are
``sqlite_runs_reload``'s):

- A replica completion (``complete_replica``) completes the job and records one contribution
  per (job, epoch) in the same transaction, with its ``staleness`` (open round minus the
  task's round): an accepted one is ``dropped`` at once when the run is over, when it is
  more than ``max_staleness`` rounds late, or when its slot already has an accepted one. The
  coordinator's verdict is stored in the job's result (``result.verdict``). The same
  completion again records nothing (it is answered from the stored job).
- ``close_round`` writes a close in one transaction (or nothing, if the round is not open
  any more): contributions applied / refused / dropped, the round's figures, pending tasks
  of the closed round cancelled (running ones finish; they apply late), the next round and
  its tasks opened, or the run completed.
- Claim affinity is ``sqlite_attempts.affinity_wait``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from trainfleet.errors import NotFound
from trainfleet.manifest.identity import job_id
from trainfleet.manifest.runs import RunSpec
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue import sqlite_attempts
from trainfleet.queue.base import JobRecord
from trainfleet.queue.db import Conn, Row
from trainfleet.queue.runs_base import (
    ContributionRecord,
    ContributionStatus,
    RoundOutcome,
    RoundRecord,
    RoundStatus,
    RunRecord,
    Verdict,
)
from trainfleet.queue.sqlite_schema import (
    SPEC_COLUMNS,
    SPEC_MARKS,
    insert_event,
    load_job,
    read_meta,
    scheduling_columns,
)

TASK_RUN = "run_id"  # a replica job's run (NULL for other jobs)


# rows -> records --------------------------------------------------------------------------
def run_record(row: Row | dict[str, Any]) -> RunRecord:
    d = dict(row)
    d.pop("seq")
    d["spec"] = RunSpec.model_validate_json(d["spec"])
    d["in_manifest"] = bool(d["in_manifest"])
    return RunRecord(**d)


def round_record(row: Row) -> RoundRecord:
    return RoundRecord(**dict(row))


def contribution_record(row: Row) -> ContributionRecord:
    return ContributionRecord(**dict(row))


def _run_row(conn: Conn, rid: str) -> Row:
    row = conn.execute("SELECT * FROM runs WHERE id = ?", (rid,)).fetchone()
    if row is None:
        raise NotFound(f"no run {rid!r}")
    return row


def get_run(conn: Conn, ref: str) -> RunRecord:
    row = conn.execute("SELECT * FROM runs WHERE id = ?", (ref,)).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT * FROM runs WHERE name = ? ORDER BY seq DESC LIMIT 1", (ref,)
        ).fetchone()
    if row is None:
        raise NotFound(f"no run {ref!r}")
    return run_record(row)


def set_claimable(conn: Conn, rid: str, claimable: bool, now: float) -> None:
    conn.execute(
        f"UPDATE jobs SET in_manifest = ?, updated_at = ? WHERE {TASK_RUN} = ?",
        (int(claimable), now, rid),
    )


def cancel_tasks(
    conn: Conn,
    rid: str,
    round: int | None,
    reason: str,
    clock: Callable[[], float],
    *,
    active: bool,
) -> int:
    """Cancel a run's pending tasks (of one round, or all); with ``active`` its running ones
    too (their workers see it at the next heartbeat)."""
    states = ("pending", "claimed", "running") if active else ("pending",)
    sql = f"SELECT * FROM jobs WHERE {TASK_RUN} = ? AND state IN ({','.join('?' * len(states))})"
    args: list[Any] = [rid, *states]
    if round is not None:
        sql += " AND round = ?"
        args.append(round)
    rows = conn.execute(sql, args).fetchall()
    now = clock()
    for row in rows:
        conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?"
            " WHERE id = ?",
            (now, now, reason, row["id"]),
        )
        if row["worker_id"] is not None:
            conn.execute(
                "UPDATE workers SET current_job = NULL WHERE id = ? AND current_job = ?",
                (row["worker_id"], row["id"]),
            )
        insert_event(conn, now, row["id"], "cancelled", row["state"], "cancelled", detail=reason)
    return len(rows)


# tasks and rounds -------------------------------------------------------------------------
def scheduling_fields(spec: RunSpec) -> dict[str, Any]:
    """What a replica job copies from its run (reload may change these)."""
    return {
        "priority": spec.priority,
        "require_cuda": spec.require_cuda,
        "min_vram_gib": spec.min_vram_gib,
        "min_ram_gib": spec.min_ram_gib,
        "min_cores": spec.min_cores,
        "allowed_hosts": spec.allowed_hosts,
        "max_failures": spec.max_failures,
        "timeout_s": spec.timeout_s,
        "tier": spec.tier,
    }


def _insert_tasks(conn: Conn, tasks: list[JobSpec], now: float, claimable: bool) -> None:
    mhash = read_meta(conn, "manifest_hash", "")
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0]
    for spec in tasks:
        seq += 1
        jid = job_id(spec)
        conn.execute(
            f"INSERT INTO jobs (id, seq, name, state, {SPEC_COLUMNS}, created_at, updated_at,"
            f" pending_since, manifest_hash, in_manifest) VALUES (?, ?, ?, 'pending', {SPEC_MARKS},"
            " ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (
                jid,
                seq,
                spec.name,
                *scheduling_columns(spec, jid),
                now,
                now,
                now,
                mhash,
                int(claimable),
            ),
        )
        insert_event(conn, now, jid, "added", None, "pending", detail="replica task")


def _open_round(
    conn: Conn,
    rid: str,
    round: int,
    weights: str,
    size: int,
    target_s: float | None,
    tasks: list[JobSpec],
    now: float,
    claimable: bool,
) -> None:
    conn.execute(
        "INSERT INTO rounds (run_id, round, state, weights, weights_size, target_s, opened_at)"
        " VALUES (?, ?, 'open', ?, ?, ?, ?)",
        (rid, round, weights, size, target_s, now),
    )
    _insert_tasks(conn, tasks, now, claimable)


def open_first_round(
    conn: Conn,
    rid: str,
    weights: str,
    size: int,
    tasks: list[JobSpec],
    now: float,
) -> bool:
    run = _run_row(conn, rid)
    if conn.execute("SELECT 1 FROM rounds WHERE run_id = ?", (rid,)).fetchone() is not None:
        return False
    claimable = run["state"] == "active" and bool(run["in_manifest"])
    _open_round(conn, rid, 0, weights, size, None, tasks, now, claimable)
    conn.execute(
        "UPDATE runs SET weights = ?, weights_size = ?, updated_at = ? WHERE id = ?",
        (weights, size, now, rid),
    )
    return True


def runs_to_open(conn: Conn) -> list[RunRecord]:
    rows = conn.execute(
        "SELECT * FROM runs WHERE state = 'active' AND NOT EXISTS"
        " (SELECT 1 FROM rounds WHERE rounds.run_id = runs.id) ORDER BY seq"
    ).fetchall()
    return [run_record(r) for r in rows]


def open_rounds(conn: Conn) -> list[RoundStatus]:
    out = []
    rows = conn.execute(
        "SELECT runs.*, rounds.round AS open_round FROM runs JOIN rounds"
        " ON rounds.run_id = runs.id AND rounds.round = runs.round AND rounds.state = 'open'"
        " WHERE runs.state = 'active' ORDER BY runs.seq"
    ).fetchall()
    for row in rows:
        d = dict(row)
        d.pop("open_round")
        run = run_record(d)
        rnd = conn.execute(
            "SELECT * FROM rounds WHERE run_id = ? AND round = ?", (run.id, run.round)
        ).fetchone()
        contribs = conn.execute(
            "SELECT * FROM contributions WHERE run_id = ? AND (round = ? OR status = 'accepted')"
            " ORDER BY round, replica, created_at",
            (run.id, run.round),
        ).fetchall()
        tasks = conn.execute(
            "SELECT state, replica FROM jobs WHERE run_id = ? AND round = ?",
            (run.id, run.round),
        ).fetchall()
        out.append(
            RoundStatus(
                run=run,
                round=round_record(rnd),
                contributions=[contribution_record(c) for c in contribs],
                task_states={int(t["replica"]): t["state"] for t in tasks},
            )
        )
    return out


# completion -------------------------------------------------------------------------------
def _without_verdict(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "verdict"}


def complete_replica(
    conn: Conn,
    jid: str,
    worker_id: str,
    epoch: int,
    result: dict[str, Any],
    verdict: Verdict,
    clock: Callable[[], float],
) -> JobRecord:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
    if (
        row is not None
        and row["state"] == "completed"
        and (row["epoch"], row["worker_id"]) == (epoch, worker_id)
        and row["result"] is not None
        and _without_verdict(json.loads(row["result"])) == _without_verdict(result)
    ):
        return load_job(conn, jid)  # the same report again: its reply was lost
    sqlite_attempts.fenced(conn, jid, worker_id, epoch)
    task = JobSpec.model_validate_json(row["spec"]).replica_task
    assert task is not None, "complete_replica on a job without a replica task"
    run = _run_row(conn, task.run_id)
    spec = RunSpec.model_validate_json(run["spec"])
    staleness = run["round"] - task.round
    status: ContributionStatus = verdict.status
    reason = verdict.reason
    if status == "accepted":
        slot_taken = conn.execute(
            "SELECT 1 FROM contributions WHERE run_id = ? AND round = ? AND replica = ?"
            " AND status IN ('accepted', 'applied')",
            (task.run_id, task.round, task.replica),
        ).fetchone()
        if run["state"] in ("completed", "superseded"):
            status, reason = "dropped", f"run {run['state']}"
        elif staleness > spec.max_staleness:
            status = "dropped"
            reason = f"too stale: {staleness} rounds late, max_staleness {spec.max_staleness}"
        elif slot_taken is not None:
            status, reason = "dropped", "this round's slot already has a contribution"
    shown = {"status": status, "reason": reason, "norm": verdict.norm}
    job = sqlite_attempts.complete(conn, jid, worker_id, epoch, {**result, "verdict": shown}, clock)
    now = clock()
    conn.execute(
        "INSERT INTO contributions (run_id, round, replica, job_id, epoch, worker_id,"
        " sha256, size, status, reason, norm, inner_steps_done, compute_s, staleness,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id, epoch) DO NOTHING",
        (
            task.run_id,
            task.round,
            task.replica,
            jid,
            epoch,
            worker_id,
            verdict.sha256,
            verdict.size,
            status,
            reason,
            verdict.norm,
            verdict.inner_steps_done,
            verdict.compute_s,
            staleness,
            now,
        ),
    )
    conn.execute(
        "UPDATE rounds SET bytes_up = bytes_up + ? WHERE run_id = ? AND round = ?",
        (verdict.size, task.run_id, task.round),
    )
    if status == "accepted" and staleness == 0:
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM contributions WHERE run_id = ? AND round = ?"
            " AND status = 'accepted'",
            (task.run_id, task.round),
        ).fetchone()
        if n >= spec.quorum:
            conn.execute(
                "UPDATE rounds SET quorum_at = ? WHERE run_id = ? AND round = ?"
                " AND quorum_at IS NULL",
                (now, task.run_id, task.round),
            )
    return job


# closing ----------------------------------------------------------------------------------
def close_round(conn: Conn, out: RoundOutcome, clock: Callable[[], float]) -> bool:
    rnd = conn.execute(
        "SELECT * FROM rounds WHERE run_id = ? AND round = ? AND state = 'open'",
        (out.run_id, out.round),
    ).fetchone()
    run = _run_row(conn, out.run_id)
    if rnd is None or run["round"] != out.round or run["state"] != "active":
        return False
    now = clock()
    for jid, epoch in out.applied:
        conn.execute(
            "UPDATE contributions SET status = 'applied', applied_in_round = ?"
            " WHERE job_id = ? AND epoch = ? AND status = 'accepted'",
            (out.round, jid, epoch),
        )
    for status, items in (("refused", out.refused), ("dropped", out.dropped)):
        for jid, epoch, reason in items:
            conn.execute(
                "UPDATE contributions SET status = ?, reason = ? WHERE job_id = ? AND epoch = ?"
                " AND status = 'accepted'",
                (status, reason, jid, epoch),
            )
    (refused,) = conn.execute(
        "SELECT COUNT(*) FROM contributions WHERE run_id = ? AND round = ? AND status = 'refused'",
        (out.run_id, out.round),
    ).fetchone()
    conn.execute(
        "UPDATE rounds SET state = 'closed', closed_at = ?, accepted = ?, refused = ?,"
        " late_applied = ?, dropped = ?, heldout_loss = ?, next_weights = ?, wall_s = ?,"
        " detail = ? WHERE run_id = ? AND round = ?",
        (
            now,
            out.accepted,
            refused,
            out.late_applied,
            len(out.dropped),
            out.heldout_loss,
            out.next_weights,
            now - rnd["opened_at"],
            out.detail,
            out.run_id,
            out.round,
        ),
    )
    cancel_tasks(conn, out.run_id, out.round, f"round {out.round} closed", clock, active=False)
    nxt = out.round + 1
    state = "active" if out.next_tasks else "completed"
    conn.execute(
        "UPDATE runs SET round = ?, state = ?, weights = ?, weights_size = ?, momentum = ?,"
        " updated_at = ? WHERE id = ?",
        (nxt, state, out.next_weights, out.next_weights_size, out.momentum, now, out.run_id),
    )
    if out.next_tasks:
        claimable = bool(run["in_manifest"])
        _open_round(
            conn,
            out.run_id,
            nxt,
            out.next_weights,
            out.next_weights_size,
            out.next_target_s,
            out.next_tasks,
            now,
            claimable,
        )
    return True


def note_round(conn: Conn, rid: str, round: int, detail: str) -> None:
    conn.execute(
        "UPDATE rounds SET detail = ? WHERE run_id = ? AND round = ? AND state = 'open'",
        (detail, rid, round),
    )


# reads for routes, the GC and the claim -----------------------------------------------------
def weights_round(conn: Conn, sha256: str) -> tuple[str, int] | None:
    row = conn.execute(
        "SELECT run_id, round FROM rounds WHERE weights = ? ORDER BY opened_at DESC, round DESC"
        " LIMIT 1",
        (sha256,),
    ).fetchone()
    return None if row is None else (row["run_id"], row["round"])


def holds_weights(conn: Conn, worker_id: str, sha256: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM jobs JOIN rounds ON rounds.run_id = jobs.run_id"
        " AND rounds.round = jobs.round WHERE jobs.worker_id = ?"
        " AND jobs.state IN ('claimed', 'running') AND rounds.weights = ? LIMIT 1",
        (worker_id, sha256),
    ).fetchone()
    return row is not None


def add_bytes_down(conn: Conn, rid: str, round: int, num_bytes: int) -> None:
    conn.execute(
        "UPDATE rounds SET bytes_down = bytes_down + ? WHERE run_id = ? AND round = ?",
        (num_bytes, rid, round),
    )


def is_bound(conn: Conn, sha256: str) -> bool:
    """Whether a run's weights or momentum, or any round's weights, name this digest."""
    sql = (
        "SELECT 1 FROM runs WHERE weights = ? OR momentum = ?"
        " UNION ALL SELECT 1 FROM rounds WHERE weights = ? OR next_weights = ? LIMIT 1"
    )
    return conn.execute(sql, (sha256,) * 4).fetchone() is not None

"""The runs part of a reload on the SQLite queue (``[[runs]]``; the jobs' part is
``sqlite_operator``'s, which leaves replica jobs out of its own diff).

A run's id is the sha256 of its canonical ``RunSpec.identity()``, so the plan is a set
difference, like the jobs': a new id is *added* as an ``active`` run with no round yet (the
round driver opens round 0: it needs torch and the artifact store for the initial weights); an
id present in both is *kept*, or *changed* when a scheduling field (priority, constraints,
quorum, timeouts, budget) differs, and its pending tasks take the new scheduling fields; an id
gone from the manifest is *removed*: the run is ``paused``, its tasks marked
``in_manifest = 0`` (a pending one is not claimable, no round closes or opens) until a reload
adds it back, which resumes it. A new identity under a known name is a new run and the old
one is ``superseded`` (the plan entry is *changed*, with ``changes.id = [old, new]``): its
unfinished tasks are cancelled, and their workers hear it at their next heartbeat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from trainfleet.manifest.identity import canonical_json
from trainfleet.manifest.runs import RunSpec
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue.base import PlanEntry
from trainfleet.queue.db import Conn, Row
from trainfleet.queue.reload_specs import SpecTable, plan_specs
from trainfleet.queue.sqlite_runs import (
    TASK_RUN,
    cancel_tasks,
    scheduling_fields,
    set_claimable,
)
from trainfleet.queue.sqlite_schema import SPEC_SET, scheduling_columns

_IDENTITY = {
    "name",
    "recipe",
    "hyper",
    "dataset",
    "replicas",
    "inner_steps",
    "outer_lr",
    "outer_momentum",
    "warmup_rounds",
    "compression",
    "gang_size",
}


def run_id(spec: RunSpec) -> str:
    return hashlib.sha256(canonical_json(spec.identity()).encode()).hexdigest()


def num_rounds(spec: RunSpec) -> int:
    from trainfleet.train.recipes import GPTParams

    params = GPTParams(**spec.hyper)
    return spec.num_rounds(params.batch_size, params.seq_len)


# the plan -----------------------------------------------------------------------------------
def apply_runs(
    conn: Conn, manifest: Manifest, clock: Callable[[], float], *, dry_run: bool
) -> list[PlanEntry]:
    """Plan (and unless ``dry_run``, write) the runs part of a reload."""
    return plan_specs(conn, manifest.runs, RUNS, clock(), dry_run=dry_run)


def _remove_run(conn: Conn, r: Row, now: float) -> None:
    """Gone from the manifest: an active run pauses, its tasks not claimable."""
    state = "paused" if r["state"] == "active" else r["state"]
    conn.execute(
        "UPDATE runs SET in_manifest = 0, state = ?, updated_at = ? WHERE id = ?",
        (state, now, r["id"]),
    )
    set_claimable(conn, r["id"], False, now)


def _insert_run(conn: Conn, spec: RunSpec, rid: str, now: float) -> None:
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0] + 1
    conn.execute(
        "INSERT INTO runs (id, seq, name, spec, state, round, num_rounds, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, 'active', 0, ?, ?, ?)",
        (rid, seq, spec.name, spec.model_dump_json(), num_rounds(spec), now, now),
    )


def _update_run(conn: Conn, old: Row, spec: RunSpec, now: float) -> None:
    """New scheduling fields (and budget); a paused run resumes."""
    state = "active" if old["state"] == "paused" else old["state"]
    conn.execute(
        "UPDATE runs SET spec = ?, num_rounds = ?, state = ?, in_manifest = 1, updated_at = ?"
        " WHERE id = ?",
        (spec.model_dump_json(), num_rounds(spec), state, now, old["id"]),
    )
    sched = scheduling_fields(spec)
    for row in conn.execute(
        f"SELECT id, spec FROM jobs WHERE {TASK_RUN} = ? AND state = 'pending'", (old["id"],)
    ).fetchall():
        job = JobSpec.model_validate_json(row["spec"]).model_copy(update=sched)
        conn.execute(
            f"UPDATE jobs SET {SPEC_SET}, updated_at = ? WHERE id = ?",
            (*scheduling_columns(job, row["id"]), now, row["id"]),
        )
    set_claimable(conn, old["id"], state == "active", now)


def _supersede(conn: Conn, old: Row, new_id: str, now: float) -> None:
    conn.execute(
        "UPDATE runs SET state = 'superseded', in_manifest = 0, updated_at = ? WHERE id = ?",
        (now, old["id"]),
    )
    conn.execute(
        "UPDATE rounds SET detail = ? WHERE run_id = ? AND state = 'open'",
        (f"superseded by run {new_id[:12]}", old["id"]),
    )
    cancel_tasks(
        conn, old["id"], None, f"run superseded by {new_id[:12]}", lambda: now, active=True
    )


RUNS = SpecTable(
    table="runs",
    model=RunSpec,
    identity=frozenset(_IDENTITY),
    live_states=("active", "paused"),
    spec_id=run_id,
    insert=_insert_run,
    update=_update_run,
    supersede=_supersede,
    remove=_remove_run,
)

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
    now = clock()
    stored = {r["id"]: r for r in conn.execute("SELECT * FROM runs ORDER BY seq")}
    entries: list[PlanEntry] = []
    handled: set[str] = set()
    for spec in manifest.runs:
        rid = run_id(spec)
        handled.add(rid)
        old = stored.get(rid)
        if old is None:
            replaced = [
                r
                for r in stored.values()
                if r["name"] == spec.name and r["state"] in ("active", "paused")
            ]
            for r in replaced:
                handled.add(r["id"])
                entries.append(
                    PlanEntry(
                        id=rid, name=spec.name, state="changed", changes={"id": [r["id"], rid]}
                    )
                )
                if not dry_run:
                    _supersede(conn, r, rid, clock)
            if not replaced:
                entries.append(PlanEntry(id=rid, name=spec.name, state="added"))
            if not dry_run:
                _insert_run(conn, spec, rid, now)
            continue
        before = RunSpec.model_validate_json(old["spec"]).model_dump(mode="json")
        after = spec.model_dump(mode="json")
        delta = {
            k: [before.get(k), v]
            for k, v in after.items()
            if k not in _IDENTITY and before.get(k) != v
        }
        if not old["in_manifest"]:
            delta["in_manifest"] = [False, True]
        entries.append(
            PlanEntry(id=rid, name=spec.name, state="changed" if delta else "kept", changes=delta)
        )
        if not dry_run and delta:
            _update_run(conn, old, spec, now)
    for r in stored.values():
        if r["id"] in handled or not r["in_manifest"]:
            continue
        entries.append(PlanEntry(id=r["id"], name=r["name"], state="removed"))
        if not dry_run:
            state = "paused" if r["state"] == "active" else r["state"]
            conn.execute(
                "UPDATE runs SET in_manifest = 0, state = ?, updated_at = ? WHERE id = ?",
                (state, now, r["id"]),
            )
            set_claimable(conn, r["id"], False, now)
    return entries


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
            (*scheduling_columns(job), now, row["id"]),
        )
    set_claimable(conn, old["id"], state == "active", now)


def _supersede(conn: Conn, old: Row, new_id: str, clock: Callable[[], float]) -> None:
    now = clock()
    conn.execute(
        "UPDATE runs SET state = 'superseded', in_manifest = 0, updated_at = ? WHERE id = ?",
        (now, old["id"]),
    )
    conn.execute(
        "UPDATE rounds SET detail = ? WHERE run_id = ? AND state = 'open'",
        (f"superseded by run {new_id[:12]}", old["id"]),
    )
    cancel_tasks(conn, old["id"], None, f"run superseded by {new_id[:12]}", clock, active=True)

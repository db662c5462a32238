"""The pipelines part of a reload (``[[pipelines]]``; the jobs' part is ``sqlite_operator``'s,
which leaves producer and consumer jobs out of its own diff).

A pipeline's id is the sha256 of its canonical ``PipelineSpec.identity()``, so the plan is a
set difference, like the runs': a new id is *added* as a ``waiting`` pipeline with a fresh
secret and no job yet (the driver starts it once its teacher's model exists); an id present
in both is *kept*, or *changed* when a scheduling field differs: the stored spec and
``consumers`` take the new values (the driver's ``ensure_consumers`` then re-partitions) and
its pending jobs take the new scheduling fields. A new identity under a known name is a new
pipeline, and the old one (still waiting or producing) is *superseded*: the plan lists the
new one as *changed* (``changes.id = [old, new]``) and the old one as *superseded*; its
unfinished jobs are cancelled. An id gone from the manifest is *removed*: it is marked
``in_manifest = 0`` and otherwise left to finish (its jobs are pinned).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from trainfleet.manifest.pipelines import PipelineSpec, pipeline_id
from trainfleet.manifest.spec import Manifest
from trainfleet.queue.base import PlanEntry
from trainfleet.queue.db import Conn, Row
from trainfleet.queue.reload_specs import SpecTable, plan_specs
from trainfleet.queue.sqlite_pipelines import cancel_unfinished, pipeline_job
from trainfleet.queue.sqlite_schema import SPEC_SET, job_record, scheduling_columns

_IDENTITY = {
    "name",
    "teacher",
    "teacher_id",
    "dataset",
    "student",
    "samples",
    "top_k",
    "temperature",
    "alpha",
    "seed",
    "producers",
    "store",
}


def apply_pipelines(
    conn: Conn, manifest: Manifest, clock: Callable[[], float], *, dry_run: bool
) -> list[PlanEntry]:
    """Plan (and unless ``dry_run``, write) the pipelines part of a reload."""
    return plan_specs(conn, manifest.pipelines, PIPELINES, clock(), dry_run=dry_run)


def _remove(conn: Conn, r: Row, now: float) -> None:
    """Gone from the manifest: left to finish (its jobs are pinned), marked as such."""
    conn.execute(
        "UPDATE pipelines SET in_manifest = 0, updated_at = ? WHERE id = ?", (now, r["id"])
    )


def _insert(conn: Conn, spec: PipelineSpec, pid: str, now: float) -> None:
    assert spec.teacher_id is not None, "the loader sets the teacher's id"
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM pipelines").fetchone()[0] + 1
    conn.execute(
        "INSERT INTO pipelines (id, seq, name, spec, secret, attempt_key, state, teacher_job,"
        " teacher_model, consumers, in_manifest, detail, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, 'waiting', ?, NULL, ?, 1, '', ?, ?)",
        (pid, seq, spec.name, spec.model_dump_json(), secrets.token_hex(32),
         secrets.token_hex(32), spec.teacher_id, spec.consumers, now, now),
    )  # fmt: skip


def _update(conn: Conn, old: Row, spec: PipelineSpec, now: float) -> None:
    """New scheduling fields: the stored spec, ``consumers``, and its pending jobs'."""
    pid = old["id"]
    conn.execute(
        "UPDATE pipelines SET spec = ?, consumers = ?, in_manifest = 1, updated_at = ?"
        " WHERE id = ?",
        (spec.model_dump_json(), spec.consumers, now, pid),
    )
    rows = conn.execute(
        "SELECT * FROM jobs WHERE pipeline_id = ? AND state = 'pending'", (pid,)
    ).fetchall()
    for row in rows:
        task = job_record(row).spec.pipeline_task
        assert task is not None
        job = pipeline_job(spec, pid, task.role, task.index)
        conn.execute(
            f"UPDATE jobs SET {SPEC_SET}, updated_at = ? WHERE id = ?",
            (*scheduling_columns(job, row["id"]), now, row["id"]),
        )


def _supersede(conn: Conn, old: Row, new_id: str, now: float) -> None:
    reason = f"pipeline superseded by {new_id[:12]}"
    conn.execute(
        "UPDATE pipelines SET state = 'superseded', in_manifest = 0, detail = ?,"
        " updated_at = ? WHERE id = ?",
        (reason, now, old["id"]),
    )
    cancel_unfinished(conn, old["id"], reason, now)


PIPELINES = SpecTable(
    table="pipelines",
    model=PipelineSpec,
    identity=frozenset(_IDENTITY),
    live_states=("waiting", "producing"),
    spec_id=pipeline_id,
    insert=_insert,
    update=_update,
    supersede=_supersede,
    remove=_remove,
    list_superseded=True,
)

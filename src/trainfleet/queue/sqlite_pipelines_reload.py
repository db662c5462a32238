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
    now = clock()
    stored = {r["id"]: r for r in conn.execute("SELECT * FROM pipelines ORDER BY seq")}
    entries: list[PlanEntry] = []
    handled: set[str] = set()
    for spec in manifest.pipelines:
        pid = pipeline_id(spec)
        handled.add(pid)
        old = stored.get(pid)
        if old is None:
            entries += _add(conn, spec, pid, stored, handled, now, dry_run=dry_run)
            continue
        before = PipelineSpec.model_validate_json(old["spec"]).model_dump(mode="json")
        after = spec.model_dump(mode="json")
        delta = {
            k: [before.get(k), v]
            for k, v in after.items()
            if k not in _IDENTITY and before.get(k) != v
        }
        if not old["in_manifest"]:
            delta["in_manifest"] = [False, True]
        state = "changed" if delta else "kept"
        entries.append(PlanEntry(id=pid, name=spec.name, state=state, changes=delta))
        if delta and not dry_run:
            _update(conn, pid, spec, now)
    for r in stored.values():
        if r["id"] in handled or not r["in_manifest"]:
            continue
        entries.append(PlanEntry(id=r["id"], name=r["name"], state="removed"))
        if not dry_run:
            conn.execute(
                "UPDATE pipelines SET in_manifest = 0, updated_at = ? WHERE id = ?",
                (now, r["id"]),
            )
    return entries


def _add(
    conn: Conn,
    spec: PipelineSpec,
    pid: str,
    stored: dict[str, Row],
    handled: set[str],
    now: float,
    *,
    dry_run: bool,
) -> list[PlanEntry]:
    """A new identity: added, or replacing (superseding) the live one of the same name."""
    entries = []
    for r in stored.values():
        if r["name"] != spec.name or r["state"] not in ("waiting", "producing"):
            continue
        handled.add(r["id"])
        entries.append(
            PlanEntry(id=pid, name=spec.name, state="changed", changes={"id": [r["id"], pid]})
        )
        entries.append(PlanEntry(id=r["id"], name=r["name"], state="superseded"))
        if not dry_run:
            _supersede(conn, r, pid, now)
    if not entries:
        entries.append(PlanEntry(id=pid, name=spec.name, state="added"))
    if not dry_run:
        _insert(conn, spec, pid, now)
    return entries


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


def _update(conn: Conn, pid: str, spec: PipelineSpec, now: float) -> None:
    """New scheduling fields: the stored spec, ``consumers``, and its pending jobs'."""
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
            (*scheduling_columns(job), now, row["id"]),
        )


def _supersede(conn: Conn, old: Row, new_id: str, now: float) -> None:
    reason = f"pipeline superseded by {new_id[:12]}"
    conn.execute(
        "UPDATE pipelines SET state = 'superseded', in_manifest = 0, detail = ?,"
        " updated_at = ? WHERE id = ?",
        (reason, now, old["id"]),
    )
    cancel_unfinished(conn, old["id"], reason, now)

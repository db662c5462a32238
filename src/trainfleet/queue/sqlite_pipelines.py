"""Pipelines' storage: their rows, their producer and consumer jobs, and the attempt fence.

Plain functions on a ``db.Conn`` (both engines), like ``sqlite_market``; the writes run
inside the caller's write transaction (``SQLQueue`` opens it), so each is atomic:

- ``start_pipeline`` records the teacher's model and inserts the producer and consumer jobs
  (pinned: claimable though in no manifest; ``jobs.pipeline_id`` names the pipeline), like a
  market submission's referee jobs;
- ``ensure_consumers`` follows a change of ``consumers``: the missing consumer jobs
  ``0..num-1`` are inserted (or, if this function cancelled them earlier, made pending
  again), and the pending ones with an index ``>= num`` are cancelled (an active one is told
  to retire by its next lease);
- ``fail_pipeline`` (and a reload's supersede) ends the pipeline and cancels its unfinished
  jobs; their workers hear it at their next heartbeat;
- ``attempt`` is the fence of every call a job process makes: only the job's current
  attempt (claimed or running, at that epoch) passes, else ``StaleEpoch``.

The ref queue itself (publish, lease, ack, settle) is ``sqlite_pipeline_refs``; the reload is
``sqlite_pipelines_reload``.
"""

from __future__ import annotations

from trainfleet.errors import BadRequest, Conflict, NotFound, StaleEpoch
from trainfleet.manifest.pipelines import PipelineSpec, PipelineTask, Role
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue.base import JobRecord
from trainfleet.queue.db import Conn, Row
from trainfleet.queue.fairshare import charge_ended
from trainfleet.queue.pipelines_base import PipelineRecord
from trainfleet.queue.sqlite_schema import (
    SPEC_COLUMNS,
    SPEC_MARKS,
    insert_event,
    job_record,
    read_meta,
    scheduling_columns,
)
from trainfleet.queue.sqlite_workers import release_worker

ACTIVE = ("claimed", "running")
UNFINISHED = ("pending", "claimed", "running")
RETIRED = "retired: consumer index >= consumers"
"""The reason ``ensure_consumers`` cancels a pending consumer with; only such a job is made
pending again when ``consumers`` grows back (an operator's cancel stands)."""


# rows -> records ------------------------------------------------------------------------
def pipeline_record(row: Row) -> PipelineRecord:
    d = dict(row)
    for key in ("secret", "attempt_key", "seq"):
        d.pop(key)
    d["spec"] = PipelineSpec.model_validate_json(d["spec"])
    d["in_manifest"] = bool(d["in_manifest"])
    return PipelineRecord(**d)


def pipeline_row(conn: Conn, pipeline_id: str) -> Row:
    row = conn.execute("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
    if row is None:
        raise NotFound(f"no pipeline {pipeline_id[:200]!r}")
    return row


def get_pipeline(conn: Conn, ref: str) -> PipelineRecord:
    """A pipeline by id, or by name (the newest of that name)."""
    row = conn.execute("SELECT * FROM pipelines WHERE id = ?", (ref,)).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT * FROM pipelines WHERE name = ? ORDER BY seq DESC LIMIT 1", (ref,)
        ).fetchone()
    if row is None:
        raise NotFound(f"no pipeline {ref[:200]!r}")
    return pipeline_record(row)


def list_pipelines(conn: Conn) -> list[PipelineRecord]:
    return [pipeline_record(r) for r in conn.execute("SELECT * FROM pipelines ORDER BY seq")]


def pipelines_to_drive(conn: Conn) -> list[PipelineRecord]:
    """Pipelines waiting for their teacher or producing, oldest first."""
    rows = conn.execute(
        "SELECT * FROM pipelines WHERE state IN ('waiting', 'producing') ORDER BY seq"
    )
    return [pipeline_record(r) for r in rows]


def pipeline_secret(conn: Conn, pipeline_id: str) -> str:
    return str(pipeline_row(conn, pipeline_id)["secret"])


def pipeline_attempt_key(conn: Conn, pipeline_id: str) -> str:
    """The key of the attempt tokens of the pipeline's jobs (hex). Unlike the secret, no job
    ever holds it: a job that knows the secret cannot mint another job's attempt token."""
    return str(pipeline_row(conn, pipeline_id)["attempt_key"])


def pipeline_jobs(conn: Conn, pipeline_id: str) -> list[JobRecord]:
    rows = conn.execute("SELECT * FROM jobs WHERE pipeline_id = ? ORDER BY seq", (pipeline_id,))
    return [job_record(r) for r in rows.fetchall()]


# jobs -------------------------------------------------------------------------------------
def pipeline_job(spec: PipelineSpec, pipeline_id: str, role: Role, index: int) -> JobSpec:
    """Producer p's or consumer k's job: scheduling fields from the pipeline."""
    producer = role == "producer"
    return JobSpec(
        name=spec.job_name(role, index),
        kind=role,
        model=f"{spec.name} {'teacher' if producer else 'student'}",
        priority=spec.priority,
        require_cuda=spec.producer_require_cuda if producer else False,
        allowed_hosts=spec.producer_hosts if producer else spec.consumer_hosts,
        max_failures=spec.max_failures,
        timeout_s=spec.timeout_s,
        task=PipelineTask(pipeline=spec.name, pipeline_id=pipeline_id, role=role, index=index),
    )


def _insert_job(conn: Conn, job: JobSpec, pipeline_id: str, now: float) -> str:
    from trainfleet.manifest.identity import job_id

    jid = job_id(job)
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0] + 1
    conn.execute(
        f"INSERT INTO jobs (id, seq, name, state, {SPEC_COLUMNS}, created_at, updated_at,"
        f" pending_since, manifest_hash, in_manifest, pinned, pipeline_id) VALUES (?, ?, ?,"
        f" 'pending', {SPEC_MARKS}, ?, ?, ?, ?, 0, 1, ?)",
        (jid, seq, job.name, *scheduling_columns(job, jid), now, now, now,
         read_meta(conn, "manifest_hash", ""), pipeline_id),
    )  # fmt: skip
    insert_event(conn, now, jid, "added", None, "pending", detail=f"pipeline {pipeline_id[:12]}")
    return jid


def _revive(conn: Conn, row: Row, now: float) -> None:
    """Make a consumer ``ensure_consumers`` cancelled pending again (a fresh epoch)."""
    conn.execute(
        "UPDATE jobs SET state = 'pending', epoch = epoch + 1, num_failures = 0,"
        " worker_id = NULL, host = NULL, pending_since = ?, updated_at = ?,"
        " finished_at = NULL, error = NULL, result = NULL, pinned = 1 WHERE id = ?",
        (now, now, row["id"]),
    )
    insert_event(conn, now, row["id"], "requeued", "cancelled", "pending", detail="consumers grew")


def cancel_jobs(conn: Conn, rows: list[Row], reason: str, now: float) -> int:
    """Cancel these jobs (rows with id, state, worker_id; a claimed or running one also
    submitter, claimed_at and charged_at: its time is charged to fair share); returns how
    many."""
    for job in rows:
        charge_ended(conn, job, now)
        conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, error = ?"
            " WHERE id = ?",
            (now, now, reason, job["id"]),
        )
        release_worker(conn, job["worker_id"], job["id"])
        insert_event(conn, now, job["id"], "cancelled", job["state"], "cancelled", detail=reason)
    return len(rows)


def cancel_unfinished(conn: Conn, pipeline_id: str, reason: str, now: float) -> int:
    rows = conn.execute(
        "SELECT id, state, worker_id, submitter, claimed_at, charged_at FROM jobs"
        " WHERE pipeline_id = ? AND state IN ('pending', 'claimed', 'running')",
        (pipeline_id,),
    ).fetchall()
    return cancel_jobs(conn, rows, reason, now)


def start_pipeline(conn: Conn, pipeline_id: str, teacher_model: str, now: float) -> PipelineRecord:
    """Record the teacher's model, insert the producer and consumer jobs: ``producing``.
    Again with the same model: no change; a pipeline in another state: ``Conflict``."""
    row = pipeline_row(conn, pipeline_id)
    if row["state"] == "producing" and row["teacher_model"] == teacher_model:
        return pipeline_record(row)
    if row["state"] != "waiting":
        raise Conflict(f"pipeline {row['name']} is {row['state']}, not waiting for its teacher")
    if len(teacher_model) != 64 or set(teacher_model) - set("0123456789abcdef"):
        raise BadRequest("the teacher model must be a sha256: 64 lowercase hex digits")
    conn.execute(
        "UPDATE pipelines SET state = 'producing', teacher_model = ?, updated_at = ? WHERE id = ?",
        (teacher_model, now, pipeline_id),
    )
    spec = PipelineSpec.model_validate_json(row["spec"])
    for p in range(spec.producers):
        _insert_job(conn, pipeline_job(spec, pipeline_id, "producer", p), pipeline_id, now)
    ensure_consumers(conn, pipeline_id, now)
    return pipeline_record(pipeline_row(conn, pipeline_id))


def consumer_jobs(conn: Conn, pipeline_id: str) -> dict[int, Row]:
    """The pipeline's consumer jobs by index."""
    rows = conn.execute(
        "SELECT * FROM jobs WHERE pipeline_id = ? AND kind = 'consumer'", (pipeline_id,)
    ).fetchall()
    out: dict[int, Row] = {}
    for row in rows:
        task = job_record(row).spec.pipeline_task
        assert task is not None
        out[task.index] = row
    return out


def ensure_consumers(conn: Conn, pipeline_id: str, now: float) -> int:
    """Consumer jobs ``0..consumers-1`` exist (inserted, or made pending again if this
    cancelled them); pending ones at ``>= consumers`` are cancelled. Returns how many were
    inserted or made pending. A pipeline not producing: nothing (0)."""
    row = pipeline_row(conn, pipeline_id)
    if row["state"] != "producing":
        return 0
    num = row["consumers"]
    spec = PipelineSpec.model_validate_json(row["spec"])
    jobs = consumer_jobs(conn, pipeline_id)
    made = 0
    for k in range(num):
        job = jobs.get(k)
        if job is None:
            _insert_job(conn, pipeline_job(spec, pipeline_id, "consumer", k), pipeline_id, now)
            made += 1
        elif job["state"] == "cancelled" and (job["error"] or "").startswith(RETIRED):
            _revive(conn, job, now)
            made += 1
    extra = [j for k, j in jobs.items() if k >= num and j["state"] == "pending"]
    cancel_jobs(conn, extra, f"{RETIRED} ({num})", now)
    return made


def fail_pipeline(conn: Conn, pipeline_id: str, reason: str, now: float) -> PipelineRecord:
    """End the pipeline as ``failed`` and cancel its unfinished jobs. An ended pipeline is
    returned unchanged."""
    row = pipeline_row(conn, pipeline_id)
    if row["state"] in ("waiting", "producing"):
        conn.execute(
            "UPDATE pipelines SET state = 'failed', detail = ?, updated_at = ? WHERE id = ?",
            (reason[:2000], now, pipeline_id),
        )
        cancel_unfinished(conn, pipeline_id, f"pipeline failed: {reason}"[:2000], now)
    return pipeline_record(pipeline_row(conn, pipeline_id))


# the attempt fence ------------------------------------------------------------------------
def attempt(conn: Conn, job_id: str, epoch: int) -> tuple[JobRecord, PipelineTask, Row]:
    """The job, its pipeline task and its pipeline's row, if ``epoch`` is the job's current
    attempt (claimed or running); ``StaleEpoch`` otherwise, ``BadRequest`` if it is not a
    pipeline's job."""
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise NotFound(f"no job {job_id[:200]!r}")
    job = job_record(row)
    task = job.spec.pipeline_task
    if task is None:
        raise BadRequest(f"job {job.name} is not a pipeline's producer or consumer")
    if job.state not in ACTIVE or job.epoch != epoch:
        raise StaleEpoch(
            f"job {job.name} is {job.state} at epoch {job.epoch}; attempt {epoch} is over"
        )
    return job, task, pipeline_row(conn, task.pipeline_id)


def pipeline_attempt(conn: Conn, job_id: str, epoch: int) -> tuple[JobRecord, PipelineRecord, str]:
    """``attempt`` as the routes want it: the job, its pipeline (no secret) and the secret."""
    job, _, row = attempt(conn, job_id, epoch)
    return job, pipeline_record(row), str(row["secret"])

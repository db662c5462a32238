"""The durable ref queue of a pipeline: publish, lease, ack, return, producer sync, settle.

Plain functions on a ``db.Conn`` inside the caller's write transaction (both engines). Every
call of a job process is fenced by ``sqlite_pipelines.attempt``: only the job's current
attempt may publish, lease, ack, return or sync. The rules (``pipeline_samples.state``):

- publish: a producer's refs, each MAC-verified with the pipeline's secret and of its own
  share (idx % producers == p); a new sample is ``ready``, a ``requeued`` one ``ready`` again
  with the new ref; any other is skipped (reported).
- lease: consumer k of ``num`` (the pipeline's current ``consumers``) takes ``ready``
  samples with ``bucket % num == k`` in idx order; with none of its own, those of partitions
  whose consumer job is not claimed or running (still pending for want of a free worker,
  finished, cancelled), so none is stranded: a pipeline needs only its producers and one
  consumer running at once.
  ``k >= num``: retire. Nothing is leased twice: a lease changes ``ready`` rows only, in one
  serialized transaction.
- ack: ``leased`` by this attempt -> ``consumed`` (the consumer trains on it only then);
  again: accepted, unchanged; anything else refused. return: ``leased`` -> ``requeued``.
- settle (each driver tick, and first in lease and sync): an expired lease, or one held by
  an attempt that is over, goes back (``ready``, or ``requeued`` if its producer attempt is
  over too); ``consumed`` by an attempt that completed -> ``committed``, by one that ended
  otherwise -> ``requeued`` (its model is discarded, so the sample must be trained on
  again: exactly once counts completed attempts); ``ready`` of a dead HTTP producer ->
  ``requeued``; a pipeline whose samples are all committed and released and whose jobs all
  ended -> ``completed``.
"""

from __future__ import annotations

import json
from typing import Any

from trainfleet.errors import BadRequest
from trainfleet.manifest.pipelines import PipelineSpec, bucket, sample_id
from trainfleet.queue.db import Conn, Row
from trainfleet.queue.pipelines_base import (
    MAX_BATCH,
    AckResult,
    LeaseReply,
    PipelineCounts,
    ProducerSync,
    PublishReply,
    SkippedSample,
)
from trainfleet.queue.sqlite_pipelines import attempt, consumer_jobs, pipeline_row

MAX_PRODUCE = 1024  # indexes one sync asks for at most (the producer syncs again)
MAX_RELEASE = MAX_BATCH  # refs one sync hands back to release at most


def _running(job: str, epoch: str) -> str:
    """SQL: the attempt (job column, epoch column) is the job's current, active one."""
    return (
        f"EXISTS (SELECT 1 FROM jobs j WHERE j.id = pipeline_samples.{job} AND j.epoch ="
        f" pipeline_samples.{epoch} AND j.state IN ('claimed', 'running'))"
    )


def _completed(job: str, epoch: str) -> str:
    return (
        f"EXISTS (SELECT 1 FROM jobs j WHERE j.id = pipeline_samples.{job} AND j.epoch ="
        f" pipeline_samples.{epoch} AND j.state = 'completed')"
    )


def _spec(row: Row) -> PipelineSpec:
    return PipelineSpec.model_validate_json(row["spec"])


def _check_batch(items: list[Any], what: str) -> None:
    if len(items) > MAX_BATCH:
        raise BadRequest(f"at most {MAX_BATCH} {what} at once, not {len(items)}")


# producer ---------------------------------------------------------------------------------
def _checked_idx(ref: dict[str, Any], pipeline: Row, spec: PipelineSpec, index: int) -> int:
    """The sample index of a ref that verifies with the pipeline's secret and lies in
    producer ``index``'s share; ``BadRequest`` naming the sample otherwise."""
    from trainfleet.errors import FeatureError
    from trainfleet.features.ref import SampleRef, verify_ref

    sid = str(ref.get("sample_id", "?"))[:128] if isinstance(ref, dict) else "?"
    try:
        parsed = SampleRef.model_validate(ref)
        verify_ref(parsed, bytes.fromhex(pipeline["secret"]))
    except (ValueError, FeatureError) as err:
        raise BadRequest(f"sample {sid!r}: its ref does not verify ({err})"[:500]) from None
    if parsed.pipeline != pipeline["id"]:
        raise BadRequest(f"sample {sid!r}: its ref names another pipeline")
    problem = spec.ref_store_problem(parsed.store)
    if problem:
        raise BadRequest(f"sample {sid!r}: {problem}")
    idx = int(sid) if sid.isdigit() and len(sid) == 8 else -1
    if not 0 <= idx < spec.samples or sample_id(idx) != sid:
        raise BadRequest(f"sample {sid!r}: not a sample id of this pipeline (00000000..)")
    if idx % spec.producers != index:
        raise BadRequest(f"sample {sid!r}: not in producer {index}'s share")
    return idx


def publish(
    conn: Conn, job_id: str, epoch: int, refs: list[dict[str, Any]], now: float
) -> PublishReply:
    job, task, pipeline = attempt(conn, job_id, epoch)
    if task.role != "producer":
        raise BadRequest(f"job {job.name} is a {task.role}; only producers publish")
    _check_batch(refs, "refs")
    spec = _spec(pipeline)
    checked = [(_checked_idx(ref, pipeline, spec, task.index), ref) for ref in refs]
    accepted: list[str] = []
    skipped: list[SkippedSample] = []
    for idx, ref in checked:
        sid, text = sample_id(idx), json.dumps(ref, sort_keys=True, separators=(",", ":"))
        row = conn.execute(
            "SELECT state FROM pipeline_samples WHERE pipeline_id = ? AND sample_id = ?",
            (pipeline["id"], sid),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO pipeline_samples (pipeline_id, sample_id, idx, bucket, ref,"
                " producer_job, producer_epoch, state, released, produced_at, times_produced)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'ready', 0, ?, 1)",
                (pipeline["id"], sid, idx, bucket(sid), text, job_id, epoch, now),
            )
        elif row["state"] == "requeued":
            conn.execute(
                "UPDATE pipeline_samples SET ref = ?, producer_job = ?, producer_epoch = ?,"
                " state = 'ready', released = 0, released_at = NULL, consumer_job = NULL,"
                " consumer_epoch = NULL, step = NULL, leased_until = NULL, consumed_at = NULL,"
                " produced_at = ?, times_produced = times_produced + 1"
                " WHERE pipeline_id = ? AND sample_id = ?",
                (text, job_id, epoch, now, pipeline["id"], sid),
            )
        else:
            skipped.append(SkippedSample(sample_id=sid, reason=f"already {row['state']}"))
            continue
        accepted.append(sid)
    return PublishReply(accepted=accepted, skipped=skipped)


def producer_sync(
    conn: Conn, job_id: str, epoch: int, released: list[str], now: float
) -> ProducerSync:
    """Mark ``released`` (of its share, consumed) released; then what it must release and
    make next, and whether it is finished."""
    job, task, pipeline = attempt(conn, job_id, epoch)
    if task.role != "producer":
        raise BadRequest(f"job {job.name} is a {task.role}; only producers sync")
    _check_batch(released, "released ids")
    settle_pipeline(conn, pipeline, now)
    pid, spec = pipeline["id"], _spec(pipeline)
    share = "pipeline_id = ? AND idx % ? = ?"
    args = (pid, spec.producers, task.index)
    for start in range(0, len(released), 100):
        chunk = [str(s)[:128] for s in released[start : start + 100]]
        conn.execute(
            f"UPDATE pipeline_samples SET released = 1, released_at = ? WHERE {share}"
            f" AND released = 0 AND state IN ('consumed', 'committed', 'requeued')"
            f" AND sample_id IN ({', '.join('?' for _ in chunk)})",
            (now, *args, *chunk),
        )
    release = conn.execute(
        f"SELECT ref FROM pipeline_samples WHERE {share} AND released = 0"
        " AND state IN ('consumed', 'committed') ORDER BY idx LIMIT ?",
        (*args, MAX_RELEASE),
    ).fetchall()
    rows = conn.execute(f"SELECT idx, state FROM pipeline_samples WHERE {share}", args)
    have = {r["idx"]: r["state"] for r in rows.fetchall()}
    produce = [i for i in spec.share(task.index) if have.get(i, "requeued") == "requeued"]
    done = conn.execute(
        f"SELECT COUNT(*) FROM pipeline_samples WHERE {share} AND state = 'committed'"
        " AND released = 1",
        args,
    ).fetchone()[0]
    ended = pipeline_row(conn, pid)["state"] not in ("waiting", "producing")
    return ProducerSync(
        release=[json.loads(r["ref"]) for r in release],
        produce=produce[:MAX_PRODUCE],
        finished=ended or done == len(spec.share(task.index)),
    )


# consumer ---------------------------------------------------------------------------------
def _stranded(conn: Conn, pipeline_id: str, num: int, index: int) -> list[int]:
    """Partitions (< num, not ``index``) whose consumer job is not claimed or running."""
    jobs = consumer_jobs(conn, pipeline_id)
    alive = {k for k, j in jobs.items() if j["state"] in ("claimed", "running")}
    return [k for k in range(num) if k != index and k not in alive]


def _take(conn: Conn, pid: str, where: str, args: tuple[Any, ...], limit: int) -> list[Row]:
    return conn.execute(
        f"SELECT sample_id, ref FROM pipeline_samples WHERE pipeline_id = ? AND state = 'ready'"
        f" AND {where} ORDER BY idx LIMIT ?",
        (pid, *args, limit),
    ).fetchall()


def lease(conn: Conn, job_id: str, epoch: int, max_samples: int, now: float) -> LeaseReply:
    job, task, pipeline = attempt(conn, job_id, epoch)
    if task.role != "consumer":
        raise BadRequest(f"job {job.name} is a {task.role}; only consumers lease")
    if not 1 <= max_samples <= MAX_BATCH:
        raise BadRequest(f"max_samples is 1..{MAX_BATCH}, not {max_samples}")
    settle_pipeline(conn, pipeline, now)
    pid, num, spec = pipeline["id"], int(pipeline["consumers"]), _spec(pipeline)
    if task.index >= num or pipeline["state"] != "producing":
        return LeaseReply(samples=[], retire=True, done=_done(conn, pid, spec), num_consumers=num)
    rows = _take(conn, pid, "bucket % ? = ?", (num, task.index), max_samples)
    stranded = _stranded(conn, pid, num, task.index) if not rows else []
    if stranded:
        marks = ", ".join("?" for _ in stranded)
        rows = _take(conn, pid, f"bucket % ? IN ({marks})", (num, *stranded), max_samples)
    taken = []
    for row in rows:  # a row another transaction leased meanwhile (rowcount 0) is not ours
        if conn.execute(
            "UPDATE pipeline_samples SET state = 'leased', consumer_job = ?, consumer_epoch = ?,"
            " leased_until = ? WHERE pipeline_id = ? AND sample_id = ? AND state = 'ready'",
            (job_id, epoch, now + spec.lease_s, pid, row["sample_id"]),
        ).rowcount:
            taken.append(row)
    rows = taken
    return LeaseReply(
        samples=[json.loads(r["ref"]) for r in rows],
        retire=False,
        done=not rows and _done(conn, pid, spec),
        num_consumers=num,
    )


def _done(conn: Conn, pipeline_id: str, spec: PipelineSpec) -> bool:
    """Every sample exists and none is ready, leased or requeued."""
    row = conn.execute(
        "SELECT COUNT(*) AS n, SUM(CASE WHEN state IN ('ready', 'leased', 'requeued')"
        " THEN 1 ELSE 0 END) AS open FROM pipeline_samples WHERE pipeline_id = ?",
        (pipeline_id,),
    ).fetchone()
    return bool(row["n"] == spec.samples and not row["open"])


def ack(
    conn: Conn, job_id: str, epoch: int, acks: list[tuple[str, int]], now: float
) -> list[AckResult]:
    job, task, pipeline = attempt(conn, job_id, epoch)
    if task.role != "consumer":
        raise BadRequest(f"job {job.name} is a {task.role}; only consumers ack")
    _check_batch(acks, "acks")
    results = []
    for sid, step in acks:
        sid = str(sid)[:128]
        row = conn.execute(
            "SELECT state, consumer_job, consumer_epoch FROM pipeline_samples"
            " WHERE pipeline_id = ? AND sample_id = ?",
            (pipeline["id"], sid),
        ).fetchone()
        mine = row is not None and (row["consumer_job"], row["consumer_epoch"]) == (job_id, epoch)
        if mine and row["state"] == "leased":
            conn.execute(
                "UPDATE pipeline_samples SET state = 'consumed', step = ?, consumed_at = ?,"
                " leased_until = NULL WHERE pipeline_id = ? AND sample_id = ?",
                (int(step), now, pipeline["id"], sid),
            )
            results.append(AckResult(sample_id=sid, accepted=True))
        elif mine and row["state"] in ("consumed", "committed"):
            results.append(AckResult(sample_id=sid, accepted=True, reason="acked already"))
        else:
            why = "no such sample" if row is None else f"{row['state']}, not leased to you"
            results.append(AckResult(sample_id=sid, accepted=False, reason=why))
    return results


def return_samples(conn: Conn, job_id: str, epoch: int, sample_ids: list[str], now: float) -> int:
    """The consumer could not fetch these leased samples: the producer makes them again."""
    job, task, pipeline = attempt(conn, job_id, epoch)
    if task.role != "consumer":
        raise BadRequest(f"job {job.name} is a {task.role}; only consumers return samples")
    _check_batch(sample_ids, "sample ids")
    returned = 0
    for sid in sample_ids:
        returned += conn.execute(
            "UPDATE pipeline_samples SET state = 'requeued', consumer_job = NULL,"
            " consumer_epoch = NULL, leased_until = NULL WHERE pipeline_id = ? AND sample_id = ?"
            " AND state = 'leased' AND consumer_job = ? AND consumer_epoch = ?",
            (pipeline["id"], str(sid)[:128], job_id, epoch),
        ).rowcount
    return returned


# settle -----------------------------------------------------------------------------------
_CLEAR = "consumer_job = NULL, consumer_epoch = NULL, leased_until = NULL"


def settle_pipeline(conn: Conn, pipeline: Row, now: float) -> int:
    """Apply the settle rules to one producing pipeline; returns the rows changed (and 1
    for a pipeline completed)."""
    if pipeline["state"] != "producing":
        return 0
    pid = pipeline["id"]
    producer_up = _running("producer_job", "producer_epoch")
    changed = conn.execute(
        f"UPDATE pipeline_samples SET state = CASE WHEN {producer_up} THEN 'ready'"
        f" ELSE 'requeued' END, {_CLEAR} WHERE pipeline_id = ? AND state = 'leased'"
        f" AND (leased_until <= ? OR NOT {_running('consumer_job', 'consumer_epoch')})",
        (pid, now),
    ).rowcount
    consumer_done = _completed("consumer_job", "consumer_epoch")
    changed += conn.execute(
        "UPDATE pipeline_samples SET state = 'committed', committed_at = ? WHERE"
        f" pipeline_id = ? AND state = 'consumed' AND {consumer_done}",
        (now, pid),
    ).rowcount
    changed += conn.execute(
        f"UPDATE pipeline_samples SET state = 'requeued', {_CLEAR}, step = NULL,"
        " consumed_at = NULL WHERE pipeline_id = ? AND state = 'consumed'"
        f" AND NOT {_running('consumer_job', 'consumer_epoch')}",
        (pid,),
    ).rowcount
    if _spec(pipeline).store == "http":
        changed += conn.execute(
            "UPDATE pipeline_samples SET state = 'requeued' WHERE pipeline_id = ?"
            f" AND state = 'ready' AND NOT {producer_up}",
            (pid,),
        ).rowcount
    return changed + _complete_if_done(conn, pipeline, now)


def _complete_if_done(conn: Conn, pipeline: Row, now: float) -> int:
    pid, samples = pipeline["id"], _spec(pipeline).samples
    finished = conn.execute(
        "SELECT COUNT(*) FROM pipeline_samples WHERE pipeline_id = ? AND state = 'committed'"
        " AND released = 1",
        (pid,),
    ).fetchone()[0]
    running = conn.execute(
        "SELECT COUNT(*) FROM jobs WHERE pipeline_id = ?"
        " AND state IN ('pending', 'claimed', 'running')",
        (pid,),
    ).fetchone()[0]
    if finished < samples or running:
        return 0
    conn.execute(
        "UPDATE pipelines SET state = 'completed', detail = ?, updated_at = ? WHERE id = ?",
        (f"all {samples} samples committed and released", now, pid),
    )
    return 1


def settle(conn: Conn, now: float) -> int:
    """``settle_pipeline`` for every producing pipeline."""
    rows = conn.execute("SELECT * FROM pipelines WHERE state = 'producing'").fetchall()
    return sum(settle_pipeline(conn, row, now) for row in rows)


def counts(conn: Conn, pipeline_id: str) -> PipelineCounts:
    spec = _spec(pipeline_row(conn, pipeline_id))
    rows = conn.execute(
        "SELECT state, COUNT(*) AS n, SUM(released) AS released,"
        " SUM(times_produced) AS times FROM pipeline_samples WHERE pipeline_id = ?"
        " GROUP BY state",
        (pipeline_id,),
    ).fetchall()
    by_state = {r["state"]: int(r["n"]) for r in rows}
    produced = sum(by_state.values())
    return PipelineCounts(
        samples=spec.samples,
        produced=produced,
        backlog=by_state.get("ready", 0) + by_state.get("requeued", 0) + spec.samples - produced,
        in_flight=by_state.get("leased", 0),
        consumed=by_state.get("consumed", 0) + by_state.get("committed", 0),
        committed=by_state.get("committed", 0),
        released=sum(int(r["released"] or 0) for r in rows),
        requeued=by_state.get("requeued", 0),
        reproduced=sum(int(r["times"] or 0) for r in rows) - produced,
    )

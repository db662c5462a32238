"""Completing an attempt: what ``POST /v1/jobs/{id}/complete`` and each item of
``POST /v1/completions`` do.

The checks of the result (size, metrics, its artifact uploaded by this very attempt) run
first. Then the slow parts run on the ordinary threadpool, never on the queue's writer
(``coordinator/writer.py``): the shard plan of the job's dataset (it streams the source) and,
for a replica task of a collaborative run, judging its pseudo-gradient (decoding it). Only the
completion's own transaction runs on the writer. A referee job's loss arrays are checked
first too (``market.check_referee_losses``, in ``check_result``: a batch's items as well);
once it completed, its submission is settled on
the threadpool (``MarketDriver.referee_done``: the report, and the verdict if the panel is
complete).
"""

from __future__ import annotations

import json
from typing import Any

from trainfleet.coordinator.endpoints import Ctx
from trainfleet.coordinator.market import check_referee_losses
from trainfleet.errors import BadRequest, PayloadTooLarge
from trainfleet.queue.base import JobQueue, JobRecord
from trainfleet.queue.beats import Beat
from trainfleet.queue.sqlite import SQLQueue

# A completed attempt's result, serialized: kept with the job and sent with every job listing.
# The worker reports at most 1 MiB of metrics (worker/result.py), plus its own few fields.
MAX_RESULT_BYTES = 2 * 1024 * 1024


def check_result(result: dict[str, Any]) -> None:
    """Refuse a result too large to keep, whose metrics are not named numbers, or whose
    ``referee`` object is not two loss lists (``market.check_referee_losses``). Both the
    single completion and each item of a batch (``routes_batch``) are checked here."""
    size = len(json.dumps(result, ensure_ascii=False).encode())
    if size > MAX_RESULT_BYTES:
        raise PayloadTooLarge(
            f"result of {size} bytes (as JSON) is over the {MAX_RESULT_BYTES}-byte limit",
            limit_bytes=MAX_RESULT_BYTES,
        )
    metrics = result.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise BadRequest(
            f"result.metrics must be a JSON object of named metrics, not {type(metrics).__name__}"
        )
    check_referee_losses(result)


async def complete_attempt(ctx: Ctx, job_ref: str, epoch: int, result: dict[str, Any]) -> JobRecord:
    """Complete ``worker``'s attempt ``epoch`` of ``job_ref`` with ``result`` (fenced).

    A plain job without a dataset (the common case) completes in ONE writer call and one
    transaction, which also writes the attempt's first beat if the heartbeat book still holds
    it (``HeartbeatBook.take_start``); a job with a dataset has its shards planned on the
    threadpool first, and a replica task is judged there (``RoundDriver.complete``)."""
    queue, beats = ctx.coord.queue, ctx.coord.beats
    check_result(result)
    start = beats.take_start(job_ref, ctx.worker, epoch)
    try:
        job, record = await ctx.run_hot(
            _complete_plain, queue, job_ref, ctx.worker, epoch, result, start
        )
    except BaseException:
        if start is not None:
            beats.give_back(start)
        raise
    if record is None:
        if start is not None:  # the slow paths below do not fold it: written first
            beats.give_back(start)
            await beats.write_starts(ctx.run_db)
        if job.spec.trained_dataset is not None:
            await ctx.run_io(queue.ensure_shard_plan, job.id)
        if job.spec.kind == "replica":  # a run's task: its pseudo-gradient is judged
            record = await ctx.run_io(ctx.coord.rounds.complete, job, ctx.worker, epoch, result)
        else:
            record = await ctx.run_db(queue.complete, job.id, ctx.worker, epoch, result)
    beats.forget(job.id)  # the attempt is over: its beats are no longer answered
    if job.spec.kind == "referee" and record.state == "completed":
        await ctx.run_io(ctx.coord.market.referee_done, record)
    return record


def _complete_plain(
    queue: JobQueue,
    job_ref: str,
    worker_id: str,
    epoch: int,
    result: dict[str, Any],
    start: Beat | None,
) -> tuple[JobRecord, JobRecord | None]:
    """On the writer: the job, its result's artifact checked, and the completion itself when
    nothing slow must come first (no dataset to plan, no pseudo-gradient to judge)."""
    if isinstance(queue, SQLQueue):  # every served queue: one transaction
        return queue.complete_plain(job_ref, worker_id, epoch, result, start)
    job = queue.get_job(job_ref)
    artifact = result.get("artifact")
    if artifact is not None:
        bound = queue.artifacts(job.id)
        if not any(a.sha256 == artifact and a.epoch == epoch for a in bound):
            raise BadRequest(f"result names artifact {artifact!r}, not uploaded by this attempt")
    if job.spec.kind == "replica" or job.spec.trained_dataset is not None:
        return job, None
    return job, queue.complete(job.id, worker_id, epoch, result)


__all__ = ["MAX_RESULT_BYTES", "check_result", "complete_attempt"]

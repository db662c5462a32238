"""Completing an attempt: what ``POST /v1/jobs/{id}/complete`` and each item of
``POST /v1/completions`` do.

The checks of the result (size, metrics, its artifact uploaded by this very attempt) run
first. Then the slow parts run on the ordinary threadpool, never on the queue's writer
(``coordinator/writer.py``): the shard plan of the job's dataset (it streams the source) and,
for a replica task of a collaborative run, judging its pseudo-gradient (decoding it). Only the
completion's own transaction runs on the writer.
"""

from __future__ import annotations

import json
from typing import Any

from trainfleet.coordinator.endpoints import Ctx
from trainfleet.errors import BadRequest, PayloadTooLarge
from trainfleet.queue.base import JobRecord

# A completed attempt's result, serialized: kept with the job and sent with every job listing.
# The worker reports at most 1 MiB of metrics (worker/result.py), plus its own few fields.
MAX_RESULT_BYTES = 2 * 1024 * 1024


def check_result(result: dict[str, Any]) -> None:
    """Refuse a result too large to keep, or whose metrics are not named numbers."""
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


async def complete_attempt(ctx: Ctx, job_ref: str, epoch: int, result: dict[str, Any]) -> JobRecord:
    """Complete ``worker``'s attempt ``epoch`` of ``job_ref`` with ``result`` (fenced)."""
    queue = ctx.coord.queue
    check_result(result)
    artifact = result.get("artifact")
    if artifact is not None:
        bound = await ctx.run_db(queue.artifacts, job_ref)
        if not any(a.sha256 == artifact and a.epoch == epoch for a in bound):
            raise BadRequest(f"result names artifact {artifact!r}, not uploaded by this attempt")
    job = await ctx.run_db(queue.get_job, job_ref)
    await ctx.run_io(queue.ensure_shard_plan, job.id)
    if job.spec.kind == "replica":  # a run's task: its pseudo-gradient is judged and recorded
        # Judging decodes the pseudo-gradient: the threadpool's work (RoundDriver.complete).
        record = await ctx.run_io(ctx.coord.rounds.complete, job, ctx.worker, epoch, result)
    else:
        record = await ctx.run_db(queue.complete, job.id, ctx.worker, epoch, result)
    ctx.coord.beats.forget(job.id)  # the attempt is over: its beats are no longer answered
    return record


__all__ = ["MAX_RESULT_BYTES", "check_result", "complete_attempt"]

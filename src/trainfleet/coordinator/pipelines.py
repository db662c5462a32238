"""The pipeline driver: turns a manifest's ``[[pipelines]]`` into running producer and consumer
jobs, and keeps their durable ref queue settled (issue 11).

A pipeline waits for its teacher, a train job of the ``gpt`` recipe in the same manifest.
Each tick (every ``TICK_S``, on the leader only, like the market's driver), for every
pipeline still to drive (``queue.pipelines_to_drive``: waiting or producing):

- **waiting, teacher completed**: the ``model.safetensors`` of the teacher's packed output is
  extracted into the artifact store (``market_sources.job_model``: streamed, bounded by the
  teacher family's file size, pinned until the queue binds it) and ``queue.start_pipeline``
  records its sha256 and inserts the producer and consumer jobs in one transaction. The
  teacher model stays bound to the pipeline (``queue.is_bound``), so the artifact GC keeps it,
  and workers running a producer job of the pipeline may download it
  (``GET /v1/market/models/{sha256}``, ``queue.holds_model``).
- **waiting, teacher failed or cancelled** (or its output holds no usable model): the
  pipeline fails with the reason (``queue.fail_pipeline``).
- **producing**: ``queue.ensure_consumers`` inserts the consumer jobs a reload asked for (and
  cancels pending ones past the new count; the partition follows ``consumers``). A pipeline
  that can never complete fails with the reason: a producer job failed for good, or a
  consumer job did and no consumer job is left to train on what is not yet committed.

Then ``queue.settle_pipelines`` applies the time and attempt rules of the ref queue (expired
leases, dead attempts, completed pipelines). When jobs were inserted, long-poll claims are
woken (``coord.work.notify``). Every step is idempotent: a coordinator that dies mid-tick
leaves nothing the next tick (here or on the next leader) does not finish.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

from trainfleet.coordinator import market_sources
from trainfleet.coordinator.market import model_bytes_limit
from trainfleet.errors import ApiError
from trainfleet.train.recipes import GPTParams

if TYPE_CHECKING:
    from trainfleet.coordinator.state import Coordinator
    from trainfleet.queue.base import JobRecord

log = logging.getLogger(__name__)

TICK_S = 1.0
TEACHER_ENDED = ("failed", "cancelled")


class PipelineDriver:
    """The pipelines' side of one coordinator (ticked by ``drive_forever``)."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        self.lock = threading.Lock()

    def tick(self) -> int:
        """One pass over every pipeline to drive, then settle the ref queue; the number of
        jobs inserted (long-poll claims are woken when there are any)."""
        inserted = 0
        with self.lock:
            for pipeline in self.coord.queue.pipelines_to_drive():
                try:
                    inserted += self._drive(pipeline)
                except Exception:
                    log.exception("pipeline %s: driving failed; retrying", pipeline.name)
            self.coord.queue.settle_pipelines()
        if inserted:
            self.coord.work.notify()
        return inserted

    def _drive(self, pipeline: Any) -> int:
        queue = self.coord.queue
        if pipeline.state == "producing":
            stuck = self._stuck(pipeline)
            if stuck:
                self._fail(pipeline, stuck)
                return 0
            return queue.ensure_consumers(pipeline.id)
        if pipeline.state != "waiting" or not pipeline.teacher_job:
            return 0
        teacher = queue.get_job(pipeline.teacher_job)
        if teacher.state in TEACHER_ENDED:
            why = (teacher.error or "no reason given").splitlines()[0][:300]
            self._fail(pipeline, f"teacher job {teacher.name} {teacher.state}: {why}")
            return 0
        if teacher.state != "completed":
            return 0
        try:
            started = self._start(pipeline, teacher)
        except ApiError as err:  # no artifact, no model in it, not of the teacher's family
            self._fail(pipeline, f"teacher job {teacher.name} left no usable model: {err}")
            return 0
        spec = started.spec
        jobs = int(getattr(spec, "producers", 0)) + int(started.consumers or 0)
        log.info(
            "pipeline %s (%s): teacher model %s; %d producer and consumer job(s) queued",
            pipeline.name,
            pipeline.id[:12],
            str(started.teacher_model)[:12],
            jobs,
        )
        return max(jobs, 1)

    def _stuck(self, pipeline: Any) -> str:
        """Why a producing pipeline can never complete, or "": a producer job failed for
        good (no other producer makes its share), or a consumer job failed and no consumer
        job is left pending or active to train on what is not yet committed."""
        queue = self.coord.queue
        jobs = queue.pipeline_jobs(pipeline.id)
        failed = [j for j in jobs if j.state == "failed"]
        if not failed:
            return ""
        producers = [j for j in failed if j.spec.kind == "producer"]
        active = [
            j
            for j in jobs
            if j.spec.kind == "consumer" and j.state in ("pending", "claimed", "running")
        ]
        counts = queue.pipeline_counts(pipeline.id)
        if not producers and (active or counts.committed >= counts.samples):
            return ""  # the other consumers take over its partition (or all is committed)
        job = (producers or failed)[0]
        why = (job.error or "no reason given").splitlines()[0][:300]
        return f"job {job.name} failed: {why}"

    def _start(self, pipeline: Any, teacher: JobRecord) -> Any:
        """Extract the teacher's model into the store and start the pipeline on it."""
        params = GPTParams.model_validate(dict(teacher.spec.hyper))
        limit = model_bytes_limit(params)
        store, staging = self.coord.store, self.coord.staging_dir
        with market_sources.job_model(store, staging, teacher, limit) as sha256:
            return self.coord.queue.start_pipeline(pipeline.id, sha256)

    def _fail(self, pipeline: Any, reason: str) -> None:
        self.coord.queue.fail_pipeline(pipeline.id, reason)
        log.warning("pipeline %s (%s) failed: %s", pipeline.name, pipeline.id[:12], reason)


async def drive_forever(coord: Coordinator, driver: PipelineDriver | None = None) -> None:
    """Tick the pipeline driver every ``TICK_S``, on the leader only; run by the app's
    lifespan (``app.py``) beside the round and market drivers."""
    driver = driver or PipelineDriver(coord)
    try:
        while True:
            await asyncio.sleep(TICK_S)
            if not coord.leader.is_leader:
                continue  # another coordinator of this database ticks (coordinator.leader)
            try:
                await asyncio.to_thread(driver.tick)
            except Exception:
                log.exception("pipeline driver tick failed; retrying")
    finally:
        # A cancelled await leaves its thread running: wait for that tick to end, or the
        # queue is closed under it on shutdown.
        await asyncio.to_thread(_wait_idle, driver.lock)


def _wait_idle(lock: threading.Lock) -> None:
    with lock:
        pass


__all__ = ["TICK_S", "PipelineDriver", "drive_forever"]

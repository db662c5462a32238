"""``SQLQueue``'s pipeline methods: transactions around ``sqlite_pipelines`` (rows, jobs, the
attempt fence) and ``sqlite_pipeline_refs`` (the durable ref queue). A mixin, so that
``queue.sqlite`` stays one concept: each write opens one write transaction, each read is
one statement at a time."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from trainfleet.queue import sqlite_pipeline_refs as ref_queue
from trainfleet.queue import sqlite_pipelines as rows
from trainfleet.queue.base import JobRecord
from trainfleet.queue.db import Conn
from trainfleet.queue.pipelines_base import (
    AckResult,
    LeaseReply,
    PipelineCounts,
    PipelineRecord,
    ProducerSync,
    PublishReply,
)

# The artifact GC keeps every pipeline's teacher model (``SQLQueue.is_bound``).
PIPELINE_BOUND = "SELECT 1 FROM pipelines WHERE teacher_model = ? LIMIT 1"


class PipelineMethods:
    """Mixed into ``SQLQueue``: what it provides is declared here."""

    clock: Callable[[], float]

    def _conn(self) -> Conn:
        raise NotImplementedError

    def _tx(self, *, shared: bool = False) -> AbstractContextManager[Conn]:
        raise NotImplementedError

    # reads ----------------------------------------------------------------------------
    def list_pipelines(self) -> list[PipelineRecord]:
        return rows.list_pipelines(self._conn())

    def get_pipeline(self, ref: str) -> PipelineRecord:
        return rows.get_pipeline(self._conn(), ref)

    def pipeline_counts(self, pipeline_id: str) -> PipelineCounts:
        return ref_queue.counts(self._conn(), pipeline_id)

    def pipeline_jobs(self, pipeline_id: str) -> list[JobRecord]:
        return rows.pipeline_jobs(self._conn(), pipeline_id)

    def pipelines_to_drive(self) -> list[PipelineRecord]:
        return rows.pipelines_to_drive(self._conn())

    def pipeline_secret(self, pipeline_id: str) -> str:
        return rows.pipeline_secret(self._conn(), pipeline_id)

    def pipeline_attempt_key(self, pipeline_id: str) -> str:
        return rows.pipeline_attempt_key(self._conn(), pipeline_id)

    def pipeline_attempt(self, job_id: str, epoch: int) -> tuple[JobRecord, PipelineRecord, str]:
        with self._tx() as conn:  # one snapshot of the job and its pipeline
            return rows.pipeline_attempt(conn, job_id, epoch)

    # the driver -----------------------------------------------------------------------
    def start_pipeline(self, pipeline_id: str, teacher_model: str) -> PipelineRecord:
        with self._tx() as conn:
            return rows.start_pipeline(conn, pipeline_id, teacher_model, self.clock())

    def fail_pipeline(self, pipeline_id: str, reason: str) -> PipelineRecord:
        with self._tx() as conn:
            return rows.fail_pipeline(conn, pipeline_id, reason, self.clock())

    def ensure_consumers(self, pipeline_id: str) -> int:
        with self._tx() as conn:
            return rows.ensure_consumers(conn, pipeline_id, self.clock())

    def settle_pipelines(self, now: float | None = None) -> int:
        with self._tx() as conn:
            return ref_queue.settle(conn, self.clock() if now is None else now)

    # the job processes (fenced by their attempt) -------------------------------------
    def publish_samples(self, job_id: str, epoch: int, refs: list[dict[str, Any]]) -> PublishReply:
        with self._tx() as conn:
            return ref_queue.publish(conn, job_id, epoch, refs, self.clock())

    def lease_samples(self, job_id: str, epoch: int, max_samples: int) -> LeaseReply:
        with self._tx() as conn:
            return ref_queue.lease(conn, job_id, epoch, max_samples, self.clock())

    def ack_samples(self, job_id: str, epoch: int, acks: list[tuple[str, int]]) -> list[AckResult]:
        with self._tx() as conn:
            return ref_queue.ack(conn, job_id, epoch, acks, self.clock())

    def return_samples(self, job_id: str, epoch: int, sample_ids: list[str]) -> int:
        with self._tx() as conn:
            return ref_queue.return_samples(conn, job_id, epoch, sample_ids, self.clock())

    def producer_sync(self, job_id: str, epoch: int, released: list[str]) -> ProducerSync:
        with self._tx() as conn:
            return ref_queue.producer_sync(conn, job_id, epoch, released, self.clock())

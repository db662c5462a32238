"""Records of disaggregated pipelines, as the queue stores them (``queue.sqlite_pipelines``).

Two tables beside the jobs, in the same database and the same transactions (schema
version 6, ``queue.migrations``):

- ``pipelines``: one row per pipeline identity (``manifest.pipelines.PipelineSpec``; its id is
  the sha256 of ``identity()``): its state (``waiting`` for the teacher's model,
  ``producing``, then ``completed`` | ``failed`` | ``superseded``), the teacher's model digest,
  the current number of consumers, and its secret (hex; it signs the sample refs and the
  attempt tokens). The secret is never part of a ``PipelineRecord``: readers never see it;
  ``JobQueue.pipeline_secret`` hands it to the coordinator's routes only.
- ``pipeline_samples``: the durable ref queue, one row per sample produced: its current
  ``SampleRef`` (JSON), who produced it (job, epoch), and its state: ``ready`` ->
  ``leased`` (by a consumer attempt, until a deadline) -> ``consumed`` (acked: the consumer
  trains on it) -> ``committed`` (that consumer attempt completed). ``requeued`` means the
  producer must make it again (the consumer could not fetch it, or its consumer attempt died
  after consuming it, or an HTTP producer died while it was ready).

A pipeline's producers and consumers are ordinary queue jobs (``kind = "producer"`` /
``"consumer"``, ``jobs.pipeline_id``), pinned (claimable though in no manifest), claimed,
fenced and reaped like any other. Sample refs travel as JSON objects here (the queue does not
import the feature store); ``trainfleet.features.ref.SampleRef`` parses them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.manifest.pipelines import PipelineSpec

PipelineState = Literal["waiting", "producing", "completed", "failed", "superseded"]
SampleState = Literal["ready", "leased", "consumed", "committed", "requeued"]
MAX_BATCH = 256
"""Refs one publish, samples one lease, acks one ack may carry at most."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class PipelineRecord(_Record):
    """A pipeline as the queue holds it (never its secret)."""

    id: str = Field(description="sha256 of the pipeline's canonical identity")
    name: str
    state: PipelineState
    spec: PipelineSpec
    teacher_job: str = Field(description="id of the [[jobs]] job whose model is the teacher")
    teacher_model: str | None = Field(
        description="sha256 of the teacher's model.safetensors (None while waiting)"
    )
    consumers: int = Field(description="the current number of consumers (partitions)")
    in_manifest: bool = Field(description="false once a reload removed it")
    detail: str = Field(description="why it is in its state (a failure's reason, say)")
    created_at: float
    updated_at: float


class PipelineCounts(_Record):
    """Where a pipeline's samples stand (``trainfleet pipeline show``)."""

    samples: int = Field(description="samples the pipeline makes in all")
    produced: int = Field(description="samples published at least once")
    backlog: int = Field(description="ready, requeued, or not yet produced")
    in_flight: int = Field(description="leased to a consumer, not yet acked")
    consumed: int = Field(description="acked by a consumer (consumed or committed)")
    committed: int = Field(description="consumed by a consumer attempt that completed")
    released: int = Field(description="whose bytes the producer has released")
    requeued: int = Field(description="waiting for the producer to make them again")
    reproduced: int = Field(description="publishes beyond the first, over all samples")


class SkippedSample(_Record):
    sample_id: str
    reason: str


class PublishReply(_Record):
    accepted: list[str] = Field(description="sample ids now ready")
    skipped: list[SkippedSample] = Field(
        description="refs not taken (the sample is already ready, leased or consumed)"
    )


class LeaseReply(_Record):
    samples: list[dict[str, Any]] = Field(description="SampleRef JSON objects, in idx order")
    retire: bool = Field(description="this consumer's index is >= the consumers now: stop")
    done: bool = Field(description="every sample is produced and consumed by someone")
    num_consumers: int


class AckResult(_Record):
    sample_id: str
    accepted: bool = Field(description="False: the consumer must NOT train on this sample")
    reason: str = ""


class ProducerSync(_Record):
    release: list[dict[str, Any]] = Field(
        description="SampleRef JSON of this producer's consumed samples not yet released"
    )
    produce: list[int] = Field(description="indexes of its share to make (new or requeued)")
    finished: bool = Field(
        description="its whole share is committed and released, or the pipeline ended"
    )


__all__ = [
    "MAX_BATCH",
    "AckResult",
    "LeaseReply",
    "PipelineCounts",
    "PipelineRecord",
    "PipelineState",
    "ProducerSync",
    "PublishReply",
    "SampleState",
    "SkippedSample",
]

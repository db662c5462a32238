"""Disaggregated pipelines in the manifest (``[[pipelines]]``), and the task of their jobs.

A pipeline feeds a student trainer from a teacher model through a feature store: producer
jobs (``kind = "producer"``) compute the teacher's top-k logits of ``samples`` batches drawn
from a dataset and put them in a store; consumer jobs (``kind = "consumer"``) lease the
references from the coordinator's durable ref queue and train the student by knowledge
distillation (Hinton et al. 2015, arXiv 1503.02531). Only references travel on the control
plane; the bytes stay in the store (``trainfleet.features``).

``PipelineSpec`` is the manifest's declaration. Its ``identity()`` names what the samples
*are* (teacher, data, student, sampling, loss); everything else is scheduling, which a reload
changes in place (``consumers`` included: a change re-partitions the queue). ``PipelineTask``
rides in a producer's or consumer's ``JobSpec.task``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, StringConstraints, field_validator, model_validator

from trainfleet.data.spec import DatasetSpec, content_fields
from trainfleet.manifest.names import HostName, Int64, Name, _Spec

# Up to 80 characters: its jobs' names, f"{name}.consumer{k}", must stay valid job Names.
PipelineName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")]
Role = Literal["producer", "consumer"]
MAX_SAMPLES = 10_000_000  # sample ids are f"{idx:08d}"
STUDENT_IGNORED = ("steps", "corpus", "corpus_bytes", "heldout_fraction")
"""GPTParams keys a student does not take: its steps are ``samples``, its data the dataset."""
_HEX64 = r"^[0-9a-f]{64}$"


class PipelineSpec(_Spec):
    """One knowledge-distillation pipeline: teacher producer jobs feed student consumer jobs."""

    name: PipelineName = Field(description="unique pipeline name (letters, digits, . _ -; <= 80)")
    teacher: Name = Field(description="the [[jobs]] train job (recipe gpt) whose model teaches")
    teacher_id: str | None = Field(
        None,
        pattern=_HEX64,
        description="the teacher job's id; set by the loader, never written in a manifest",
    )
    dataset: DatasetSpec = Field(description="the [datasets.NAME] spec samples are drawn from")
    student: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="the student's gpt params (not steps, corpus, corpus_bytes,"
        " heldout_fraction: its steps are the samples, its data the dataset)",
    )
    samples: int = Field(64, ge=1, le=MAX_SAMPLES, description="samples produced = student steps")
    top_k: int = Field(8, ge=1, le=4096, description="teacher logits kept per position")
    temperature: float = Field(2.0, gt=0, le=100, description="distillation temperature")
    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the hard-label cross-entropy (1 - alpha: KD)"
    )
    seed: int = Field(0, ge=0, description="seed of the sample windows and the student's init")
    producers: int = Field(
        1, ge=1, le=256, description="teacher jobs; sample i is produced by i % producers"
    )
    consumers: int = Field(
        1, ge=1, le=256, description="student jobs; may change on reload (re-partitions)"
    )
    store: str = Field(
        "http",
        description="'http' (served by the producer) or 'dir:/abs/shared/path'",
    )
    high_watermark_mib: float = Field(
        256, gt=0, description="a producer waits while its store holds more than this"
    )
    low_watermark_mib: float = Field(
        128, ge=0, description="... until consumption brings it under this"
    )
    lease_s: float = Field(60, gt=0, le=86_400, description="a leased, un-acked sample returns")
    max_ref_age_s: float = Field(3600, gt=0, description="a held ref older than this is freed")
    priority: Int64 = Field(0, description="priority of its jobs")
    producer_hosts: list[HostName] = Field(
        default_factory=list, description="hosts that may run its producers; empty = any"
    )
    consumer_hosts: list[HostName] = Field(
        default_factory=list, description="hosts that may run its consumers; empty = any"
    )
    producer_require_cuda: bool = Field(False, description="only CUDA hosts run its producers")
    timeout_s: float = Field(3600, gt=0, description="wall-clock limit of one job attempt")
    max_failures: int = Field(3, ge=1, le=100, description="failed attempts of one of its jobs")

    @field_validator("store")
    @classmethod
    def _store_address(cls, store: str) -> str:
        if store != "http" and not (store.startswith("dir:/") and len(store) <= 4096):
            raise ValueError("store is 'http' or 'dir:' and an absolute path ('dir:/shared/kd')")
        return store

    @model_validator(mode="after")
    def _check(self) -> PipelineSpec:
        if self.low_watermark_mib >= self.high_watermark_mib:
            raise ValueError(
                f"low_watermark_mib ({self.low_watermark_mib}) must be below"
                f" high_watermark_mib ({self.high_watermark_mib})"
            )
        if self.producers > self.samples:
            raise ValueError(f"producers ({self.producers}) > samples ({self.samples})")
        return self

    def identity(self) -> dict[str, Any]:
        """What makes it the same pipeline (a change starts a new one)."""
        return {
            "name": self.name,
            "teacher": self.teacher_id,
            "dataset": content_fields(self.dataset),
            "student": self.student,
            "samples": self.samples,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "seed": self.seed,
            "producers": self.producers,
            "store": self.store,
        }

    def ref_store_problem(self, address: str) -> str | None:
        """Why a ref naming store ``address`` must not be published or opened (None: it may).

        A producer holds the pipeline secret, so it can sign any ref; the store a ref names is
        checked against the pipeline's own so that a producer cannot point consumers at a
        local directory (``dir:/etc``), another process's in-process store or a non-HTTP
        scheme. A ``dir:`` pipeline's refs name exactly its directory; an ``http`` pipeline's
        name ``http(s)://host:port`` with nothing else (no path, user, query or fragment)."""
        if self.store != "http":
            # its directory as configured, or as the producer's store resolves it (symlinks
            # resolved on this host: configure the real path when hosts differ)
            path = self.store[len("dir:") :]
            own = {self.store, f"dir:{os.path.normpath(path)}", f"dir:{os.path.realpath(path)}"}
            return None if address in own else f"store is not {self.store!r}"
        parts = urlsplit(address)
        try:
            parts.port  # noqa: B018 (a bad port raises)
        except ValueError:
            return "store has a bad port"
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or "@" in parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or any(c.isspace() for c in address)
        ):
            return "store is not an http(s)://host:port address"
        return None

    def job_name(self, role: Role, index: int) -> str:
        """The name of its producer p or consumer k."""
        return f"{self.name}.{role}{index}"

    def share(self, producer: int) -> range:
        """The sample indexes producer ``producer`` makes: idx % producers == producer."""
        return range(producer, self.samples, self.producers)


def pipeline_id(spec: PipelineSpec) -> str:
    """The pipeline's id: sha256 of the canonical JSON of its identity (64 hex)."""
    body = json.dumps(spec.identity(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def sample_id(idx: int) -> str:
    """The id of sample ``idx``: its index, zero-padded to 8 digits."""
    return f"{idx:08d}"


def bucket(sample: str) -> int:
    """The stable hash a consumer partition is taken from: the first 8 hex digits of
    sha256(sample id), masked to 0..2^31-1; consumer k of num takes bucket % num == k."""
    return int(hashlib.sha256(sample.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


class PipelineTask(_Spec):
    """What a producer or consumer job works on (it rides in ``JobSpec.task``)."""

    pipeline: PipelineName = Field(description="the pipeline's name")
    pipeline_id: str = Field(pattern=_HEX64, description="the pipeline's id")
    role: Role = Field(description="'producer' (teacher features) or 'consumer' (student)")
    index: int = Field(ge=0, le=1023, description="producer p or consumer k")

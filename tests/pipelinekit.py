"""Test helpers for pipelines on the queue: a manifest with a teacher job and one pipeline,
claims of its producer and consumer jobs (by host: producers on "prod", consumers on "cons",
the teacher on "tea"), and refs signed with the pipeline's secret."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.features.ref import sign_ref
from trainfleet.manifest.pipelines import bucket, sample_id
from trainfleet.queue import JobQueue
from trainfleet.queue.base import JobRecord
from trainfleet.queue.pipelines_base import PipelineRecord

TEACHER_MODEL = "7e" * 32
DIGEST = "0" * 64


def manifest_text(
    *,
    samples: int = 8,
    producers: int = 1,
    consumers: int = 1,
    store: str = "http",
    lease_s: float = 60,
    priority: int = 0,
    seed: int = 0,
) -> str:
    return f"""
[datasets.text]
source = "synthetic"
num_documents = 50

[[jobs]]
name = "teacher"
dataset = "text"
allowed_hosts = ["tea"]
hyper = {{ n_layers = 1, d_model = 32, n_heads = 2, steps = 5 }}

[[pipelines]]
name = "distill"
teacher = "teacher"
dataset = "text"
student = {{ n_layers = 1, d_model = 16, n_heads = 2, seq_len = 32 }}
samples = {samples}
producers = {producers}
consumers = {consumers}
store = "{store}"
lease_s = {lease_s}
priority = {priority}
seed = {seed}
producer_hosts = ["prod"]
consumer_hosts = ["cons"]
"""


@dataclass
class Attempt:
    job: JobRecord
    worker: str
    epoch: int

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def index(self) -> int:
        task = self.job.spec.pipeline_task
        assert task is not None
        return task.index


@dataclass
class Kit:
    queue: JobQueue
    clock: FakeClock
    pipeline: PipelineRecord
    secret: bytes
    workers: list[str] = field(default_factory=list)

    def claim(self, host: str) -> Attempt:
        worker, _ = self.queue.register_worker(make_cap(host))
        got = self.queue.claim(worker.id)
        assert got is not None, f"nothing for {host}"
        return Attempt(got.job, worker.id, got.epoch)

    def claim_consumer(self, index: int) -> Attempt:
        """Claim until consumer ``index`` is taken (others claimed on the way are handed
        back without counting a failure)."""
        others = []
        try:
            while True:
                attempt = self.claim("cons")
                if attempt.index == index:
                    return attempt
                others.append(attempt)
        finally:
            for other in others:
                self.queue.fail(other.id, other.worker, other.epoch, "not now", release=True)

    def ref(self, idx: int, *, secret: bytes | None = None, **over: Any) -> dict[str, Any]:
        sid = sample_id(idx)
        fields: dict[str, Any] = {
            "store": "http://127.0.0.1:9",
            "pipeline": self.pipeline.id,
            "sample_id": sid,
            "key": sid,
            "generation": 1,
            "digest": DIGEST,
            "size": 10,
        }
        fields.update(over)
        return sign_ref(**fields, secret=secret or self.secret).model_dump(mode="json")

    def publish(self, producer: Attempt, idxs: list[int], **over: Any) -> list[str]:
        reply = self.queue.publish_samples(
            producer.id, producer.epoch, [self.ref(i, **over) for i in idxs]
        )
        return reply.accepted

    def states(self) -> dict[str, str]:
        return sample_states(self.queue, self.pipeline.id)

    def reload(self, **kw: Any) -> Any:
        return self.queue.apply_manifest(manifest_of(manifest_text(**kw)))


def sample_states(queue: JobQueue, pipeline_id: str) -> dict[str, str]:
    conn = queue._conn()  # type: ignore[attr-defined]
    rows = conn.execute(
        "SELECT sample_id, state FROM pipeline_samples WHERE pipeline_id = ? ORDER BY idx",
        (pipeline_id,),
    ).fetchall()
    return {r["sample_id"]: r["state"] for r in rows}


def start(queue: JobQueue, clock: FakeClock, **kw: Any) -> Kit:
    queue.apply_manifest(manifest_of(manifest_text(**kw)))
    pipeline = queue.start_pipeline(queue.get_pipeline("distill").id, TEACHER_MODEL)
    return Kit(queue, clock, pipeline, bytes.fromhex(queue.pipeline_secret(pipeline.id)))


def ids_of(kit: Kit, idxs: list[int]) -> list[str]:
    return [sample_id(i) for i in idxs]


def partition(num: int, index: int, samples: int) -> list[int]:
    return [i for i in range(samples) if bucket(sample_id(i)) % num == index]

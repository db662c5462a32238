"""The producer side of the disaggregation test, run as its own process:
``python produce_child.py SPEC_JSON TEACHER_JSON TEACHER_FILE STORE_ROOT SECRET_HEX REFS_FILE``.

It runs the real ``produce()`` into a ``SharedDirStore`` at STORE_ROOT. Its control plane is a
bridge that owns every sample and appends each published ref, as one JSON line, to REFS_FILE
(refs only: the test's consumer reads them back and publishes them on its own LocalControl).
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainfleet.features import SharedDirStore
from trainfleet.features.ref import SampleRef
from trainfleet.manifest.pipelines import PipelineSpec
from trainfleet.pipeline.control import AckResult, Lease, PublishResult, Sync
from trainfleet.pipeline.distill import load_teacher
from trainfleet.pipeline.producer import produce
from trainfleet.train.recipes import GPTParams


class FileBridge:
    """A producer's ``PipelineControl`` that publishes to a file and finishes once every
    sample is published (nobody consumes here)."""

    def __init__(self, samples: int, refs_file: Path):
        self.pending = set(range(samples))
        self.refs_file = refs_file

    def publish(self, refs: list[SampleRef]) -> PublishResult:
        with self.refs_file.open("a") as f:
            for ref in refs:
                f.write(ref.model_dump_json() + "\n")
                self.pending.discard(int(ref.sample_id))
        return PublishResult(accepted=[r.sample_id for r in refs], skipped=[])

    def sync(self, released: list[str]) -> Sync:
        return Sync(release=[], produce=sorted(self.pending), finished=not self.pending)

    def lease(self, max_samples: int) -> Lease:
        raise NotImplementedError("a producer's bridge")

    def ack(self, acks: list[tuple[str, int]]) -> list[AckResult]:
        raise NotImplementedError("a producer's bridge")

    def return_samples(self, sample_ids: list[str]) -> int:
        raise NotImplementedError("a producer's bridge")


def main() -> None:
    spec_json, teacher_json, teacher_file, root, secret_hex, refs_file = sys.argv[1:]
    spec = PipelineSpec.model_validate_json(spec_json)
    teacher = load_teacher(Path(teacher_file), GPTParams.model_validate_json(teacher_json))
    store = SharedDirStore(root, secret=bytes.fromhex(secret_hex), pipeline="kd")
    bridge = FileBridge(spec.samples, Path(refs_file))
    result = produce(bridge, store, teacher, spec, num_threads=1, log=lambda _: None)
    assert result.produced == spec.samples, result
    # the store stays open until now; its blobs outlive this process (a shared directory)


if __name__ == "__main__":
    main()

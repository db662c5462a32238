"""The worker's side of a pipeline job: attach, ``attach.json``, and the teacher model.

A disaggregated pipeline (``[[pipelines]]``, issue 11) runs producer jobs (``kind =
"producer"``: a teacher computing top-k logits into a feature store) and consumer jobs
(``kind = "consumer"``: a student trained on them). Before the program starts, the worker

- attaches the claimed attempt to its pipeline (``POST /v1/jobs/{job_id}/pipeline``, fenced
  by the claim's epoch): the reply carries the pipeline's secret, the attempt token the
  program authenticates with on the pipeline routes, the spec and the teacher model's sha256;
- writes it, with the coordinator's URL (``"coordinator"``) and the CA file the worker
  trusts (``"ca"``, or null), to ``attach.json`` in the attempt's directory, mode 0600 (it
  holds the secret; written to a temporary file first, then renamed);
- for a producer, fetches the teacher model by sha256 into the worker's models cache (``GET
  /v1/market/models/{sha256}``, which the coordinator answers to a worker running a producer
  job of that pipeline), as a referee fetches its models.

The program (``python -m trainfleet.pipeline.producer|consumer``) writes its outputs and
``metrics.json`` into the output directory, which the worker uploads and completes with like
a train job's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from trainfleet.errors import BadRequest
from trainfleet.worker.launch import PipelineFiles
from trainfleet.worker.referee_task import ModelSource, _Models
from trainfleet.worker.replica_task import WeightsCache

ATTACH_FILE = "attach.json"
ATTACH_MODE = 0o600
PIPELINE_KINDS = ("producer", "consumer")


class AttachSource(ModelSource, Protocol):
    def attach_pipeline(self, job_id: str, epoch: int) -> dict[str, Any]: ...


def write_attach(path: Path, attach: dict[str, Any]) -> Path:
    """Write ``attach`` as JSON to ``path``, readable by this user only (0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ATTACH_MODE)
    try:
        os.fchmod(fd, ATTACH_MODE)  # an older file of that name keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            fd = -1
            json.dump(attach, f, indent=2)
            f.write("\n")
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)
    return path


def prepare(
    job_id: str,
    epoch: int,
    kind: str,
    attempt_dir: Path,
    cache: WeightsCache,
    source: AttachSource,
    coordinator: str,
    ca: str | None,
    give_up: Callable[[], bool] | None = None,
) -> PipelineFiles:
    """Attach, write ``attach.json``, fetch a producer's teacher: the program's files."""
    attach = source.attach_pipeline(job_id, epoch)
    teacher = None
    if kind == "producer":
        sha256 = attach.get("teacher_model")
        if not isinstance(sha256, str):
            raise BadRequest("the coordinator attached a producer without a teacher model")
        teacher = cache.get(_Models(source), sha256, None, give_up)
    path = write_attach(attempt_dir / ATTACH_FILE, {**attach, "coordinator": coordinator, "ca": ca})
    return PipelineFiles(attach=path, teacher=teacher)


__all__ = ["ATTACH_FILE", "ATTACH_MODE", "PIPELINE_KINDS", "prepare", "write_attach"]

"""The worker's side of a referee job: the two models it fetches, and the result it reports.

A market submission (``trainfleet market submit``) is re-scored by a panel of referee jobs
(``kind = "referee"``), each on a distinct enrolled host that did not produce the model
(``queue.claims``). A referee job carries a :class:`~trainfleet.verify.spec.RefereeTask`;
before the referee program starts, the worker

- fetches the candidate and the competition's frontier model by sha256 into a bounded
  :class:`~trainfleet.worker.replica_task.WeightsCache` of its own (``GET
  /v1/market/models/{sha256}``, answered only to a worker holding a referee job that names
  that model; streamed to a temporary file, verified, renamed), so a worker refereeing many
  submissions against one frontier downloads it once;
- writes ``task.json`` into the attempt's directory.

The program (``python -m trainfleet.verify.referee``) writes ``output/metrics.json`` with the
per-window losses of both models. The worker uploads nothing: it completes with ``result =
{"referee": metrics}`` (a non-finite loss, a diverged model's, is sent as ``null`` and its
place listed in ``non_finite``), and the coordinator computes the report from those numbers
itself (``coordinator.market``): a referee's own summary is never taken on trust either.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from trainfleet.verify.spec import RefereeTask
from trainfleet.worker.launch import RefereeFiles
from trainfleet.worker.replica_task import TASK_FILE, WeightsCache

MAX_MODEL_BYTES = 1 << 30
"""The largest model file a referee downloads (the coordinator's upload limit for models,
``coordinator.market.MAX_MODEL_BYTES``)."""
MODELS_CACHE = "models"  # beside the weights cache, under the data cache directory


class ModelSource(Protocol):
    def get_model(
        self,
        sha256: str,
        dest: Path,
        max_bytes: int | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> int: ...


class _Models:
    """``WeightsCache``'s source protocol over the market's model downloads, bounded."""

    def __init__(self, source: ModelSource):
        self.source = source

    def get_weights(
        self,
        sha256: str,
        dest: Path,
        max_bytes: int | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> int:
        return self.source.get_model(sha256, dest, max_bytes or MAX_MODEL_BYTES, give_up)


def referee_task(spec: dict[str, Any]) -> RefereeTask:
    """The ``RefereeTask`` a referee job's spec carries (``ValueError`` if malformed)."""
    task = spec.get("task")
    if task is None:
        raise ValueError("a referee job without a task")
    return RefereeTask.model_validate(task)


def models_cache(weights: WeightsCache) -> WeightsCache:
    """The worker's cache of market models: beside its weights cache, as bounded."""
    return WeightsCache(weights.directory.parent / MODELS_CACHE, weights.max_files)


def prepare(
    task: RefereeTask,
    attempt_dir: Path,
    cache: WeightsCache,
    source: ModelSource,
    give_up: Callable[[], bool] | None = None,
) -> RefereeFiles:
    """Fetch both models, write ``task.json``: the referee program's files."""
    models = _Models(source)
    candidate = cache.get(models, task.candidate, None, give_up)
    frontier = cache.get(models, task.frontier, None, give_up)
    task_file = attempt_dir / TASK_FILE
    task_file.write_text(task.model_dump_json(indent=2) + "\n")
    return RefereeFiles(task=task_file, candidate=candidate, frontier=frontier)


def referee_result(metrics: dict[str, Any], non_finite: list[str]) -> dict[str, Any]:
    """What a finished referee completes with: its metrics under ``referee``."""
    result: dict[str, Any] = {"referee": metrics}
    if non_finite:
        result["non_finite"] = non_finite
    return result


__all__ = [
    "MAX_MODEL_BYTES",
    "ModelSource",
    "models_cache",
    "prepare",
    "referee_result",
    "referee_task",
]

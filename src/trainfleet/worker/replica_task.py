"""The worker's side of a replica job: the files it prepares, and the contribution it reports.

A collaborative run (DiLoCo: Douillard et al. 2023, arXiv 2311.08105) hands each replica of
each round a :class:`~trainfleet.manifest.runs.ReplicaTask` in a queue job of kind
``replica``. Before the replica program starts, the worker

- fetches the round's global weights into a bounded :class:`WeightsCache` (keyed by their
  sha256, so every replica of a round on this worker, and a retried attempt, downloads them
  once; ``GET /v1/weights/{sha256}`` streamed to a temporary file, verified, renamed; the
  least recently used of more than ``max_files`` are evicted);
- writes ``task.json`` into the attempt's directory;
- gives the replica a state directory ``<workdir>/runs/<run_id>/replica<k>`` that outlives
  the attempt: the replica program reuses its optimizer state (and its error-feedback
  residual) there only when that state matches the task, so a stale one is harmless.

When the program exits 0 the worker uploads ``output/pseudograd.safetensors`` itself (not a
tar of the output directory: the coordinator decodes that one file) and completes with the
``metrics.json`` contents and a ``contribution`` record (:func:`contribution`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from safetensors import safe_open

from trainfleet.manifest.runs import ReplicaTask
from trainfleet.worker.launch import ReplicaFiles

log = logging.getLogger(__name__)

DEFAULT_MAX_WEIGHTS_FILES = 4
PSEUDOGRAD_FILE = "pseudograd.safetensors"
TASK_FILE = "task.json"


class WeightsSource(Protocol):
    def get_weights(
        self,
        sha256: str,
        dest: Path,
        max_bytes: int | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> int: ...


class WeightsCache:
    """Global weights by sha256 under ``directory``; at most ``max_files`` kept.

    A file in the cache is always whole and verified (it is renamed into place only after
    its hash checked out), so a hit needs neither a download nor a re-hash: its size is
    compared with the task's, cheaply, and a file of the wrong size is fetched again.
    """

    def __init__(self, directory: Path, max_files: int = DEFAULT_MAX_WEIGHTS_FILES):
        if max_files < 1:
            raise ValueError(f"max_files must be at least 1, not {max_files}")
        self.directory = directory
        self.max_files = max_files
        self.hits = 0
        self.downloads = 0

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.safetensors"

    def get(
        self,
        source: WeightsSource,
        sha256: str,
        size: int | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> Path:
        """The weights file for ``sha256``, downloaded from ``source`` unless cached.

        Raises what ``source.get_weights`` raises (``DownloadMismatch`` for bytes that do
        not hash to ``sha256``, ``TransferAborted`` once ``give_up()`` says so, ``ApiError``,
        ``CoordinatorUnavailable``, ``OSError``); nothing is left in the cache then.
        """
        dest = self.path(sha256)
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            self._touch(dest)
            self.hits += 1
            return dest
        self.directory.mkdir(parents=True, exist_ok=True)
        got = source.get_weights(sha256, dest, max_bytes=size, give_up=give_up)
        self.downloads += 1
        log.info("weights %s: %d bytes downloaded", sha256[:12], got)
        self._touch(dest)
        self.evict(keep=dest)
        return dest

    def _touch(self, path: Path) -> None:
        """Mark ``path`` most recently used: an mtime past every other cached file's (file
        clocks tick coarsely, so two uses in one tick still get distinct times)."""
        newest = max((t for t, p in self._entries() if p != path), default=0)
        now_ns = max(time.time_ns(), newest + 1)
        os.utime(path, ns=(now_ns, now_ns))

    def files(self) -> list[Path]:
        """Cached weights files, least recently used first."""
        return [p for _, p in self._entries()]

    def _entries(self) -> list[tuple[int, Path]]:
        found = []
        with contextlib.suppress(OSError):
            for p in self.directory.glob("*.safetensors"):
                with contextlib.suppress(OSError):
                    found.append((p.stat().st_mtime_ns, p))
        return sorted(found)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used files beyond ``max_files`` (never ``keep``)."""
        files = [p for p in self.files() if p != keep]
        excess = len(files) + (keep is not None) - self.max_files
        removed = files[: max(0, excess)]
        for p in removed:
            with contextlib.suppress(OSError):
                p.unlink()
        return removed


def replica_task(spec: dict[str, Any]) -> ReplicaTask:
    """The ``ReplicaTask`` a replica job's spec carries (``ValueError`` if malformed)."""
    task = spec.get("task")
    if task is None:
        raise ValueError("a replica job without a task")
    return ReplicaTask.model_validate(task)


def state_dir(workdir: Path, task: ReplicaTask) -> Path:
    """Where replica ``task.replica`` of run ``task.run_id`` keeps its state on this worker."""
    return workdir / "runs" / task.run_id / f"replica{task.replica}"


def prepare(
    task: ReplicaTask,
    attempt_dir: Path,
    workdir: Path,
    cache: WeightsCache,
    source: WeightsSource,
    give_up: Callable[[], bool] | None = None,
) -> ReplicaFiles:
    """Fetch the weights, write ``task.json``, make the state directory: the program's files."""
    weights = cache.get(source, task.weights, task.weights_size, give_up)
    task_file = attempt_dir / TASK_FILE
    task_file.write_text(task.model_dump_json(indent=2) + "\n")
    state = state_dir(workdir, task)
    state.mkdir(parents=True, exist_ok=True)
    return ReplicaFiles(task=task_file, weights=weights, state_dir=state)


def file_codec(path: Path) -> str | None:
    """The codec a pseudo-gradient file says it holds (its header metadata), if any."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file: the coordinator says so when it decodes
        return None
    codec = meta.get("codec")
    return codec if isinstance(codec, str) else None


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def contribution(
    task: ReplicaTask, metrics: dict[str, Any], pseudograd: Path, payload_bytes: int
) -> dict[str, Any]:
    """The ``contribution`` record of a finished replica: what it sent and what it did.

    ``codec``, ``inner_steps_done`` and ``compute_s`` come from the program's metrics
    (the codec falls back to the file's header); ``round`` and ``replica`` from the task.
    """
    codec = metrics.get("codec")
    if not isinstance(codec, str):
        codec = file_codec(pseudograd) or task.compression.kind
    steps = _number(metrics.get("inner_steps_done", metrics.get("inner_steps")))
    compute_s = _number(metrics.get("compute_s", metrics.get("train_s")))
    return {
        "codec": codec,
        "payload_bytes": payload_bytes,
        "inner_steps_done": int(steps) if steps is not None else task.inner_steps,
        "compute_s": float(compute_s) if compute_s is not None else None,
        "round": task.round,
        "replica": task.replica,
    }


__all__ = [
    "PSEUDOGRAD_FILE",
    "TASK_FILE",
    "WeightsCache",
    "contribution",
    "file_codec",
    "prepare",
    "replica_task",
    "state_dir",
]

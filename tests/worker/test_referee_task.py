"""The worker's referee branch: both models fetched into a bounded cache, the real referee
program run on them, its loss arrays reported (nothing uploaded), refusals handled."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
from fakecoord import FakeClient, make_attempt
from safetensors.torch import save as save_bytes

from tinymarket import DATASET, HYPER, baseline, trained
from trainfleet.client import DownloadMismatch
from trainfleet.errors import Forbidden
from trainfleet.worker.attempt import Attempt
from trainfleet.worker.launch import RefereeFiles, ReplicaFiles, build_argv
from trainfleet.worker.referee_task import MAX_MODEL_BYTES, models_cache, referee_task
from trainfleet.worker.replica_task import WeightsCache

WINDOWS = 16


def model(weights: Any) -> bytes:
    return save_bytes({k: weights[k].contiguous() for k in sorted(weights)})


CANDIDATE, FRONTIER = model(trained(5)), model(baseline())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def referee_spec(**changes: Any) -> dict[str, Any]:
    task = {
        "submission_id": "s" * 32,
        "competition_id": "c" * 64,
        "index": 1,
        "candidate": sha(CANDIDATE),
        "frontier": sha(FRONTIER),
        "hyper": HYPER,
        "dataset": DATASET,
        "windows": WINDOWS,
        "seed": 7,
        "producer": "alice",
        **changes,
    }
    return {"kind": "referee", "hyper": {}, "mode": "full", "timeout_s": 120.0, "task": task}


class ModelClient(FakeClient):
    """Serves the market's models by sha256 (or refuses, as told)."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.models = {sha(CANDIDATE): CANDIDATE, sha(FRONTIER): FRONTIER}
        self.error = error

    def get_model(
        self, sha256: str, dest: Path, max_bytes: int | None = None, give_up: Any = None
    ) -> int:
        self.record("get_model", (sha256, max_bytes))
        if self.error is not None:
            raise self.error
        dest.write_bytes(self.models[sha256])
        return len(self.models[sha256])


def referee_attempt(client: Any, workdir: Path, attempt: int = 1, **task: Any) -> Attempt:
    return make_attempt(
        client,
        workdir,
        "tiny-lm.s.referee1",
        referee_spec(**task),
        attempt=attempt,
        weights=WeightsCache(workdir / "cache" / "weights"),
    )


def test_a_referee_reports_both_models_losses_and_uploads_nothing(tmp_path: Path) -> None:
    client = ModelClient()
    outcome = referee_attempt(client, tmp_path).run()
    assert outcome.status == "completed", outcome.detail
    assert "upload" not in client.kinds()
    body = outcome.result["referee"]
    assert body["windows"] == WINDOWS and body["seed"] == 7
    candidate, frontier = body["candidate_losses"], body["frontier_losses"]
    assert len(candidate) == len(frontier) == WINDOWS
    assert sum(candidate) < sum(frontier)  # the trained model is better on the same windows
    fetched = [v for k, v in client.calls if k == "get_model"]
    assert fetched == [(sha(CANDIDATE), MAX_MODEL_BYTES), (sha(FRONTIER), MAX_MODEL_BYTES)]
    cached = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert cached == sorted(f"{sha(m)}.safetensors" for m in (CANDIDATE, FRONTIER))
    # Another referee of another submission against the same frontier downloads nothing new.
    again = referee_attempt(client, tmp_path, attempt=2, index=2, seed=8).run()
    assert again.status == "completed"
    assert len([k for k in client.kinds() if k == "get_model"]) == 2
    assert again.result["referee"]["candidate_losses"] != candidate  # another subset


def test_a_model_that_does_not_hash_right_or_is_refused_fails_the_attempt(
    tmp_path: Path,
) -> None:
    for error, said in (
        (DownloadMismatch("the bytes received hash to 00, not ab; refused"), "hash to 00"),
        (Forbidden("this worker holds no referee job that names this model"), "coordinator"),
    ):
        client = ModelClient(error)
        outcome = referee_attempt(client, tmp_path / said[:4]).run()
        assert outcome.status == "failed" and said in outcome.detail, outcome.detail
        assert client.kinds()[-1] == "fail"


def test_a_malformed_task_fails_without_a_retry(tmp_path: Path) -> None:
    client = ModelClient()
    outcome = referee_attempt(client, tmp_path, windows=0).run()
    assert outcome.status == "failed" and "malformed referee task" in outcome.detail
    fails = [v for k, v in client.calls if k == "fail"]
    assert fails and fails[0]["retryable"] is False
    assert "get_model" not in client.kinds()


def test_a_referee_refusing_the_model_is_not_retried(tmp_path: Path) -> None:
    client = ModelClient()
    wrong = model({k: v[..., :1].contiguous() for k, v in baseline().items()})
    client.models[sha(wrong)] = wrong
    outcome = referee_attempt(client, tmp_path, candidate=sha(wrong)).run()
    assert outcome.status == "failed" and "exit code 3" in outcome.detail, outcome.detail
    fails = [v for k, v in client.calls if k == "fail"]
    assert fails[0]["retryable"] is False


def test_referee_argv_runs_the_referee_program_on_its_files(tmp_path: Path) -> None:
    files = RefereeFiles(tmp_path / "task.json", tmp_path / "c", tmp_path / "f")
    argv = build_argv(referee_spec(), tmp_path / "out", files)
    assert argv[:4] == [sys.executable, "-u", "-m", "trainfleet.verify.referee"]
    assert argv[4:] == [
        "--task", str(tmp_path / "task.json"), "--candidate", str(tmp_path / "c"),
        "--frontier", str(tmp_path / "f"), "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="prepared files"):
        build_argv(referee_spec(), tmp_path, ReplicaFiles(tmp_path, tmp_path, tmp_path))
    assert referee_task(referee_spec()).index == 1
    cache = models_cache(WeightsCache(tmp_path / "cache" / "weights", max_files=3))
    assert (cache.directory, cache.max_files) == (tmp_path / "cache" / "models", 3)


def test_the_workers_model_bound_is_the_coordinators() -> None:
    from trainfleet.coordinator.market import MAX_MODEL_BYTES as COORDINATOR_LIMIT

    assert MAX_MODEL_BYTES == COORDINATOR_LIMIT

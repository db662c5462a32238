"""How a worker turns a claim into a process: argv, environment, and reconnect backoff."""

from __future__ import annotations

import itertools
import sys
import threading
from pathlib import Path
from typing import Any

from trainfleet import env
from trainfleet.errors import CoordinatorUnavailable
from trainfleet.worker.attempt import build_argv, build_env
from trainfleet.worker.daemon import Worker, WorkerConfig


def test_command_job_gets_hyper_as_flags_in_manifest_order(tmp_path: Path) -> None:
    spec = {
        "kind": "command",
        "command": ["python", "train.py"],
        "hyper": {"steps": 200, "lr": 0.5, "amp": True, "name": "x y"},
        "mode": "full",
    }
    argv = build_argv(spec, tmp_path)
    assert argv == [
        "python",
        "train.py",
        "--steps",
        "200",
        "--lr",
        "0.5",
        "--amp",
        "true",
        "--name",
        "x y",
    ]


def test_train_job_runs_the_builtin_trainer_in_a_subprocess(tmp_path: Path) -> None:
    spec = {"kind": "train", "hyper": {"steps": 5}, "mode": "smoke", "command": None}
    argv = build_argv(spec, tmp_path)
    assert argv[:4] == [sys.executable, "-u", "-m", "trainfleet.train"]
    assert argv[argv.index("--params") + 1] == '{"steps": 5}'
    assert argv[argv.index("--mode") + 1] == "smoke"
    assert argv[argv.index("--output") + 1] == str(tmp_path)


def test_job_environment_names_the_attempt_and_its_output_dir(tmp_path: Path) -> None:
    claim = {
        "attempt": 3,
        "epoch": 7,
        "job": {"id": "ab" * 32, "name": "j", "spec": {"mode": "smoke"}},
    }
    job_env = build_env(claim, tmp_path, num_threads=2)
    assert job_env[env.JOB_ID] == "ab" * 32
    assert job_env[env.ATTEMPT] == "3"
    assert job_env[env.MODE] == "smoke"
    assert job_env[env.OUTPUT_DIR] == str(tmp_path)
    assert job_env[env.NUM_THREADS] == job_env["OMP_NUM_THREADS"] == "2"
    assert job_env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


class FlakyClient:
    """Refuses a few times, as a coordinator that is still starting would."""

    def __init__(self, failures: int, stop: threading.Event):
        self.failures = failures
        self.calls = 0
        self.stop = stop

    def register(self, capability: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.failures:
            raise CoordinatorUnavailable("connection refused")
        return {
            "worker_id": "w-1",
            "token": "secret",
            "effective": {**capability},
            "notes": [],
            "heartbeat_interval_s": 1.0,
        }

    def close(self) -> None:
        pass


def test_registration_retries_with_backoff_until_the_coordinator_answers(monkeypatch) -> None:
    waits: list[float] = []
    worker = Worker(WorkerConfig(url="http://unused", join_token="t"))
    flaky = FlakyClient(failures=4, stop=worker.stop)
    worker._client_factory = lambda token: flaky  # type: ignore[assignment]
    monkeypatch.setattr(worker.stop, "wait", lambda s: waits.append(s) or False)
    assert worker.register() is True
    assert flaky.calls == 5 and worker.worker_id == "w-1"
    assert len(waits) == 4
    assert all(b > a for a, b in itertools.pairwise(waits))  # exponential backoff


def test_registration_gives_up_only_when_stopped(monkeypatch) -> None:
    worker = Worker(WorkerConfig(url="http://unused", join_token="t"))
    flaky = FlakyClient(failures=10**9, stop=worker.stop)
    worker._client_factory = lambda token: flaky  # type: ignore[assignment]

    def wait(seconds: float) -> bool:
        if flaky.calls >= 3:
            worker.stop.set()
        return worker.stop.is_set()

    monkeypatch.setattr(worker.stop, "wait", wait)
    assert worker.register() is False
    assert flaky.calls == 3


def test_a_job_never_sees_the_workers_credentials(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(env.JOIN_TOKEN, "join-secret")
    monkeypatch.setenv(env.TOKEN, "operator-secret")
    claim = {"attempt": 1, "epoch": 1, "job": {"id": "ab" * 32, "name": "j", "spec": {"mode": "x"}}}
    job_env = build_env(claim, tmp_path, num_threads=1)
    assert env.JOIN_TOKEN not in job_env and env.TOKEN not in job_env
    assert "secret" not in " ".join(job_env.values())

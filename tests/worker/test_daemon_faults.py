"""Nothing the coordinator answers kills the worker daemon; a stop interrupts every wait."""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path
from typing import Any

from fakecoord import JOB_ID, FakeClient

from trainfleet.errors import BadRequest, Conflict, CoordinatorUnavailable
from trainfleet.worker import attempt as attempt_module
from trainfleet.worker import disk as disk_module
from trainfleet.worker.daemon import OUTCOME_FILE, Worker, WorkerConfig
from trainfleet.worker.disk import MAX_DISK_HANDBACKS

CAP = {"host": "h", "cores": 1, "ram_gib": 1.0, "cuda": False, "num_gpus": 0, "vram_gib": 0}


class DaemonClient(FakeClient):
    """Registers, then answers claims from a script of replies and exceptions."""

    def __init__(self, claims: list[Any]):
        super().__init__()
        self.claims = claims

    def register(self, capability: dict[str, Any]) -> dict[str, Any]:
        return {
            "worker_id": "w-1",
            "token": "t",
            "effective": CAP,
            "notes": [],
            "heartbeat_interval_s": 0.2,
            "heartbeat_timeout_s": 5.0,
        }

    def claim(self, wait_s: float = 0.0) -> Any:
        self.record("claim")
        item = self.claims.pop(0) if self.claims else None
        if isinstance(item, Exception):
            raise item
        return item

    def deregister(self) -> None:
        self.record("deregister")

    def close(self) -> None:
        pass


def worker_with(client: DaemonClient, tmp_path: Path, **cfg: Any) -> Worker:
    settings: dict[str, Any] = {"poll_interval_s": 0.01, "exit_when_idle_s": 0.05, **cfg}
    config = WorkerConfig(url="http://unused", join_token="j", workdir=tmp_path, **settings)
    return Worker(config, client_factory=lambda token: client)  # type: ignore[arg-type,return-value]


def test_a_claim_refused_for_a_held_job_fails_that_job_and_goes_on(tmp_path: Path) -> None:
    held = Conflict("worker w-1 still holds job cdcd", job_id=JOB_ID, epoch=7, state="running")
    client = DaemonClient([held, BadRequest("something else"), None])
    worker = worker_with(client, tmp_path)
    assert worker.run() == []  # returns normally: idle, not crashed
    fails = [v for k, v in client.calls if k == "fail"]
    assert len(fails) == 1 and fails[0]["retryable"] is True
    kinds = client.kinds()
    assert kinds[:4] == ["claim", "fail", "claim", "claim"] and kinds[-1] == "deregister"


def test_sigterm_during_a_claim_backoff_stops_the_daemon_at_once(tmp_path: Path) -> None:
    client = DaemonClient([CoordinatorUnavailable("down")] * 1000)
    worker = worker_with(client, tmp_path, exit_when_idle_s=None)
    worker.reporter.initial_backoff_s = worker.reporter.max_backoff_s = 3600.0
    done = threading.Event()
    t = threading.Thread(target=lambda: (worker.run(), done.set()))
    t.start()
    deadline = time.monotonic() + 10
    while not any(k == "claim" for k, _ in client.calls) and time.monotonic() < deadline:
        done.wait(0.01)
    worker.stop.set()  # what the SIGTERM handler does
    assert done.wait(5), "the daemon kept waiting out its backoff"
    assert client.kinds()[-1] == "deregister"


def test_a_crash_inside_an_attempt_is_reported_and_the_daemon_goes_on(
    tmp_path: Path, monkeypatch
) -> None:
    claim = {"attempt": 1, "epoch": 2, "job": {"id": JOB_ID, "name": "j", "spec": {}}}
    client = DaemonClient([claim, None])
    worker = worker_with(client, tmp_path)

    def boom(self: Any) -> Any:
        raise RuntimeError("x" * 21_000)

    monkeypatch.setattr("trainfleet.worker.attempt.Attempt.run", boom)
    [outcome] = worker.run()
    assert outcome.status == "failed"
    [body] = [v for k, v in client.calls if k == "fail"]
    assert len(body["error"]) <= 20_000 and body["error"].startswith("worker error")


def test_a_full_disk_holds_claims_until_there_is_space_again(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """While the workdir is short of space the daemon claims nothing (it says so once, and
    first removes the attempt directories it kept for debugging); then it claims again."""
    kept = tmp_path / "jobs" / "old-a1"
    kept.mkdir(parents=True)
    (kept / OUTCOME_FILE).write_text("failed\n")
    caplog.set_level(logging.INFO, logger="trainfleet.worker.disk")
    space = threading.Event()
    checks: list[Path] = []

    def free_bytes(path: Path) -> int:
        checks.append(path)
        return 1 << 30 if space.is_set() else 0

    monkeypatch.setattr(disk_module, "free_bytes", free_bytes)
    client = DaemonClient([None])
    worker = worker_with(client, tmp_path, exit_when_idle_s=None)
    done = threading.Event()
    t = threading.Thread(target=lambda: (worker.run(), done.set()))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while len(checks) < 10 and time.monotonic() < deadline:  # several poll intervals
            done.wait(0.01)
        assert worker.gate.short, "the daemon never noticed the full disk"
        assert not kept.exists()
        assert "claim" not in client.kinds()
        space.set()
        while "claim" not in client.kinds() and time.monotonic() < deadline:
            done.wait(0.01)
        assert "claim" in client.kinds()
    finally:
        worker.stop.set()
        assert done.wait(5)
    notes = [r for r in caplog.records if "not claiming jobs until there is space" in r.message]
    assert len(notes) == 1
    assert any("claiming again" in r.message for r in caplog.records)


def test_a_stop_ends_the_wait_for_disk_space(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(disk_module, "free_bytes", lambda path: 0)
    client = DaemonClient([])
    worker = worker_with(client, tmp_path, exit_when_idle_s=None, poll_interval_s=3600.0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (worker.run(), done.set()))
    t.start()
    deadline = time.monotonic() + 10
    while not worker.gate.short and time.monotonic() < deadline:
        done.wait(0.01)
    worker.stop.set()
    assert done.wait(5), "the daemon kept waiting for disk space"
    assert client.kinds() == ["deregister"]


def test_a_job_is_handed_back_for_a_full_disk_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch
) -> None:
    def full(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(attempt_module, "ensure_dir", full)
    claim = {"attempt": 1, "epoch": 2, "job": {"id": JOB_ID, "name": "j", "spec": {}}}
    tries = MAX_DISK_HANDBACKS + 1
    client = DaemonClient([dict(claim, epoch=2 + i) for i in range(tries)] + [None])
    worker = worker_with(client, tmp_path)
    outcomes = worker.run()
    assert [o.status for o in outcomes] == ["released"] * MAX_DISK_HANDBACKS + ["failed"]
    fails = [v for k, v in client.calls if k == "fail"]
    assert [f["release"] for f in fails] == [True] * MAX_DISK_HANDBACKS + [False]
    assert all(f["error"].startswith("disk full on worker: preparing") for f in fails)
    assert not list((tmp_path / "jobs").glob("*"))  # nothing kept: the space is needed

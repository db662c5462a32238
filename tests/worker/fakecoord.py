"""A fake coordinator client for worker unit tests: records calls, enforces the real request
schemas (a body the coordinator would refuse raises ``BadRequest`` here too)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainfleet.coordinator.schemas import CompleteBody, FailBody, LogBody
from trainfleet.errors import BadRequest
from trainfleet.worker.attempt import Attempt
from trainfleet.worker.report import Reporter

JOB_ID = "cd" * 32


def _check(model: Any, body: dict[str, Any]) -> None:
    try:
        json.dumps(body, allow_nan=False)  # what httpx would refuse to encode
        model.model_validate(body)
    except (ValidationError, ValueError) as err:
        raise BadRequest(f"invalid body: {str(err)[:200]}") from None


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.on_heartbeat: Callable[[], dict[str, Any]] = lambda: {
            "cancel": False,
            "state": "running",
        }

    def kinds(self) -> list[str]:
        return [k for k, _ in self.calls if k not in ("heartbeat", "log")]

    def record(self, kind: str, value: Any = None) -> None:
        with self.lock:
            self.calls.append((kind, value))

    def heartbeat(self, job_id: str, epoch: int) -> dict[str, Any]:
        self.record("heartbeat")
        return self.on_heartbeat()

    def append_log(self, job_id: str, epoch: int, lines: list[str]) -> dict[str, int]:
        _check(LogBody, {"epoch": epoch, "lines": lines})
        self.record("log", len(lines))
        self.lines += lines
        return {"count": len(lines)}

    def upload(self, job_id: str, epoch: int, path: Path, sha256: str, name: str) -> None:
        self.record("upload", path.stat().st_size)

    def complete(self, job_id: str, epoch: int, result: dict[str, Any]) -> None:
        _check(CompleteBody, {"epoch": epoch, "result": result})
        self.record("complete", result)

    def fail(
        self, job_id: str, epoch: int, error: str, *, retryable: bool = True, release: bool = False
    ) -> None:
        _check(FailBody, {"epoch": epoch, "error": error})
        self.record("fail", {"error": error, "retryable": retryable, "release": release})

    def get_router(self, fit_id: str) -> None:
        return None


def command_attempt(
    client: Any, code: str, workdir: Path, stop: threading.Event | None = None, **kw: Any
) -> Attempt:
    """An attempt of a command job running ``python -c CODE``."""
    spec = {
        "kind": "command",
        "command": [sys.executable, "-c", code],
        "hyper": {},
        "mode": "full",
        "timeout_s": kw.pop("timeout_s", 60.0),
    }
    return make_attempt(client, workdir, "j", spec, stop=stop, **kw)


def make_attempt(
    client: Any,
    workdir: Path,
    name: str,
    spec: dict[str, Any],
    *,
    attempt: int = 1,
    stop: threading.Event | None = None,
    **kw: Any,
) -> Attempt:
    """An attempt (epoch 3) of job ``name`` with ``spec``, with fast heartbeats and backoff."""
    claim = {"attempt": attempt, "epoch": 3, "job": {"id": JOB_ID, "name": name, "spec": spec}}
    stop = stop or threading.Event()
    return Attempt(
        client,
        claim,
        workdir,
        heartbeat_interval_s=0.2,
        num_threads=1,
        stop=stop,
        reporter=Reporter(stop, initial_backoff_s=0.05, max_backoff_s=0.2),
        term_grace_s=kw.pop("term_grace_s", 2.0),
        **kw,
    )

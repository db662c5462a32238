"""End-to-end helpers: a live fleet handle (coordinator URL + real worker processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from trainfleet.client import Client
from trainfleet.coordinator.state import Coordinator

REPO = Path(__file__).resolve().parents[2]
SLOW_JOB = str(Path(__file__).parent / "scripts" / "slow_job.py")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        pause.wait(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Fleet:
    url: str
    coord: Coordinator
    tmp: Path
    workers: list[subprocess.Popen[str]] = field(default_factory=list)
    log_files: list[IO[str]] = field(default_factory=list)

    _operator: Client | None = None

    @property
    def operator(self) -> Client:
        """An operator client over real HTTP (closed by the fixture)."""
        if self._operator is None:
            self._operator = Client(self.url, self.coord.operator_token)
        return self._operator

    def close(self) -> None:
        if self._operator is not None:
            self._operator.close()
        for log in self.log_files:
            log.close()

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``trainfleet ARGS`` against this coordinator, as an operator would."""
        env = {
            **os.environ,
            "TRAINFLEET_URL": self.url,
            "TRAINFLEET_TOKEN": self.coord.operator_token,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "trainfleet.cli.main", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"trainfleet {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def reload(self, text: str) -> dict[str, Any]:
        path = self.tmp / f"manifest-{time.monotonic_ns()}.toml"
        path.write_text(text)
        return self.operator.reload(text, str(path))

    def start_worker(
        self, host: str, *extra: str, token: str | None = None
    ) -> subprocess.Popen[str]:
        log = (self.tmp / f"worker-{host}-{len(self.workers)}.log").open("w")
        self.log_files.append(log)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainfleet.cli.main",
                "join",
                self.url,
                "--token",
                token or self.coord.join_token,
                "--host",
                host,
                "--workdir",
                str(self.tmp / f"work-{host}"),
                "--threads",
                "1",
                "--poll-interval-s",
                "0.2",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
        self.workers.append(proc)
        return proc

    def job(self, ref: str) -> dict[str, Any]:
        return self.operator.job(ref)

    def wait_state(self, ref: str, states: set[str], timeout_s: float = 90) -> dict[str, Any]:
        return wait_until(
            lambda: (j := self.job(ref)["job"])["state"] in states and j,
            timeout_s,
            f"job {ref} to reach {states}",
        )

    def worker_log(self, proc: subprocess.Popen[str]) -> str:
        index = self.workers.index(proc)
        return "".join(p.read_text() for p in self.tmp.glob(f"worker-*-{index}.log"))


def kill_tree(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    """Signal a worker and every process it started (jobs run in their own sessions)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [psutil.Process(proc.pid), *children] if proc.poll() is None else children:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)

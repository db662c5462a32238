"""A live fleet served by several ``trainfleet serve`` processes on one PostgreSQL database.

Several coordinators of one database serve one fleet: any of them answers any request, and
one of them, the leader, runs the reaper and the round ticker (``coordinator.leader``).
``MultiServedFleet`` starts ``num_coordinators`` real ``trainfleet serve --db PG_URL``
processes, each on its own port and state directory (its staging area), all on one artifact
directory and one operator token; workers are real ``trainfleet join URL1,URL2,...``
processes (round-robin over the coordinators, failing over when one refuses the connection:
``failover``). :meth:`kill_coordinator` SIGKILLs one (no shutdown code runs: its leader lock
goes with its connection), :meth:`start_coordinator` starts it again on the same port.

Give it a database URL of its own: a fresh schema (``testing.postgres.fresh_schema``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import socket
import subprocess
from pathlib import Path
from typing import IO, Any

from trainfleet import env
from trainfleet.client import Client
from trainfleet.errors import CoordinatorUnavailable
from trainfleet.testing.fleet import LiveFleet, trainfleet_argv
from trainfleet.testing.worker import WorkerHandle
from trainfleet.worker.shepherd import set_parent_death_signal

__all__ = ["CoordinatorProcess", "MultiServedFleet"]


class CoordinatorProcess:
    """One ``trainfleet serve`` process of the fleet: its port, state directory and logs."""

    def __init__(self, index: int, port: int, state_dir: Path, argv: list[str]) -> None:
        self.index = index
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.state_dir = state_dir
        self.argv = argv  # without the per-process options
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log: IO[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_path(self, start: int) -> Path:
        return self.state_dir.parent / f"serve-{self.index}-{start}.log"

    def start(self, token: str, cwd: Path) -> None:
        if self.alive:
            raise RuntimeError(f"coordinator {self.index} is already running")
        self._close_log()
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path(self.starts).open("wb")
        self.starts += 1
        self.proc = subprocess.Popen(
            [*self.argv, "--port", str(self.port), "--state-dir", str(self.state_dir)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, env.TOKEN: token},  # never on the command line
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=functools.partial(set_parent_death_signal, signal.SIGKILL),
        )

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def log_text(self) -> str:
        """Every log this coordinator wrote so far, oldest start first."""
        if self._log is not None:
            self._log.flush()
        return "".join(
            self.log_path(i).read_text(errors="replace")
            for i in range(self.starts)
            if self.log_path(i).exists()
        )

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


class MultiServedFleet(LiveFleet):
    """``with MultiServedFleet(tmp_path, pg_url) as fleet:`` ``num_coordinators`` serve
    processes on one database; workers given every coordinator's URL; ``fleet.url`` is
    ``URL1,URL2,...`` (the operator client round-robins too). ``fleet.coord`` does not exist:
    read the fleet over HTTP."""

    def __init__(
        self,
        tmp: Path,
        db_url: str,
        *,
        num_coordinators: int = 2,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 3.0,
        reap_interval_s: float = 0.25,
    ) -> None:
        super().__init__(
            tmp,
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
            reap_interval_s=reap_interval_s,
            queue_url=db_url,
        )
        self.db_url = db_url
        self.num_coordinators = num_coordinators
        self._token = secrets.token_urlsafe(24)
        self.coordinators: list[CoordinatorProcess] = []

    def __enter__(self) -> MultiServedFleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def operator_token(self) -> str:
        return self._token

    def start(self) -> None:
        argv = trainfleet_argv(
            "serve",
            "--db",
            self.db_url,
            "--artifacts",
            str(self.tmp / "artifacts"),
            "--heartbeat-interval-s",
            str(self.config.heartbeat_interval_s),
            "--heartbeat-timeout-s",
            str(self.config.heartbeat_timeout_s),
        )
        for index in range(self.num_coordinators):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            state = self.tmp / f"coord-{index}" / "state"
            self.coordinators.append(CoordinatorProcess(index, port, state, argv))
        self.url = ",".join(c.url for c in self.coordinators)
        # All at once, as a deployment would: they migrate the new database concurrently
        # (one applies it under the migration lock), and one of them takes the lead.
        for coordinator in self.coordinators:
            coordinator.start(self._token, self.tmp)
        for index in range(self.num_coordinators):
            self._wait_healthy(index)

    def start_coordinator(self, index: int, timeout_s: float = 60) -> None:
        """Start coordinator ``index`` (again) on its port; wait until it answers."""
        self.coordinators[index].start(self._token, self.tmp)
        self._wait_healthy(index, timeout_s)

    def _wait_healthy(self, index: int, timeout_s: float = 60) -> None:
        coordinator = self.coordinators[index]
        with Client(coordinator.url, self._token) as client:
            try:
                client.wait_healthy(timeout_s)
            except CoordinatorUnavailable:
                raise AssertionError(
                    f"coordinator {index} did not start:\n{coordinator.log_text()[-3000:]}"
                ) from None

    def kill_coordinator(self, index: int) -> None:
        """SIGKILL coordinator ``index`` and reap it."""
        self.coordinators[index].kill()

    def health(self, index: int) -> dict[str, Any] | None:
        """Coordinator ``index``'s ``/health`` (with ``leader``), or None if it is down."""
        with Client(self.coordinators[index].url, timeout_s=5) as client:
            try:
                result: dict[str, Any] = client.request("GET", "/health")
            except CoordinatorUnavailable:
                return None
            return result

    def leaders(self) -> list[int]:
        """The coordinators that say they lead now, by index."""
        return [
            i
            for i, c in enumerate(self.coordinators)
            if c.alive and (self.health(i) or {}).get("leader")
        ]

    def server_log_text(self) -> str:
        return "".join(f"--- coordinator {c.index}\n{c.log_text()}" for c in self.coordinators)

    def start_worker(self, host: str, *extra: str, **options: Any) -> WorkerHandle:
        """A ``trainfleet join URL1,URL2,...`` worker (no fault proxy: a proxy has one
        upstream)."""
        if options.pop("proxy", False):
            raise ValueError("a worker of several coordinators has no fault proxy")
        return super().start_worker(host, *extra, proxy=False, **options)

    def close(self) -> None:
        super().close()
        for coordinator in self.coordinators:
            coordinator.kill()
            coordinator._close_log()

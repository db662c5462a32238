"""A live fleet whose coordinator is a real ``trainfleet serve`` process, so a test can kill it.

:class:`~trainfleet.testing.LiveFleet` runs the coordinator in a thread of the test process,
which cannot be SIGKILLed. ``ServedFleet`` starts ``python -m trainfleet.cli.main serve`` on
a fixed port instead; :meth:`ServedFleet.kill_coordinator` SIGKILLs it (no shutdown code
runs: only what was committed to the state directory survives) and
:meth:`ServedFleet.start_coordinator` starts it again on the same state directory and port,
so the workers (and their fault proxies) reach the new process at the address they know.
Workers, proxies and teardown are ``LiveFleet``'s. ``fleet.coord`` does not exist here: read
the coordinator over HTTP (``fleet.operator``).
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
from trainfleet.testing.fleet import LiveFleet, trainfleet_argv
from trainfleet.worker.shepherd import set_parent_death_signal

__all__ = ["ServedFleet"]


class ServedFleet(LiveFleet):
    """``with ServedFleet(tmp_path) as fleet:`` a ``trainfleet serve`` process, workers on
    demand; ``kill_coordinator()`` / ``start_coordinator()`` between them."""

    def __init__(
        self,
        tmp: Path,
        *,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 3.0,
        serve_args: tuple[str, ...] = (),  # more `trainfleet serve` flags
        **serve_options: Any,
    ) -> None:
        self.serve_args = serve_args
        super().__init__(
            tmp,
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
            **serve_options,
        )
        self._token = secrets.token_urlsafe(24)
        self.port = 0
        self.server: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._server_log: IO[bytes] | None = None

    def __enter__(self) -> ServedFleet:
        self.start()
        return self

    @property
    def operator_token(self) -> str:
        return self._token

    def start(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_coordinator()

    def start_coordinator(self, timeout_s: float = 60) -> None:
        """Start ``trainfleet serve`` on the fleet's state directory and port; wait until
        it answers."""
        if self.server is not None and self.server.poll() is None:
            raise RuntimeError("the coordinator is already running")
        self._close_log()
        self._server_log = (self.tmp / f"serve-{self.starts}.log").open("wb")
        self.starts += 1
        argv = trainfleet_argv(
            "serve",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.config.state_dir),
            "--heartbeat-interval-s",
            str(self.config.heartbeat_interval_s),
            "--heartbeat-timeout-s",
            str(self.config.heartbeat_timeout_s),
            *self.serve_args,
        )
        self.server = subprocess.Popen(
            argv,
            stdout=self._server_log,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
            env={**os.environ, env.TOKEN: self._token},  # never on the command line
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=functools.partial(set_parent_death_signal, signal.SIGKILL),
        )
        self.operator.wait_healthy(timeout_s)

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator process and reap it."""
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait(timeout=30)

    def server_log_text(self) -> str:
        """Every coordinator process's log so far, oldest first."""
        if self._server_log is not None:
            self._server_log.flush()
        return "".join(
            (self.tmp / f"serve-{i}.log").read_text(errors="replace") for i in range(self.starts)
        )

    def close(self) -> None:
        super().close()
        self.kill_coordinator()
        self._close_log()

    def _close_log(self) -> None:
        if self._server_log is not None:
            with contextlib.suppress(OSError):
                self._server_log.close()
            self._server_log = None

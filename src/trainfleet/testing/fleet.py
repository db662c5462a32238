"""A live fleet for end-to-end tests and benchmarks: a real coordinator and real workers.

The coordinator is the real Starlette app under uvicorn, on port 0, in a thread of the
calling process (so a test can also reach ``fleet.coord`` in-process). Each worker is a real
``python -m trainfleet.cli.main join`` process that reaches the coordinator through its own
:class:`~trainfleet.testing.proxy.FaultProxy`, gets its token through the environment (never
on the command line), and is killed, with every job it started, when the fleet closes,
whatever the test did.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import uvicorn

from trainfleet import env
from trainfleet.client import Client
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.server import ServeConfig, build_coordinator
from trainfleet.coordinator.state import Coordinator
from trainfleet.testing.disk import SmallDisk
from trainfleet.testing.proxy import FaultProxy
from trainfleet.testing.wait import wait_until
from trainfleet.testing.worker import WorkerHandle, tagged_processes
from trainfleet.worker.shepherd import set_parent_death_signal

__all__ = ["LiveFleet", "trainfleet_argv"]


def trainfleet_argv(*args: str) -> list[str]:
    """The command line of ``trainfleet ARGS`` run by this interpreter (no script on PATH
    needed), as the harness starts its workers and operator commands."""
    return [sys.executable, "-m", "trainfleet.cli.main", *args]


class LiveFleet:
    """``with LiveFleet(tmp_path) as fleet:`` a coordinator now, workers on demand."""

    def __init__(
        self,
        tmp: Path,
        *,
        heartbeat_interval_s: float = 0.5,
        heartbeat_timeout_s: float = 3.0,
        reap_interval_s: float = 0.25,
        **serve_options: Any,
    ) -> None:
        self.tmp = Path(tmp)
        self.tag = f"fleet-{uuid.uuid4().hex[:12]}"
        self.config = ServeConfig(
            state_dir=self.tmp / "state",
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
            reap_interval_s=reap_interval_s,
            **serve_options,
        )
        self.workers: list[WorkerHandle] = []
        self._tokens: dict[str, str] = {}
        self._operator: Client | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.coord: Coordinator
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> LiveFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.coord = build_coordinator(self.config)
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
        # without it every keep-alive reply waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(self.coord), log_level="warning", access_log=False, lifespan="on"
            )
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="coordinator", daemon=True
        )
        self._thread.start()
        wait_until(lambda: server.started, 20, "uvicorn to start")
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def close(self) -> None:
        """Kill every worker and job (even strays), stop the coordinator. Idempotent."""
        for worker in self.workers:
            worker.destroy()
        for stray in tagged_processes(self.tag):  # belt and braces: anything left over
            with contextlib.suppress(psutil.Error):
                stray.kill()
        if self._operator is not None:
            self._operator.close()
            self._operator = None
        if self._server is not None:
            self._end_long_polls()
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=30)
            self._server = None
            self.coord.queue.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _end_long_polls(self, timeout_s: float = 5.0) -> None:
        """Wake the claims still waiting in the coordinator until none is left.

        A waiting claim notices that its worker hung up only when it wakes (on work, or
        every ``longpoll.RECHECK_S``), and uvicorn's graceful shutdown waits for every request
        in flight: without this each teardown waited out a recheck (~5 s). A claim whose
        client is still connected claims again and waits on; it is given ``timeout_s``."""
        work = self.coord.work
        deadline = time.monotonic() + timeout_s
        pause = threading.Event()
        while work.polls and time.monotonic() < deadline:
            work.notify()
            pause.wait(0.02)

    # -- operator side ------------------------------------------------------------------
    @property
    def operator_token(self) -> str:
        return self.coord.operator_token

    @property
    def operator(self) -> Client:
        """An operator client over real HTTP (closed with the fleet)."""
        if self._operator is None:
            self._operator = Client(self.url, self.operator_token)
        return self._operator

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``trainfleet ARGS`` against this coordinator, as an operator would."""
        proc = subprocess.run(
            trainfleet_argv(*args),
            capture_output=True,
            text=True,
            env={**os.environ, env.URL: self.url, env.TOKEN: self.operator_token},
            cwd=self.tmp,
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

    def job(self, ref: str) -> dict[str, Any]:
        return self.operator.job(ref)

    def wait_state(self, ref: str, states: set[str], timeout_s: float = 90) -> dict[str, Any]:
        """Wait until job ``ref`` is in one of ``states``; return its job record."""
        result: dict[str, Any] = wait_until(
            lambda: (j := self.job(ref)["job"])["state"] in states and j,
            timeout_s,
            f"job {ref} to reach {states}",
        )
        return result

    # -- workers ------------------------------------------------------------------------
    def worker_token(self, host: str) -> str:
        """The token a worker for ``host`` joins with: enrolled once per host name."""
        if host not in self._tokens:
            self._tokens[host] = self.operator.enroll_host(host)["token"]
        return self._tokens[host]

    def start_worker(
        self,
        host: str,
        *extra: str,
        token: str | None = None,
        proxy: bool = True,
        disk_mib: int | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> WorkerHandle:
        """Start ``trainfleet join`` for ``host`` (extra CLI args after it).

        ``token``: join with this token instead of an enrolled/shared one. ``proxy``: talk
        through a FaultProxy (default) or straight to the coordinator. ``disk_mib``: give
        the worker a workdir on a tmpfs of this size, for ``fill_disk`` (raises
        ``DiskFaultUnavailable`` where mounting is not allowed)."""
        index = len(self.workers)
        workdir = self.tmp / f"work-{host}-{index}"
        disk = SmallDisk(workdir, disk_mib) if disk_mib is not None else None
        fault_proxy = FaultProxy(self.url) if proxy else None
        log_path = self.tmp / f"worker-{host}-{index}.log"
        log_file = log_path.open("w")
        worker_env = {
            **os.environ,
            env.JOIN_TOKEN: token if token is not None else self.worker_token(host),
            env.HARNESS_TAG: f"{self.tag}/{index}",
            "PYTHONUNBUFFERED": "1",
            **(env_extra or {}),
        }
        worker_env.pop(env.TOKEN, None)
        try:
            proc = subprocess.Popen(
                trainfleet_argv(
                    "join",
                    fault_proxy.url if fault_proxy is not None else self.url,
                    "--host",
                    host,
                    "--workdir",
                    str(workdir),
                    "--threads",
                    "1",
                    "--poll-interval-s",
                    "0.2",
                    *extra,
                ),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.tmp,
                env=worker_env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # SIGKILL it if the thread that started it dies: a worker never outlives
                # a harness that was itself killed (Linux; elsewhere a no-op).
                preexec_fn=functools.partial(set_parent_death_signal, signal.SIGKILL),
            )
        except BaseException:
            log_file.close()
            if fault_proxy is not None:
                fault_proxy.close()
            if disk is not None:
                disk.unmount()
            raise
        handle = WorkerHandle(
            host,
            proc,
            tag=f"{self.tag}/{index}",
            log_path=log_path,
            log_file=log_file,
            workdir=workdir,
            proxy=fault_proxy,
            disk=disk,
        )
        self.workers.append(handle)
        return handle

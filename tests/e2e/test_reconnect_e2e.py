"""A worker started before its coordinator waits, with backoff, then joins and works; the
coordinator restarting mid-run loses nothing it had accepted."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import IO

import pytest

from livefleet import REPO, free_port, serve_argv, slow_job, trainfleet_argv, wait_until
from trainfleet import env
from trainfleet.client import Client
from trainfleet.queue.sqlite import SQLiteQueue

pytestmark = pytest.mark.slow


def serve(state: Path, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        serve_argv(port, state),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env={**os.environ, env.TOKEN: "op"},  # tokens never on a command line
    )


def test_worker_waits_for_the_coordinator_and_survives_its_restart(tmp_path: Path) -> None:
    with (
        (tmp_path / "serve.log").open("wb") as serve_log,
        (tmp_path / "worker.log").open("wb") as worker_out,
    ):
        run_scenario(tmp_path, serve_log, worker_out)


def run_scenario(tmp_path: Path, serve_log: IO[bytes], worker_out: IO[bytes]) -> None:
    port, state = free_port(), tmp_path / "state"
    url = f"http://127.0.0.1:{port}"
    worker_log = tmp_path / "worker.log"
    # The host is enrolled before the coordinator first starts (the enrollment is part of
    # its state), so the worker has its token while there is nobody to ask yet.
    queue = SQLiteQueue(state / "queue.db")
    join_token = queue.enroll_host("early")
    queue.close()
    worker = subprocess.Popen(
        trainfleet_argv(
            "join",
            url,
            "--host",
            "early",
            "--workdir",
            str(tmp_path / "work"),
            "--poll-interval-s",
            "0.2",
        ),
        stdout=worker_out,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env={**os.environ, env.JOIN_TOKEN: join_token},
    )
    server = None
    operator = Client(url, "op")
    try:
        wait_until(
            lambda: "coordinator unreachable" in worker_log.read_text(),
            30,
            "the worker to report the coordinator unreachable",
        )
        server = serve(state, port, serve_log)
        operator.wait_healthy(30)
        manifest = slow_job("first", 0.2)
        operator.reload(manifest, "m.toml")
        wait_until(lambda: operator.job("first")["job"]["state"] == "completed", 60, "first job")

        # Restart the coordinator: what it accepted is on disk; the worker reconnects.
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        server = serve(state, port, serve_log)
        operator.wait_healthy(30)
        first = operator.job("first")
        assert first["job"]["state"] == "completed" and len(first["artifacts"]) == 1
        operator.reload(manifest.replace('"first"', '"second"') + "\n" + manifest, "m.toml")
        wait_until(
            lambda: operator.job("second")["job"]["state"] == "completed",
            60,
            "the second job, claimed after the restart",
        )
        assert operator.job("first")["job"]["attempt"] == 1  # nothing ran twice

        # An outage longer than the heartbeat timeout, during which the job finishes: the
        # worker holds its result and keeps heartbeating; when the coordinator is back the
        # lease is renewed and the result lands, once.
        outage = manifest.replace('"first"', '"through-outage"').replace("0.2", "1")
        operator.reload(outage, "m.toml")
        wait_until(
            lambda: operator.job("through-outage")["job"]["state"] == "running",
            60,
            "the long job to start",
        )
        failures_before = worker_log.read_text().count("heartbeat failed")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        wait_until(
            lambda: worker_log.read_text().count("heartbeat failed") >= failures_before + 12,
            60,
            "the worker to miss more heartbeats than the 5 s timeout allows",
        )
        server = serve(state, port, serve_log)
        operator.wait_healthy(30)
        wait_until(
            lambda: operator.job("through-outage")["job"]["state"] == "completed",
            60,
            "the job that ran through the outage",
        )
        detail = operator.job("through-outage")
        assert detail["job"]["attempt"] == 1 and "lost" not in [e["kind"] for e in detail["events"]]
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        operator.close()

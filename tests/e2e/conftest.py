"""End-to-end fixtures: a live uvicorn coordinator in a thread (port 0) and real worker
processes started through the CLI (``trainfleet join``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from livefleet import Fleet, kill_tree, wait_until
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.server import ServeConfig, build_coordinator


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    coord = build_coordinator(
        ServeConfig(
            state_dir=tmp_path / "state",
            heartbeat_interval_s=0.5,
            heartbeat_timeout_s=3.0,
            reap_interval_s=0.25,
        )
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(coord), log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, "uvicorn to start")
    fleet = Fleet(url=f"http://127.0.0.1:{port}", coord=coord, tmp=tmp_path)
    try:
        yield fleet
    finally:
        for proc in fleet.workers:
            kill_tree(proc)
            proc.wait(timeout=30)
        fleet.close()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        coord.queue.close()

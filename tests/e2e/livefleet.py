"""End-to-end helpers: thin names over the reusable harness in ``trainfleet.testing``, and the
manifests and command lines the end-to-end tests share."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from trainfleet.testing import LiveFleet, kill_tree, trainfleet_argv, wait_until

REPO = Path(__file__).resolve().parents[2]
SLOW_JOB = str(Path(__file__).parent / "scripts" / "slow_job.py")

Fleet = LiveFleet  # the name the end-to-end tests use


def command_job(name: str, command: list[str], **extra: object) -> str:
    """A ``[[jobs]]`` table of kind "command"; each ``extra`` key is written as JSON (which
    TOML reads alike for strings, numbers, booleans and lists), a dict as an inline table."""
    lines = ["[[jobs]]", f'name = "{name}"', 'kind = "command"', f"command = {_toml(command)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def slow_job(name: str, seconds: float, **extra: object) -> str:
    """A command job that runs ``scripts/slow_job.py`` for ``seconds``."""
    return command_job(name, [sys.executable, SLOW_JOB], hyper={"seconds": seconds}, **extra)


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_argv(port: int, state: Path, *extra: str) -> list[str]:
    """``trainfleet serve`` on ``port`` with fast heartbeats (every 0.5 s; lost after 5 s)."""
    return trainfleet_argv(
        "serve",
        "--port",
        str(port),
        "--state-dir",
        str(state),
        *extra,
        "--heartbeat-interval-s",
        "0.5",
        "--heartbeat-timeout-s",
        "5",
    )


__all__ = [
    "REPO",
    "SLOW_JOB",
    "Fleet",
    "LiveFleet",
    "command_job",
    "free_port",
    "kill_tree",
    "serve_argv",
    "slow_job",
    "trainfleet_argv",
    "wait_until",
]

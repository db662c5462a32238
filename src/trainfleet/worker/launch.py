"""What a job is started with: its command line and its environment."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from trainfleet import env

CREDENTIALS = (env.JOIN_TOKEN, env.TOKEN)  # the worker's secrets: never handed to a job


def build_argv(spec: dict[str, Any], output_dir: Path) -> list[str]:
    """The job's command line: the built-in trainer, or the manifest's command + --key value."""
    if spec["kind"] == "train":
        return [
            sys.executable,
            "-u",
            "-m",
            "trainfleet.train",
            "--params",
            json.dumps(spec["hyper"]),
            "--mode",
            spec["mode"],
            "--output",
            str(output_dir),
            *_data_args(spec),
        ]
    argv = list(spec["command"])
    for key, value in spec["hyper"].items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{key}", text]
    return argv


def _data_args(spec: dict[str, Any]) -> list[str]:
    if spec.get("dataset") is None:
        return []
    args = ["--dataset", json.dumps(spec["dataset"])]
    return args + (["--path", str(spec["path"])] if spec.get("path") is not None else [])


def build_env(
    claim: dict[str, Any],
    output_dir: Path,
    num_threads: int,
    data_env: dict[str, str] | None = None,
) -> dict[str, str]:
    job = claim["job"]
    bin_dir = str(Path(sys.executable).parent)
    inherited = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    return {
        **inherited,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(num_threads),
        env.NUM_THREADS: str(num_threads),
        env.JOB_ID: job["id"],
        env.JOB_NAME: job["name"],
        env.ATTEMPT: str(claim["attempt"]),
        env.MODE: job["spec"]["mode"],
        env.OUTPUT_DIR: str(output_dir),
        **(data_env or {}),
    }

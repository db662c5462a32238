"""What a job is started with: its command line and its environment.

A ``replica`` job (one replica's share of one round of a collaborative run, DiLoCo:
Douillard et al. 2023, arXiv 2311.08105) runs ``python -m trainfleet.train.replica`` on the
files the worker prepared for it (:class:`ReplicaFiles`: the task, the cached global weights,
the replica's state directory, kept across rounds). The worker's link cap
(``trainfleet join --max-mbps``) reaches it as ``TRAINFLEET_MAX_MBPS``: the volunteer's
setting, from which the replica picks its pseudo-gradient codec.

A ``referee`` job (one referee of a market submission's panel) runs ``python -m
trainfleet.verify.referee`` on the files the worker prepared for it (:class:`RefereeFiles`:
the task, the candidate and the frontier model, fetched by sha256).

A ``producer`` or ``consumer`` job (one side of a disaggregated pipeline, issue 11) runs
``python -m trainfleet.pipeline.producer`` (or ``.consumer``) on the files the worker
prepared for it (:class:`PipelineFiles`: ``attach.json``, mode 0600, holding the pipeline's
secret and the attempt token; for a producer, the teacher model fetched by sha256).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet import env

CREDENTIALS = (env.JOIN_TOKEN, env.TOKEN)  # the worker's secrets: never handed to a job


@dataclass(frozen=True)
class ReplicaFiles:
    """What the worker prepared for a replica job."""

    task: Path  # the ReplicaTask as JSON
    weights: Path  # the round's global weights (in the worker's weights cache)
    state_dir: Path  # <workdir>/runs/<run_id>/replica<k>: optimizer state across rounds


@dataclass(frozen=True)
class RefereeFiles:
    """What the worker prepared for a referee job."""

    task: Path  # the RefereeTask as JSON
    candidate: Path  # the submitted model (in the worker's models cache)
    frontier: Path  # the competition's frontier model it is compared with


@dataclass(frozen=True)
class PipelineFiles:
    """What the worker prepared for a pipeline producer or consumer job."""

    attach: Path  # attach.json (mode 0600): the attach reply + "coordinator" url + "ca" path
    teacher: Path | None  # a producer's teacher model.safetensors (in the models cache)


Prepared = ReplicaFiles | RefereeFiles | PipelineFiles


def build_argv(
    spec: dict[str, Any],
    output_dir: Path,
    replica: Prepared | None = None,
) -> list[str]:
    """The job's command line: the built-in trainer, the replica, referee or pipeline
    program (``replica`` gives its prepared files), or the manifest's command + --key value."""
    if spec["kind"] in ("producer", "consumer"):
        if not isinstance(replica, PipelineFiles):
            raise ValueError(f"a {spec['kind']} job needs its prepared files")
        argv = [
            sys.executable,
            "-u",
            "-m",
            f"trainfleet.pipeline.{spec['kind']}",
            "--attach",
            str(replica.attach),
        ]
        if spec["kind"] == "producer":
            if replica.teacher is None:
                raise ValueError("a producer job needs its teacher model")
            argv += ["--teacher", str(replica.teacher)]
        return [*argv, "--output", str(output_dir)]
    if spec["kind"] == "referee":
        if not isinstance(replica, RefereeFiles):
            raise ValueError("a referee job needs its prepared files")
        return [
            sys.executable,
            "-u",
            "-m",
            "trainfleet.verify.referee",
            "--task",
            str(replica.task),
            "--candidate",
            str(replica.candidate),
            "--frontier",
            str(replica.frontier),
            "--output",
            str(output_dir),
        ]
    if spec["kind"] == "replica":
        if not isinstance(replica, ReplicaFiles):
            raise ValueError("a replica job needs its prepared files")
        return [
            sys.executable,
            "-u",
            "-m",
            "trainfleet.train.replica",
            "--task",
            str(replica.task),
            "--weights",
            str(replica.weights),
            "--state-dir",
            str(replica.state_dir),
            "--output",
            str(output_dir),
        ]
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
    max_mbps: float | None = None,
) -> dict[str, str]:
    """The job's environment: the worker's, less its credentials (and less any inherited
    link cap), plus the attempt's names; ``max_mbps`` reaches replica jobs only."""
    job = claim["job"]
    bin_dir = str(Path(sys.executable).parent)
    hidden = (*CREDENTIALS, env.MAX_MBPS)
    inherited = {k: v for k, v in os.environ.items() if k not in hidden}
    link = (
        {env.MAX_MBPS: f"{max_mbps:g}"}
        if max_mbps is not None and job["spec"]["kind"] == "replica"
        else {}
    )
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
        **link,
    }

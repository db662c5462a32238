"""Run one DiLoCo replica task: ``python -m trainfleet.train.replica --task FILE --weights FILE
--state-dir DIR --output DIR``.

This is what a worker starts for a ``kind = "replica"`` job (see ``inner``): the task is a
``ReplicaTask`` as JSON, the weights the round's global weights as safetensors (fp32, exactly
the recipe's tensor names and shapes), the state directory where the replica keeps its AdamW
state between rounds, and the output directory that receives ``pseudograd.safetensors`` and
``metrics.json``. Progress goes to stdout, one flushed line at a time. The environment gives
the CPU threads (``TRAINFLEET_NUM_THREADS``), the link speed the codec must fit
(``TRAINFLEET_MAX_MBPS``, megabits per second), the worker's cache settings
(``TRAINFLEET_CACHE_*``) and a handed router (``TRAINFLEET_ROUTER_FILE``).

Exit codes as ``python -m trainfleet.train``: 2 for a bad task, weights file or setting (one
line on stderr, no traceback), 1 for data that cannot be read or does not match its pins
(another host may succeed), 3 refused (a router that fails verification).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainfleet import env
from trainfleet.data.prepare import CacheSettings
from trainfleet.manifest.runs import ReplicaTask
from trainfleet.train.__main__ import EXIT_USAGE, _describe, run_training
from trainfleet.train.__main__ import _fail as fail
from trainfleet.train.inner import WeightsMismatch, check_weights, run_replica
from trainfleet.train.recipes import GPTParams

PROG = "trainfleet.train.replica"
MAX_GANG_SIZE = 64  # RunSpec.gang_size's bound
MAX_INNER_STEPS = 1_000_000  # RunSpec.inner_steps's bound


def _log(line: str) -> None:
    print(line, flush=True)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    return fail(message, code, PROG)


def _positive(name: str, number: type[int] | type[float]) -> int | float | None:
    """The env variable ``name`` as a positive number, None when unset; ValueError if bad."""
    text = os.environ.get(name, "")
    if not text:
        return None
    try:
        value = number(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise ValueError(f"{name} must be a positive {number.__name__}, got {text!r}")
    return value


def _task_problem(task: ReplicaTask) -> str | None:
    """What makes a well-typed task impossible to run (bounds as ``RunSpec``'s), or None."""
    if not task.replica < task.num_replicas:
        return f"replica {task.replica} >= num_replicas {task.num_replicas}"
    if task.gang_size > MAX_GANG_SIZE:
        return f"gang_size {task.gang_size} > {MAX_GANG_SIZE}"
    if task.inner_steps > MAX_INNER_STEPS:
        return f"inner_steps {task.inner_steps} > {MAX_INNER_STEPS}"
    if task.global_step + task.inner_steps > task.total_steps:
        return (
            f"global_step {task.global_step} + inner_steps {task.inner_steps}"
            f" > total_steps {task.total_steps}"
        )
    if task.target_s is not None and not 0 <= task.target_s < math.inf:
        return f"target_s {task.target_s} is not a number of seconds >= 0"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__)
    parser.add_argument("--task", required=True, type=Path, help="the ReplicaTask as a JSON file")
    parser.add_argument("--weights", required=True, type=Path, help="global weights, safetensors")
    parser.add_argument(
        "--state-dir", required=True, type=Path, help="replica state between rounds"
    )
    parser.add_argument("--output", required=True, type=Path, help="directory for outputs")
    args = parser.parse_args(argv)

    try:
        task = ReplicaTask.model_validate_json(args.task.read_bytes())
        params = GPTParams.model_validate(task.params)
    except OSError as e:
        return _fail(f"cannot read --task: {e}")
    except ValidationError as e:
        return _fail(f"invalid --task: {_describe(e)}")
    problem = _task_problem(task)
    if problem:
        return _fail(f"invalid --task: {problem}")
    try:
        num_threads = _positive(env.NUM_THREADS, int)
        max_mbps = _positive(env.MAX_MBPS, float)
    except ValueError as e:
        return _fail(str(e))
    try:
        weights = load_file(str(args.weights))
        check_weights(params, weights)
    except (OSError, SafetensorError) as e:
        return _fail(f"cannot read --weights as safetensors: {e}")
    except WeightsMismatch as e:
        return _fail(f"invalid --weights: {e}")
    router_file = os.environ.get(env.ROUTER_FILE)
    try:
        handed = json.loads(Path(router_file).read_text()) if router_file else None
    except (OSError, ValueError) as e:
        return _fail(f"cannot read {env.ROUTER_FILE}: {e}")

    return run_training(
        lambda: run_replica(
            task,
            weights,
            args.state_dir,
            args.output,
            log=_log,
            num_threads=None if num_threads is None else int(num_threads),
            max_mbps=max_mbps,
            settings=CacheSettings.from_env(),
            handed_router=handed,
        ),
        PROG,
    )


if __name__ == "__main__":
    sys.exit(main())

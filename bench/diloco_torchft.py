"""torchft's DiLoCo on the same model, data, H and replicas, as torchft's own tests run it.

Set up as in torchft's ``local_sgd_integ_test.py`` / ``_test/diloco_trainer.py``: a
``LighthouseServer`` in this process, then one spawned process per replica group (world size
1), each with its own ``TCPStore``, a ``ProcessGroupGloo``, a ``Manager`` (synchronous quorum,
``min_replica_size`` = replicas) and ``torchft.local_sgd.DiLoCo`` wrapping the whole model
(one fragment) with an SGD Nesterov outer optimizer. Every ``H`` inner steps torchft
all-reduces the fp32 pseudo-gradients across the replica groups and takes the outer step.
Communication model: a ring all-reduce, each replica sends (and receives) 2 x fp32 params
per outer step. Needs ``pip install 'trainfleet[bench]'``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.diloco_arms import (
    FP32,
    ArmResult,
    HeldOut,
    Point,
    Setup,
    Weights,
    batches,
    new_model,
    num_params,
    snapshot,
)
from trainfleet.train.trainer import lr_at, make_optimizer, train_step

MISSING = "torchft not installed: pip install 'trainfleet[bench]'"
TIMEOUT = timedelta(seconds=120)


@contextmanager
def quiet(log_file: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors: torchft's Rust side logs
    there too) to ``log_file`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_file, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def available() -> bool:
    return importlib.util.find_spec("torchft") is not None


def ft_replica(replica: int, job: dict[str, Any], arm: dict[str, Any], out: str) -> None:
    """One replica group (one rank) of torchft's DiLoCo."""
    with quiet(Path(out) / f"ft-replica{replica}.log"):
        _ft_replica(replica, job, arm, out)


def _ft_replica(replica: int, job: dict[str, Any], arm: dict[str, Any], out: str) -> None:
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    torch.set_num_threads(1)
    setup = Setup.from_job(job)
    params = setup.params.model_copy(update={"lr": arm["inner_lr"]})
    model = new_model(params, torch.load(Path(out) / "init.pt"))
    inner = make_optimizer(model, params)
    outer = torch.optim.SGD(
        model.parameters(), lr=arm["outer_lr"], momentum=arm["momentum"], nesterov=True
    )
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "inner_optim": inner.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner_optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=TIMEOUT),
        min_replica_size=setup.replicas,
        use_async_quorum=False,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"bench_{replica}",
        store_addr="localhost",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=arm["lighthouse"],
        timeout=TIMEOUT,
        quorum_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
    )
    h = arm["inner_steps"]
    feed = batches(setup, replica, setup.steps)
    snapshots: list[tuple[int, Weights]] = []
    step_s = 0.0
    started = time.perf_counter()
    with DiLoCo(
        manager,
        [model],
        inner,
        outer,
        sync_every=h,
        backup_device=torch.device("cpu"),
        pin_memory=False,
    ):
        for step in range(setup.steps):
            batch = next(feed)
            began = time.perf_counter()
            train_step(
                model, inner, *batch, lr_at(step, params.lr, params.warmup_steps, setup.steps)
            )
            step_s += time.perf_counter() - began  # includes the sync on every H-th step
            if replica == 0 and (step + 1) % h == 0:
                snapshots.append((step + 1, snapshot(model)))
    elapsed = time.perf_counter() - started
    if replica == 0:
        torch.save(snapshots, Path(out) / "ft-snapshots.pt")
    report = {"elapsed_s": elapsed, "outer_steps": manager.current_step(), "step_s": step_s}
    (Path(out) / f"ft-replica{replica}.json").write_text(json.dumps(report))
    manager.shutdown(wait=False)


def torchft_diloco(
    setup: Setup,
    weights: Weights,
    held: HeldOut,
    work: Path,
    *,
    inner_steps: int,
    inner_lr: float,
    outer_lr: float,
    momentum: float,
) -> ArmResult:
    from torchft.coordination import LighthouseServer

    work.mkdir(parents=True, exist_ok=True)
    torch.save(weights, work / "init.pt")
    with quiet(work / "lighthouse.log"):  # torchft's Rust side logs every quorum
        lighthouse = LighthouseServer(bind="[::]:0", min_replicas=setup.replicas)
        arm = {
            "inner_steps": inner_steps,
            "inner_lr": inner_lr,
            "outer_lr": outer_lr,
            "momentum": momentum,
            "lighthouse": lighthouse.address(),
        }
        started = time.perf_counter()
        try:
            mp.spawn(ft_replica, args=(setup.job(), arm, str(work)), nprocs=setup.replicas)
        finally:
            lighthouse.shutdown()
    wall = time.perf_counter() - started
    per_sync = 2 * FP32 * num_params(weights)
    saved: list[tuple[int, Weights]] = torch.load(work / "ft-snapshots.pt")
    keep = [
        i
        for i, (s, _) in enumerate(saved)
        if s % setup.eval_every < inner_steps or i == len(saved) - 1
    ]
    samples = setup.replicas * setup.params.batch_size
    points = []
    for i in keep:
        steps = saved[i][0]
        sent = steps // inner_steps * per_sync
        points.append(Point(steps, steps * samples, sent, sent, 0.0))
    held.score(points, [saved[i][1] for i in keep])
    replicas = [
        json.loads((work / f"ft-replica{r}.json").read_text()) for r in range(setup.replicas)
    ]
    return ArmResult(
        name=f"torchft DiLoCo H={inner_steps}",
        family="torchft",
        settings={**{k: v for k, v in arm.items() if k != "lighthouse"}, "codec": "fp32"},
        points=points,
        compute_s=sum(r["step_s"] for r in replicas),
        replica_compute_s=None,  # replica processes share the cores
        extra={"wall_s": wall, "outer_steps": replicas[0]["outer_steps"]},
    )

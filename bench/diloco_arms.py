"""The DiLoCo benchmark's shared setup and its two baselines: one worker, and synchronous data
parallel training with a real gloo all-reduce of the gradients every step.

Every arm starts from the same seeded weights, trains the same byte GPT with the trainer's
inner optimizer (AdamW, betas 0.9/0.95, decay on matrices only, gradients clipped to norm 1,
``lr_at`` warmup then cosine) on the same prepared dataset, and is scored by the same held-out
windows. An arm returns snapshots of its weights at evaluation points; they are scored after
the arm has finished, so evaluation never enters a measured time.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import TypeAdapter
from torch.nn.parallel import DistributedDataParallel

from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.spec import DatasetSpec
from trainfleet.train.feed import ShardFeed, heldout_tokens
from trainfleet.train.inner import heldout_pool, init_weights, replica_seed, replica_shards
from trainfleet.train.model import GPT
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import (
    deterministic_torch,
    evaluate,
    lr_at,
    make_optimizer,
    model_from_weights,
    train_step,
)

Weights = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
SPECS: TypeAdapter[DatasetSpec] = TypeAdapter(DatasetSpec)
FP32 = 4


@dataclass(frozen=True)
class Setup:
    """What every arm shares: model and batch (``params``, batch = one replica's B), data,
    replicas, inner steps per replica (equal samples) and evaluation spacing."""

    params: GPTParams
    dataset: DatasetSpec
    cache_dir: Path
    replicas: int
    steps: int  # inner steps per replica; the one-worker arm takes replicas x steps
    eval_every: int  # inner steps per replica between evaluations

    def job(self) -> dict[str, Any]:
        """Picklable form for spawned processes."""
        return {
            "params": self.params.model_dump(),
            "dataset": self.dataset.model_dump(),
            "cache_dir": str(self.cache_dir),
            "replicas": self.replicas,
            "steps": self.steps,
            "eval_every": self.eval_every,
        }

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> Setup:
        return cls(
            params=GPTParams.model_validate(job["params"]),
            dataset=SPECS.validate_python(job["dataset"]),
            cache_dir=Path(job["cache_dir"]),
            replicas=job["replicas"],
            steps=job["steps"],
            eval_every=job["eval_every"],
        )


@dataclass
class Point:
    """One evaluation point. ``steps``: inner steps on the critical path so far (one worker:
    all of them; a replica or rank: its own); ``samples``: sequences trained on, all replicas;
    ``sent``: bytes one replica sent; ``link_bytes``: bytes that crossed one replica's link in
    the arm's communication model; ``overhead_s``: measured time on the critical path that is
    neither an inner step nor the link (replica set-up and encoding, the coordinator's
    decode / screen / average / outer step)."""

    steps: int
    samples: int
    sent: int
    link_bytes: int
    overhead_s: float
    loss: float = float("nan")


@dataclass
class ArmResult:
    name: str
    family: str  # one-worker | sync-dp | diloco | torchft
    settings: dict[str, Any]
    points: list[Point]
    compute_s: float  # measured wall time of the arm's training (all replicas / ranks)
    replica_compute_s: float | None  # measured compute of one replica, when contention-free
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.points[-1].loss


def new_model(params: GPTParams, weights: Weights) -> GPT:
    return model_from_weights(params, weights)


def initial_weights(params: GPTParams) -> Weights:
    """The seeded round-0 weights every arm starts from (``inner.init_weights``)."""
    return init_weights(params)


def num_params(weights: Weights) -> int:
    return sum(t.numel() for t in weights.values())


def batches(setup: Setup, rank: int | None, steps: int) -> Iterator[Batch]:
    """Replica ``rank``'s batches exactly as ``inner.run_replica`` draws them (its share of the
    shards by jump hash, ``replica_seed``); ``rank=None``: every shard, the run's seed (the
    one worker, as plain training)."""
    prepared = prepare_dataset(setup.dataset, CacheSettings(setup.cache_dir), log=lambda _: None)
    p = setup.params
    if rank is None:
        shards, seed = prepared.plan.select("train"), p.seed
    else:
        shards = replica_shards(prepared.plan, rank, setup.replicas)
        seed = replica_seed(p.seed, rank)
    feed = ShardFeed(
        prepared,
        shards,
        [],
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        seed=seed,
        steps=steps,
        log=lambda _: None,
    )
    return feed.batches()


class HeldOut:
    """The held-out windows every arm is scored on: ``inner.heldout_loss``'s (the coordinator's
    evaluator), with the tokens read once."""

    def __init__(self, setup: Setup):
        prepared = prepare_dataset(
            setup.dataset, CacheSettings(setup.cache_dir), log=lambda _: None
        )
        p = self.params = setup.params
        self.tokens, _ = heldout_tokens(
            prepared,
            heldout_pool(prepared.plan),
            p.eval_batches * p.batch_size,
            p.seq_len,
            "(all paths)",
        )

    def loss(self, weights: Weights) -> float:
        p = self.params
        with deterministic_torch(p.seed, torch.get_num_threads()):
            model = model_from_weights(p, weights)
            return evaluate(model, self.tokens, p.batch_size, p.eval_batches)

    def score(self, points: list[Point], snapshots: list[Weights]) -> None:
        for point, weights in zip(points, snapshots, strict=True):
            point.loss = self.loss(weights)


def snapshot(model: GPT) -> Weights:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# One worker ----------------------------------------------------------------------------------


def one_worker(setup: Setup, weights: Weights, lr: float, held: HeldOut) -> ArmResult:
    """Batch B, replicas x steps steps: the same samples as the other arms, one at a time."""
    total = setup.replicas * setup.steps
    params = setup.params.model_copy(update={"lr": lr})
    model = new_model(params, weights)
    optimizer = make_optimizer(model, params)
    feed = batches(setup, None, total)
    points: list[Point] = []
    snapshots: list[Weights] = []
    every = setup.eval_every * setup.replicas
    step_s = 0.0
    with deterministic_torch(params.seed, 1):  # as the trainer and a replica run
        for step in range(total):
            batch = next(feed)
            started = time.perf_counter()
            train_step(model, optimizer, *batch, lr_at(step, lr, params.warmup_steps, total))
            step_s += time.perf_counter() - started
            if (step + 1) % every == 0 or step + 1 == total:
                points.append(Point(step + 1, (step + 1) * params.batch_size, 0, 0, 0.0))
                snapshots.append(snapshot(model))
    held.score(points, snapshots)
    return ArmResult(
        name="one worker",
        family="one-worker",
        settings={"inner_lr": lr, "batch": params.batch_size, "steps": total},
        points=points,
        compute_s=step_s,
        replica_compute_s=step_s,
        extra={"step_s": step_s / total},
    )


# Synchronous data parallel -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dp_rank(rank: int, job: dict[str, Any], lr: float, port: int, out: str) -> None:
    """One rank of synchronous DP: ``DistributedDataParallel`` over gloo all-reduces (averages)
    the gradients inside ``backward``; the step is the trainer's ``train_step``."""
    torch.set_num_threads(1)
    setup = Setup.from_job(job)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=setup.replicas
    )
    params = setup.params.model_copy(update={"lr": lr})
    model = new_model(params, torch.load(Path(out) / "init.pt"))
    ddp = DistributedDataParallel(model)
    optimizer = make_optimizer(model, params)
    feed = batches(setup, rank, setup.steps)
    snapshots: list[tuple[int, Weights]] = []
    step_s = 0.0
    with deterministic_torch(params.seed, 1):
        for step in range(setup.steps):
            batch = next(feed)
            started = time.perf_counter()
            lr_now = lr_at(step, lr, params.warmup_steps, setup.steps)
            train_step(ddp, optimizer, *batch, lr_now)
            step_s += time.perf_counter() - started
            if rank == 0 and ((step + 1) % setup.eval_every == 0 or step + 1 == setup.steps):
                snapshots.append((step + 1, snapshot(model)))
    if rank == 0:
        torch.save(snapshots, Path(out) / "dp-snapshots.pt")
    (Path(out) / f"dp-rank{rank}.json").write_text(json.dumps({"step_s": step_s}))
    dist.destroy_process_group()


def sync_dp(setup: Setup, weights: Weights, lr: float, held: HeldOut, work: Path) -> ArmResult:
    """``replicas`` spawned ranks at batch B each: the combined batch is replicas x B. Ring
    all-reduce model: each rank sends (and receives) 2 x fp32 params per step."""
    work.mkdir(parents=True, exist_ok=True)
    torch.save(weights, work / "init.pt")
    started = time.perf_counter()
    mp.spawn(dp_rank, args=(setup.job(), lr, free_port(), str(work)), nprocs=setup.replicas)
    wall = time.perf_counter() - started
    per_step = 2 * FP32 * num_params(weights)
    saved: list[tuple[int, Weights]] = torch.load(work / "dp-snapshots.pt")
    samples = setup.replicas * setup.params.batch_size
    points = [Point(s, s * samples, s * per_step, s * per_step, 0.0) for s, _ in saved]
    held.score(points, [w for _, w in saved])
    ranks = [json.loads((work / f"dp-rank{r}.json").read_text()) for r in range(setup.replicas)]
    return ArmResult(
        name=f"sync DP x{setup.replicas} (gloo)",
        family="sync-dp",
        settings={"inner_lr": lr, "batch": setup.params.batch_size * setup.replicas},
        points=points,
        compute_s=sum(r["step_s"] for r in ranks),  # all-reduce included
        replica_compute_s=None,  # ranks share the cores: their own times include contention
        extra={"wall_s": wall},
    )

"""One DiLoCo replica's round: H inner AdamW steps on its share of the data, then its
pseudo-gradient (Douillard et al. 2023, arXiv 2311.08105, Algorithm 1's inner loop).

Data: the dataset's training shards (all paths) are split across the run's ``num_replicas``
by jump consistent hash (``data.partition``: a change in the number of replicas moves as few
shards as possible); replica k trains on ``partition(keys, k, n)`` with a ``ShardFeed`` seeded
by ``replica_seed(seed, k)`` (the run's own seed for replica 0) that starts at the task's
global step. The batch at global step i is a pure function of (shards, seed, i), so one replica
training rounds 0..R-1 sees exactly the batches plain training on the same shards sees in one
go; with the same AdamW (``trainer.make_optimizer``), the same step (``trainer.train_step``:
lr ``trainer.lr_at(global step, total steps)``, clip 1.0) and the optimizer state carried
between rounds, one replica with outer lr 1, no momentum and codec ``none`` is plain training,
bit for bit (tests/train/test_diloco_equivalence.py).

Between rounds the replica keeps its AdamW state and, for topk, its error-feedback residual in
``state_dir`` (``RUNID16-kK/round-R.pt`` + ``round-R.json`` naming run, replica and round; the
two newest rounds are kept so that a retried round still finds the one before). A task resumes
them only when they end at ``round - 1`` of the same run (the run id is the hash of the run's
identity, so the same lineage of global weights); a newcomer or a gap starts fresh, and the
metrics say which (``resumed_optimizer``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainfleet.data.partition import partition
from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.shards import ShardInfo, ShardPlan
from trainfleet.data.spec import DatasetSpec
from trainfleet.manifest.runs import ReplicaTask
from trainfleet.train import pseudograd
from trainfleet.train.feed import ShardFeed, heldout_tokens
from trainfleet.train.gang import InnerJob, backend_for
from trainfleet.train.model import GPT
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import deterministic_torch, evaluate, model_from_weights

PSEUDOGRAD_FILE = "pseudograd.safetensors"
METRICS_FILE = "metrics.json"
KEPT_ROUNDS = 2
_MAX_SEED = 2**63 - 1


class WeightsMismatch(ValueError):
    """Global weights whose tensor names, shapes or dtypes are not the recipe's."""


def replica_seed(seed: int, replica: int) -> int:
    """The batch-order seed of ``replica``: the run's own for replica 0, hashed for others."""
    if replica == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:replica:{replica}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & _MAX_SEED


def replica_shards(plan: ShardPlan, replica: int, num_replicas: int) -> list[ShardInfo]:
    """The training shards (of every path) that ``replica`` of ``num_replicas`` owns."""
    train = plan.select("train")
    mine = set(partition([s.key for s in train], replica, num_replicas))
    return [s for s in train if s.key in mine]


def heldout_pool(plan: ShardPlan) -> list[ShardInfo]:
    """Every held-out shard, taken round-robin over paths (so a budget spreads over them)."""
    return sorted(plan.select("heldout"), key=lambda s: (s.index, s.path))


def init_weights(params: GPTParams) -> dict[str, Tensor]:
    """Round-0 global weights: the GPT init under ``params.seed``, as plain training does."""
    with deterministic_torch(params.seed):
        model = GPT(params.n_layers, params.d_model, params.n_heads, params.seq_len)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def check_weights(params: GPTParams, weights: dict[str, Tensor]) -> None:
    """Raise ``WeightsMismatch`` unless ``weights`` are exactly the recipe's fp32 tensors."""
    expected = {n: tuple(t.shape) for n, t in init_weights(params).items()}
    found = {n: tuple(t.shape) for n, t in weights.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        shapes = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
        raise WeightsMismatch(
            f"weights do not fit the recipe: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {shapes[:5]}"
        )
    wrong = sorted(n for n, t in weights.items() if t.dtype != torch.float32)
    if wrong:
        raise WeightsMismatch(f"weights must be float32: {wrong[:5]}")


def heldout_loss(
    params: GPTParams,
    dataset: DatasetSpec,
    weights: dict[str, Tensor],
    settings: CacheSettings,
    *,
    handed_router: dict[str, Any] | None = None,
    num_threads: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> float:
    """Mean held-out loss (nats/token) of ``weights`` over the held-out shards of every path,
    ``trainer.evaluate``'s evenly spaced windows, deterministic."""
    prepared = prepare_dataset(dataset, settings, handed_router=handed_router, log=log)
    num_windows = params.eval_batches * params.batch_size
    tokens, _ = heldout_tokens(
        prepared, heldout_pool(prepared.plan), num_windows, params.seq_len, "(all paths)"
    )
    with deterministic_torch(params.seed, num_threads):
        model = model_from_weights(params, weights)
        return evaluate(model, tokens, params.batch_size, params.eval_batches)


@dataclass
class ReplicaState:
    """What a replica carries from one round to the next."""

    optimizer: dict[str, Any]
    residual: dict[str, Tensor] | None


def _state_folder(state_dir: Path, task: ReplicaTask) -> Path:
    return state_dir / f"{task.run_id[:16]}-k{task.replica}"


def load_state(state_dir: Path, task: ReplicaTask) -> ReplicaState | None:
    """The state that ended at ``task.round - 1`` of this run and replica, if kept here."""
    folder = _state_folder(state_dir, task)
    previous = task.round - 1
    try:
        info = json.loads((folder / f"round-{previous}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if (info.get("run_id"), info.get("replica"), info.get("round")) != (
        task.run_id,
        task.replica,
        previous,
    ):
        return None
    data = torch.load(folder / f"round-{previous}.pt", weights_only=True)
    return ReplicaState(data["optimizer"], data["residual"])


def save_state(state_dir: Path, task: ReplicaTask, state: ReplicaState) -> None:
    """Keep ``state`` as ending at ``task.round``; drop rounds older than the kept ones."""
    folder = _state_folder(state_dir, task)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = folder / f"round-{task.round}.pt"
    torch.save({"optimizer": state.optimizer, "residual": state.residual}, f"{tensors}.tmp")
    os.replace(f"{tensors}.tmp", tensors)
    info = {"run_id": task.run_id, "replica": task.replica, "round": task.round}
    note = folder / f"round-{task.round}.json"
    note.with_suffix(".tmp").write_text(json.dumps(info) + "\n")
    os.replace(note.with_suffix(".tmp"), note)  # written last: it vouches for the tensors
    for old in folder.glob("round-*.*"):
        number = old.name.split(".")[0].removeprefix("round-")
        if number.isdigit() and int(number) <= task.round - KEPT_ROUNDS:
            old.unlink(missing_ok=True)


def run_replica(
    task: ReplicaTask,
    weights: dict[str, Tensor],
    state_dir: Path,
    output_dir: Path,
    log: Callable[[str], None] = print,
    num_threads: int | None = None,
    max_mbps: float | None = None,
    *,
    settings: CacheSettings | None = None,
    handed_router: dict[str, Any] | None = None,
    backend: Any = None,
) -> dict[str, Any]:
    """Run ``task``'s inner steps from ``weights``; write ``output_dir/pseudograd.safetensors``
    and ``metrics.json``; return the metrics. ``backend`` overrides the one ``gang_size``
    picks (``InProcess`` or ``Gang``); ``settings`` default to the worker's (env)."""
    started = time.perf_counter()
    params = GPTParams.model_validate(task.params)
    check_weights(params, weights)
    settings = CacheSettings.from_env() if settings is None else settings
    prepared = prepare_dataset(task.dataset, settings, handed_router=handed_router, log=log)
    k, n, g = task.replica, task.num_replicas, task.gang_size
    feed = ShardFeed(
        prepared,
        replica_shards(prepared.plan, k, n),
        [],
        batch_size=params.batch_size * g,
        seq_len=params.seq_len,
        seed=replica_seed(params.seed, k),
        steps=task.global_step + task.inner_steps,
        start_step=task.global_step,
        log=log,
        where=f"replica {k} of {n}",
        describe={"replica": k, "num_replicas": n},
    )
    state = load_state(state_dir, task)
    job = InnerJob(
        params=params,
        weights=weights,
        optimizer_state=state.optimizer if state else None,
        start_step=task.global_step,
        num_steps=task.inner_steps,
        total_steps=task.total_steps,
        target_s=task.target_s,
        num_threads=num_threads,
    )
    log(
        f"run {task.run} round {task.round} replica {k}/{n}: {task.inner_steps} inner steps "
        f"from step {task.global_step} of {task.total_steps}, {feed.num_train_shards} shards, "
        f"gang of {g}, optimizer {'resumed' if state else 'fresh'}"
        + (", warm-up round" if task.warmup else "")
    )
    result = (backend or backend_for(g)).run(job, feed.batches(), log)

    num_params = sum(t.numel() for t in weights.values())
    codec = task.compression
    if max_mbps is not None:
        codec = pseudograd.codec_for_link(codec, num_params, max_mbps, result.compute_s)
    done = len(result.losses)
    meta = {"run_id": task.run_id, "round": str(task.round), "replica": str(k)}
    encoded = pseudograd.encode(
        weights,
        result.weights,
        codec,
        residual=state.residual if state else None,
        meta={**meta, "inner_steps_done": str(done)},
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / PSEUDOGRAD_FILE).write_bytes(encoded.data)
    save_state(state_dir, task, ReplicaState(result.optimizer_state, encoded.residual))

    tokens = done * params.batch_size * params.seq_len * g
    last = result.losses[-10:]
    metrics: dict[str, Any] = {
        "run": task.run,
        "round": task.round,
        "replica": k,
        "global_step": task.global_step,
        "train_loss": sum(last) / len(last),
        "first_loss": result.losses[0],
        "inner_steps": task.inner_steps,
        "inner_steps_done": done,
        "tokens": tokens,
        "compute_s": result.compute_s,
        "elapsed_s": time.perf_counter() - started,
        "tokens_per_s": tokens / result.compute_s if result.compute_s > 0 else 0.0,
        "codec": encoded.codec,
        "payload_bytes": len(encoded.data),
        "resumed_optimizer": state is not None,
        "num_params": num_params,
        "gang_size": g,
        "warmup": task.warmup,
        "data": feed.report(),
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log(
        f"replica {k} round {task.round}: {done} steps, train loss {metrics['train_loss']:.4f}, "
        f"{metrics['tokens_per_s']:.0f} tok/s, codec {encoded.codec}, "
        f"{metrics['payload_bytes']:,} bytes"
    )
    return metrics

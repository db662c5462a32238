"""The ``gpt`` recipe's training loop: a byte-level GPT on a dataset spec's shards, on CPU.

``train`` prepares the job's dataset (its ``dataset`` spec, or the built-in spec that
``hyper.corpus`` is shorthand for, see ``data.builtin``), trains with AdamW (linear warmup,
then cosine decay to 10% of the peak learning rate, gradients clipped to norm 1) on the
``ShardFeed``'s random windows inside training shards, evaluates the held-out loss once at the
end, and writes ``model.safetensors``, ``config.json`` and ``metrics.json`` into the output
directory. The step (``train_step``), the loop around it (``run_steps``), the optimizer
(``make_optimizer``) and the schedule (``lr_at``) are shared with a DiLoCo replica's inner steps
(``inner``, ``gang``), so that one replica with outer lr 1 reproduces this trainer bit for bit.

Reproducibility: initialisation and batch order come from ``params.seed`` alone, and torch runs
with deterministic algorithms, so the same params on the same thread count give bit-identical
losses. Only ``tokens_per_s`` and ``elapsed_s`` vary between such runs. Torch's global state
(RNG, thread count, determinism flag) is restored on return.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainfleet.data.builtin import builtin_dataset
from trainfleet.data.dialects import documents_floor_nats
from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.spec import DatasetSpec, SyntheticDataset
from trainfleet.errors import CorpusTooSmall
from trainfleet.train.feed import ShardFeed
from trainfleet.train.model import GPT
from trainfleet.train.recipes import RECIPES, WEIGHTS_FILE, GPTParams

SMOKE_STEPS = 5
MIN_LR_RATIO = 0.1  # cosine decay ends at this fraction of the peak learning rate
GRAD_CLIP = 1.0
NUM_PROGRESS_LINES = 10
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for 0-based ``step``: linear warmup to ``peak_lr``, cosine to 10% of it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak_lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * cosine)


# Torch's RNG, determinism flag and thread count are per process, not per thread: two
# threads seeding and drawing at once interleave their draws (two round drivers of one
# process opening a run's round 0 got weights no seed gives). One holder at a time.
_TORCH_GLOBALS = threading.RLock()


@contextmanager
def deterministic_torch(seed: int, num_threads: int | None = None) -> Iterator[None]:
    """Seed torch, turn on deterministic algorithms and set threads; restore all on exit.
    Other threads of the process wait meanwhile (``_TORCH_GLOBALS``): the state is global."""
    with _TORCH_GLOBALS, _seeded(seed, num_threads):
        yield


@contextmanager
def _seeded(seed: int, num_threads: int | None) -> Iterator[None]:
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(previous_threads)


def windows(
    data: torch.Tensor, starts: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, (len(starts), seq_len) each, for windows at ``starts``."""
    chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, batch_size: int, num_batches: int) -> float:
    """Mean cross-entropy, nats per byte, over evenly spaced windows covering ``data``."""
    seq_len = model.seq_len
    num_windows = batch_size * num_batches
    starts = torch.linspace(0, len(data) - seq_len - 1, num_windows).long()
    was_training = model.training
    model.eval()
    losses = []
    for batch_starts in starts.split(batch_size):
        _, loss = model(*windows(data, batch_starts, seq_len))
        assert loss is not None
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def save_checkpoint(model: GPT, params: GPTParams, mode: str, output_dir: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (recipe, mode, params) to ``output_dir``."""
    config = {"recipe": "gpt", "mode": mode, "params": params.model_dump()}
    (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(model.state_dict(), str(output_dir / WEIGHTS_FILE), metadata={"recipe": "gpt"})


def load_checkpoint(output_dir: Path) -> tuple[GPT, GPTParams]:
    """The model and params a ``train`` run saved in ``output_dir``."""
    config = json.loads((output_dir / CONFIG_FILE).read_text())
    params = GPTParams.model_validate(config["params"])
    model = GPT(params.n_layers, params.d_model, params.n_heads, params.seq_len)
    model.load_state_dict(load_file(str(output_dir / WEIGHTS_FILE)))
    return model, params


def model_from_weights(params: GPTParams, weights: dict[str, torch.Tensor]) -> GPT:
    """The recipe's model holding ``weights`` (names and shapes must be exactly its own)."""
    model = GPT(params.n_layers, params.d_model, params.n_heads, params.seq_len)
    model.load_state_dict(weights)
    return model


def make_optimizer(model: torch.nn.Module, params: GPTParams) -> torch.optim.AdamW:
    # Decay weight matrices and embeddings only, not biases or LayerNorm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": params.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.95))


StepHook = Callable[[float, float], tuple[float, bool]]
"""Called after each step with (this process's loss, compute seconds so far); returns the
loss to record and whether to stop now (a gang averages the loss over its ranks and agrees on
stopping; an adaptive replica stops at its time target)."""


def _no_hook(loss: float, _compute_s: float) -> tuple[float, bool]:
    return loss, False


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
) -> float:
    """One optimizer step at ``lr`` on one batch, gradients clipped to ``GRAD_CLIP``; the loss.

    Plain training, a DiLoCo replica's inner steps and every rank of a gang run exactly this
    (a ``DistributedDataParallel`` model all-reduces the gradients inside ``backward``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    _, loss = model(inputs, targets)
    assert loss is not None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return float(loss.item())


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    params: GPTParams,
    num_steps: int,
    log: Callable[[str], None],
    *,
    start_step: int = 0,
    total_steps: int | None = None,
    tokens_per_step: int | None = None,
    hook: StepHook = _no_hook,
) -> tuple[list[float], float]:
    """Take up to ``num_steps`` steps, the first being step ``start_step`` of a schedule of
    ``total_steps`` (default: ``num_steps``) for the learning rate; return each step's loss and
    the wall time they took. ``hook`` may stop early (at least one step is taken)."""
    total = num_steps if total_steps is None else total_steps
    tokens_per_step = tokens_per_step or params.batch_size * params.seq_len
    log_every = max(1, num_steps // NUM_PROGRESS_LINES)
    losses: list[float] = []
    started = last_log_time = time.perf_counter()
    last_log_step = 0
    for i in range(num_steps):
        step = start_step + i
        lr = lr_at(step, params.lr, params.warmup_steps, total)
        loss, stop = hook(
            train_step(model, optimizer, *next(batches), lr), time.perf_counter() - started
        )
        losses.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == num_steps or stop:
            now = time.perf_counter()
            recent_tokens = (i + 1 - last_log_step) * tokens_per_step
            log(
                f"step {step + 1}/{total} loss {loss:.4f} lr {lr:.1e} "
                f"tok/s {recent_tokens / (now - last_log_time):.0f}"
            )
            last_log_step, last_log_time = i + 1, now
        if stop:
            break
    return losses, time.perf_counter() - started


@dataclass
class _Data:
    """Training batches, held-out tokens and what the result says about them."""

    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    heldout: torch.Tensor
    describe: str
    report: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class DataSource:
    """A job's dataset: the spec, the path it trains on, the worker's cache settings and the
    router the coordinator handed over (None: fit it here)."""

    spec: DatasetSpec
    path: int | None
    settings: CacheSettings
    handed_router: dict[str, Any] | None = None


def _load_data(
    source: DataSource, params: GPTParams, steps: int, log: Callable[[str], None]
) -> _Data:
    prepared = prepare_dataset(
        source.spec, source.settings, handed_router=source.handed_router, log=log
    )
    path = source.path or 0
    feed = ShardFeed.for_path(
        prepared,
        path,
        batch_size=params.batch_size,
        seq_len=params.seq_len,
        seed=params.seed,
        steps=steps,
        log=log,
    )
    heldout = feed.heldout(params.eval_batches * params.batch_size)
    plan = prepared.plan
    spec = source.spec
    floor = None
    if isinstance(spec, SyntheticDataset):  # the exact floor of the documents this path holds
        indices = [i for s in plan.shards if s.path == path for i in s.doc_indices()]
        floor = documents_floor_nats(spec, indices)
    log(
        f"dataset {spec.name} ({spec.source}): {plan.num_documents:,} documents, "
        f"{plan.num_tokens:,} tokens, {len(plan.shards)} shards; routing {prepared.routing}"
        + (f"; loss floor {floor:.4f} nats/token" if floor is not None else "")
    )
    return _Data(
        batches=feed.batches(),
        heldout=heldout,
        describe=(
            f"dataset {spec.name} path {path}: {len(feed.visits)} shard visits, "
            f"{len(heldout):,} held-out tokens"
        ),
        report=lambda: {
            "data": {**feed.report(), "loss_floor_nats": floor},
        },
    )


def _builtin_data(params: GPTParams, steps: int, log: Callable[[str], None]) -> _Data:
    """The data of ``hyper.corpus``: its built-in spec, cached under the worker's settings."""
    try:
        spec = builtin_dataset(params)
        return _load_data(DataSource(spec, None, CacheSettings.from_env()), params, steps, log)
    except CorpusTooSmall as e:
        raise CorpusTooSmall(
            f"{e} (hyper.corpus {params.corpus!r} capped at corpus_bytes = "
            f"{params.corpus_bytes}: raise corpus_bytes)"
        ) from e


def train(
    params: GPTParams,
    mode: str,
    output_dir: Path,
    num_threads: int | None = None,
    log: Callable[[str], None] = print,
    data: DataSource | None = None,
) -> dict[str, Any]:
    """Train the ``gpt`` recipe in ``mode`` ("full" or "smoke"); write outputs; return metrics.

    The data is ``data``'s dataset or, without it, the built-in spec ``params.corpus`` names
    (``builtin_dataset``); either way its shards are materialized and cached on this worker
    (``CacheSettings.from_env()`` for the built-in one: in memory only when unset)."""
    if mode not in RECIPES["gpt"].modes:
        raise ValueError(f"unknown mode {mode!r}; expected one of {RECIPES['gpt'].modes}")
    started = time.perf_counter()
    steps = min(SMOKE_STEPS, params.steps) if mode == "smoke" else params.steps
    source = _load_data(data, params, steps, log) if data else _builtin_data(params, steps, log)

    with deterministic_torch(params.seed, num_threads):
        threads = torch.get_num_threads()
        model = GPT(params.n_layers, params.d_model, params.n_heads, params.seq_len)
        optimizer = make_optimizer(model, params)
        log(
            f"gpt {mode}: {model.num_params():,} params, {steps} steps, {source.describe}, "
            f"threads {threads}"
        )

        losses, train_s = run_steps(model, optimizer, source.batches, params, steps, log)

        heldout_loss = evaluate(model, source.heldout, params.batch_size, params.eval_batches)

    output_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, params, mode, output_dir)
    last = losses[-min(10, steps) :]
    metrics: dict[str, Any] = {
        "heldout_loss": heldout_loss,
        "heldout_bpb": heldout_loss / math.log(2),
        "train_loss": sum(last) / len(last),
        "tokens_per_s": steps * params.batch_size * params.seq_len / train_s,
        "steps": steps,
        "num_params": model.num_params(),
        "seed": params.seed,
        "num_threads": threads,
        "torch_version": torch.__version__,
        "elapsed_s": time.perf_counter() - started,
        **source.report(),
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log(
        f"held-out loss {heldout_loss:.4f} nats/byte ({metrics['heldout_bpb']:.4f} bpb) "
        f"over {params.eval_batches * params.batch_size} windows; train loss "
        f"{metrics['train_loss']:.4f}; {metrics['tokens_per_s']:.0f} tok/s"
    )
    return metrics

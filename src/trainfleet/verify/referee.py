"""A referee's evaluation: a candidate and the frontier on one seeded subset of held-out windows.

``python -m trainfleet.verify.referee --task TASK.json --candidate C.safetensors --frontier
F.safetensors --output DIR`` is what a worker runs for a ``kind = "referee"`` job. It writes
``DIR/metrics.json``: ``{"candidate_losses": [...], "frontier_losses": [...], "windows": n,
"seed": s, "eval_s": t}``, one mean cross entropy (nats per token) per window for each model,
on the SAME windows, in the same order, so that the coordinator can pair them (``gate``). The
referee reports losses, never a verdict: the coordinator computes intervals and decisions
from the arrays itself (``panel.report_from_losses``), so a referee cannot pass a model by
saying so, only by measuring it.

The subset: window starts drawn by the task's seed uniformly over EVERY start of the whole
held-out pool (the held-out shards of every path, ``inner.heldout_pool``; a window never spans
two shards), without replacement where there are enough; only the shards a draw lands in are
read. So a referee's subset mean is an unbiased estimate of the pool's mean window loss, the
quantity a claim states (``heldout_score``, and ``trainfleet market score``), and its bootstrap
interval covers it. (An earlier rule took the seed's first shards up to a token budget: shards
differ in loss far more than an interval is wide, and bench/verify measured 14-78% of honest
claims rejected with it.) Each referee of a panel gets its own seed, so the panel measures the
candidate on several independent subsets, none of which its producer could know in advance.
Losses are computed under ``trainer.deterministic_torch(seed)``.

Exit codes (as ``python -m trainfleet.train``): 0 done; 2 a malformed task; 3 refused: a model
file that is not safetensors or does not fit the competition's model family (names, shapes,
float32); 1 the held-out data cannot be materialized here. One line on stderr says why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainfleet import env
from trainfleet.data.prepare import CacheSettings, PreparedDataset, prepare_dataset
from trainfleet.data.shards import ShardInfo
from trainfleet.data.spec import DatasetSpec
from trainfleet.errors import CorpusTooSmall, DataError, RoutingMismatch
from trainfleet.train.feed import shard_tensor
from trainfleet.train.inner import WeightsMismatch, check_weights, heldout_pool
from trainfleet.train.model import VOCAB_SIZE
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import deterministic_torch, model_from_weights, windows
from trainfleet.verify.spec import RefereeTask

METRICS_FILE = "metrics.json"
EVAL_BATCH = 256
"""Windows per forward pass: big enough to be fast, small enough to bound memory."""

SCORE_WINDOWS = 2048
"""Windows of the pool a model's held-out score is measured on (``heldout_score``): a claim's
own sampling error is then about a sixth of a 64-window referee interval's half-width."""
SCORE_SEED = 0

EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
_PROG = "trainfleet.verify.referee"


class ModelRefused(ValueError):
    """A model file that is not safetensors or does not fit the competition's model family."""


def load_model(path: Path, params: GPTParams, what: str) -> dict[str, torch.Tensor]:
    """The weights in the safetensors file at ``path``; ``ModelRefused`` unless they are
    exactly the family's fp32 tensors."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelRefused(f"the {what} is not a readable safetensors file: {error}") from None
    try:
        check_weights(params, weights)
    except WeightsMismatch as error:
        raise ModelRefused(f"the {what} does not fit the model family: {error}") from None
    return weights


def subset_windows(
    pool_tokens: torch.Tensor, seq_len: int, windows: int, seed: int
) -> torch.Tensor:
    """``windows`` seeded window starts in ``pool_tokens`` (each window is ``seq_len + 1``
    tokens), distinct when the pool has that many, in increasing order."""
    num_starts = len(pool_tokens) - seq_len
    if num_starts < 1:
        raise CorpusTooSmall(
            f"{len(pool_tokens)} held-out tokens hold no window of seq_len + 1 = {seq_len + 1}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    starts = rng.choice(num_starts, size=windows, replace=windows > num_starts)
    return torch.from_numpy(np.sort(starts).astype(np.int64))


@torch.no_grad()
def window_losses(
    params: GPTParams, weights: dict[str, torch.Tensor], tokens: torch.Tensor, starts: torch.Tensor
) -> list[float]:
    """The model's mean cross entropy (nats per token) on each window at ``starts``."""
    model = model_from_weights(params, weights)
    model.eval()
    losses: list[float] = []
    for batch in starts.split(EVAL_BATCH):
        inputs, targets = windows(tokens, batch, params.seq_len)
        logits, _ = model(inputs)
        per_token = F.cross_entropy(
            logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1), reduction="none"
        )
        losses.extend(per_token.view(len(batch), -1).mean(dim=1).tolist())
    return losses


class PoolDraw:
    """Window starts drawn over a held-out pool, grouped by shard, in pool order."""

    def __init__(self, prepared: PreparedDataset, picks: list[tuple[ShardInfo, torch.Tensor]]):
        self.prepared = prepared
        self.picks = picks
        self.count = sum(len(starts) for _, starts in picks)

    def losses(self, params: GPTParams, weights: dict[str, torch.Tensor]) -> list[float]:
        """The model's loss on every drawn window, shard by shard (the same order for every
        model, so two models' lists pair window by window)."""
        out: list[float] = []
        for shard, starts in self.picks:
            out += window_losses(params, weights, shard_tensor(self.prepared, shard), starts)
        return out


def pool_windows(prepared: PreparedDataset, seq_len: int, windows: int, seed: int) -> PoolDraw:
    """``windows`` seeded window starts uniform over every start of the held-out pool (each
    shard contributes ``num_tokens - seq_len`` starts), distinct when the pool has that many."""
    pool = [s for s in heldout_pool(prepared.plan) if s.num_tokens > seq_len]
    sizes = np.array([s.num_tokens - seq_len for s in pool], dtype=np.int64)
    total = int(sizes.sum())
    if total < 1:
        raise CorpusTooSmall(
            f"dataset {prepared.spec.name!r} has no held-out shard longer than seq_len + 1 ="
            f" {seq_len + 1} tokens; raise heldout_fraction or add documents"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    flat = np.sort(rng.choice(total, size=windows, replace=windows > total))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(bounds, flat, side="right") - 1
    picks = []
    for i in np.unique(which):
        starts = flat[which == i] - bounds[i]
        picks.append((pool[int(i)], torch.from_numpy(starts.astype(np.int64))))
    return PoolDraw(prepared, picks)


def heldout_score(
    params: GPTParams,
    dataset: DatasetSpec,
    weights: dict[str, torch.Tensor],
    settings: CacheSettings,
    *,
    windows: int = SCORE_WINDOWS,
    seed: int = SCORE_SEED,
    handed_router: dict[str, Any] | None = None,
    num_threads: int | None = None,
    log: Callable[[str], None] = print,
) -> float:
    """A model's held-out loss as a competition defines it: the mean window loss over
    ``windows`` windows uniform over the whole held-out pool (what referees estimate). The
    coordinator scores a baseline with it; a submitter claims it (``trainfleet market score``)."""
    prepared = prepare_dataset(dataset, settings, handed_router=handed_router, log=log)
    draw = pool_windows(prepared, params.seq_len, windows, seed)
    with deterministic_torch(seed, num_threads):
        return float(np.mean(draw.losses(params, weights)))


def _json_numbers(losses: list[float]) -> list[float | None]:
    """``losses`` with each non-finite value (a diverged model) as None: JSON has no NaN."""
    return [loss if math.isfinite(loss) else None for loss in losses]


def referee_eval(
    task: RefereeTask,
    candidate: Path,
    frontier: Path,
    settings: CacheSettings,
    *,
    handed_router: dict[str, Any] | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``candidate`` and ``frontier`` on the task's subset; the per-window losses.
    Raises ``ModelRefused`` for a model that does not fit the family (before any data is
    prepared), ``DataError`` / ``CorpusTooSmall`` for held-out data that cannot be had."""
    params = task.params()
    candidate_weights = load_model(candidate, params, "candidate")
    frontier_weights = load_model(frontier, params, "frontier model")
    prepared = prepare_dataset(task.dataset, settings, handed_router=handed_router)
    draw = pool_windows(prepared, params.seq_len, task.windows, task.seed)
    with deterministic_torch(task.seed, num_threads):
        candidate_losses = draw.losses(params, candidate_weights)
        frontier_losses = draw.losses(params, frontier_weights)
    return {
        "candidate_losses": _json_numbers(candidate_losses),
        "frontier_losses": _json_numbers(frontier_losses),
        "windows": draw.count,
        "seed": task.seed,
    }


def _fail(message: str, code: int) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def _read_task(path: Path) -> RefereeTask:
    return RefereeTask.model_validate_json(path.read_bytes())


def _num_threads() -> int | None:
    text = os.environ.get(env.NUM_THREADS, "")
    return int(text) if text.isdigit() and int(text) > 0 else None


def _handed_router() -> dict[str, Any] | None:
    router_file = os.environ.get(env.ROUTER_FILE)
    return json.loads(Path(router_file).read_text()) if router_file else None


def _mean(losses: list[float | None]) -> float:
    return math.nan if None in losses else float(np.mean(np.asarray(losses, dtype=np.float64)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_PROG}", description=__doc__)
    parser.add_argument("--task", required=True, type=Path, help="the RefereeTask as JSON")
    parser.add_argument("--candidate", required=True, type=Path, help="candidate .safetensors")
    parser.add_argument("--frontier", required=True, type=Path, help="frontier .safetensors")
    parser.add_argument("--output", required=True, type=Path, help="directory for metrics.json")
    args = parser.parse_args(argv)

    try:
        task = _read_task(args.task)
    except OSError as error:
        return _fail(f"cannot read the task {args.task}: {error.strerror}", EXIT_USAGE)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "task"
        return _fail(
            f"malformed task {args.task}: {where}: {first['msg']} "
            f"({error.error_count()} problem(s))",
            EXIT_USAGE,
        )
    started = time.perf_counter()
    try:
        metrics = referee_eval(
            task,
            args.candidate,
            args.frontier,
            CacheSettings.from_env(),
            handed_router=_handed_router(),
            num_threads=_num_threads(),
        )
    except ModelRefused as error:
        return _fail(f"refused: {error}", EXIT_REFUSED)
    except RoutingMismatch as error:
        return _fail(f"refused: {error}", EXIT_REFUSED)
    except CorpusTooSmall as error:
        return _fail(str(error), EXIT_USAGE)
    except DataError as error:
        return _fail(str(error), EXIT_DATA)
    metrics["eval_s"] = time.perf_counter() - started
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / METRICS_FILE).write_text(json.dumps(metrics) + "\n")
    candidate_mean = _mean(metrics["candidate_losses"])
    frontier_mean = _mean(metrics["frontier_losses"])
    print(
        f"referee {task.index} of {task.submission_id}: {metrics['windows']} windows, candidate "
        f"{candidate_mean:.4f}, frontier {frontier_mean:.4f} nats/token, "
        f"{metrics['eval_s']:.2f}s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

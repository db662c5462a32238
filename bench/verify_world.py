"""The cheat benchmark's world: the competition's data, the model family, training and the
referees' measurements, shared by the detection trials and the payment simulation.

Data: this Python's standard-library sources, split by file into two disjoint corpora (even
and odd positions of the sorted file list). The competition's dataset spec holds the even
files: contributors train on its training shards and referees evaluate on its held-out pool
(``inner.heldout_pool``, as ``verify.referee.referee_eval`` reads it). The odd files are the
secret set no referee and no contributor ever saw: a model's true value is measured there,
on many windows. Model family: a 1-layer byte GPT (width 32, context 32), the gpt recipe's
own model, trained with the recipe's own step (``trainer.train_step``, AdamW, warmup then
cosine, clip 1) on the recipe's ``ShardFeed``.

Measurement uses the referee's own code (``verify.referee.pool_windows`` and
``window_losses``). The referees' universe is one ``pool_windows`` draw (``universe`` windows
uniform over every start of the whole held-out pool, distinct), and every model's losses on it
are computed once; a referee's subset in a trial is a seeded uniform draw of ``windows``
distinct universe windows (``World.subset``, rule ``referee``). A uniform draw from a uniform
draw of the pool is a uniform draw of the pool, so each subset, taken over the universe's
own draw, has exactly the distribution ``referee_eval``'s has; thousands of trials then cost
bootstrap work, not model evaluations.
Two costs of the finite universe: subsets of one model vary a little less than the pool's
(variance factor 1 - windows / universe, 0.97 for 256 of the full run's 8192), and they centre
on the universe's mean, which misses the pool's by about sd / sqrt(universe) (a tenth of a
256-window interval's half-width).

A model's claim is exactly ``verify.referee.heldout_score``: its mean loss over the 2048
windows ``pool_windows`` draws with seed 0 (what an honest submitter claims with
``trainfleet market score``, and what the coordinator scores a baseline with). So an honest
claim carries its own sampling error, as a real one does (about a sixth of a 64-window
interval's half-width, a third of a 256-window one's). A model's pool loss
(``Model.pool_loss``, the market's value on the competition's own data) is its mean over
another draw (``truth_windows``, seed ``TRUTH_SEED``), which shares next to no window with the
universe.

``shard-budget`` is the subset rule before the fix, kept as a historical arm: the held-out
shards (every one that holds a universe window: all of them in the full run) in the order
the referee's seed shuffles them, taken until ``feed.heldout_tokens``' budget (8 x windows x
(seq_len + 1) tokens) is met, then windows uniform over those shards' universe windows (a
uniform draw over those shards' starts).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from trainfleet.data.corpus import stdlib_files
from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.shards import ShardInfo
from trainfleet.data.spec import StdlibDataset
from trainfleet.train.feed import HELDOUT_WINDOWS_PER_EVAL_WINDOW, ShardFeed, shard_tensor
from trainfleet.train.inner import init_weights
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import (
    deterministic_torch,
    lr_at,
    make_optimizer,
    model_from_weights,
    train_step,
)
from trainfleet.verify.referee import (
    SCORE_SEED,
    SCORE_WINDOWS,
    PoolDraw,
    pool_windows,
    subset_windows,
    window_losses,
)
from trainfleet.verify.spec import MAX_WINDOWS

Weights = dict[str, torch.Tensor]

PARAMS = GPTParams(
    n_layers=1,
    d_model=32,
    n_heads=2,
    seq_len=32,
    batch_size=16,
    lr=3e-3,
    warmup_steps=10,
    steps=100,
    eval_batches=8,
    seed=0,
)
SHARD_TOKENS = 65_536
UNIVERSE_SEED = 10_000
TRUTH_SEED = 20_000
RULES = ("referee", "shard-budget")


def stdlib_split(num_files: int) -> tuple[list[str], list[str]]:
    """The first ``num_files`` stdlib files (sorted), split into even and odd positions."""
    files = stdlib_files(Path(sysconfig.get_paths()["stdlib"]))[:num_files]
    return files[0::2], files[1::2]


def stdlib_spec(name: str, files: list[str]) -> StdlibDataset:
    return StdlibDataset(name=name, source="stdlib", files=files, shard_tokens=SHARD_TOKENS)


@dataclass
class Model:
    """A submitted model: its weights, and its per-window losses once measured."""

    name: str
    weights: Weights
    train_cpu_s: float = 0.0  # CPU seconds its producer spent training it (from its start)
    steps: int = 0
    losses: np.ndarray | None = None  # on the referees' universe
    claim_loss: float = math.nan  # its heldout_score: what an honest submitter claims
    pool_loss: float = math.nan  # on a large pool draw no referee's universe holds
    secret_loss: float = math.nan  # mean over the secret set's windows


def file_bytes(weights: Weights, note: str = "") -> bytes:
    """The safetensors file a submitter uploads; ``note`` changes the bytes, not the values."""
    return save(weights, metadata={"recipe": "gpt", **({"note": note} if note else {})})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class World:
    """Data, family and measurement for one benchmark run."""

    def __init__(
        self,
        num_files: int,
        universe: int,
        secret_windows: int,
        cache_dir: Path,
        truth_windows: int = 0,
    ):
        even, odd = stdlib_split(num_files)
        self.params = PARAMS
        self.settings = CacheSettings(cache_dir)
        self.dataset = stdlib_spec("verify-bench", even)
        self.secret_dataset = stdlib_spec("verify-bench-secret", odd)
        self.prepared = prepare_dataset(self.dataset, self.settings, log=lambda _: None)
        self.train_shards = self.prepared.plan.select("train")
        seq = self.params.seq_len
        # The referees' universe: one draw by the referee's own rule.
        draw = pool_windows(self.prepared, seq, universe, UNIVERSE_SEED)
        self.universe = draw
        self.shards = [shard for shard, _ in draw.picks]
        self.shard_tokens = [shard_tensor(self.prepared, s) for s in self.shards]
        # Per universe window (in PoolDraw.losses' order): its shard (index into self.shards)
        # and its start in that shard.
        self.window_shard = np.concatenate(
            [np.full(len(starts), i) for i, (_, starts) in enumerate(draw.picks)]
        )
        self.window_start = np.concatenate([starts.numpy() for _, starts in draw.picks])
        # Every held-out shard of the pool (the shard-budget rule shuffles them all).
        self.pool_starts = np.array([len(t) - seq for t in self.shard_tokens], dtype=np.int64)
        self.score_draw = pool_windows(self.prepared, seq, SCORE_WINDOWS, SCORE_SEED)
        self.truth_draw = (
            pool_windows(self.prepared, seq, truth_windows, TRUTH_SEED) if truth_windows else None
        )
        secret = prepare_dataset(self.secret_dataset, self.settings, log=lambda _: None)
        # Every secret document, held-out split or not: no contributor or referee saw any.
        self.secret = torch.cat([shard_tensor(secret, s) for s in secret.plan.shards])
        self.secret_starts = _draw(self.secret, seq, secret_windows, seed=3)

    # Measurement ---------------------------------------------------------------------------

    def losses(self, weights: Weights, tokens: torch.Tensor, starts: torch.Tensor) -> np.ndarray:
        return np.asarray(window_losses(self.params, weights, tokens, starts), dtype=np.float64)

    def draw_losses(self, draw: PoolDraw, weights: Weights) -> np.ndarray:
        return np.asarray(draw.losses(self.params, weights), dtype=np.float64)

    def universe_losses(self, weights: Weights) -> np.ndarray:
        """The model's losses on every universe window (``Model.losses``)."""
        return self.draw_losses(self.universe, weights)

    def heldout_score(self, weights: Weights) -> float:
        """``verify.referee.heldout_score``, on this world's prepared data: the mean loss over
        ``SCORE_WINDOWS`` pool windows of seed ``SCORE_SEED``, under the same torch state."""
        with deterministic_torch(SCORE_SEED, 1):
            return float(self.draw_losses(self.score_draw, weights).mean())

    def secret_mean(self, weights: Weights) -> float:
        return float(self.losses(weights, self.secret, self.secret_starts).mean())

    def measure(self, model: Model, *, universe: bool = True, claim: bool = True) -> Model:
        """Fill in the model's universe losses, honest claim (``universe`` / ``claim``: when
        asked), pool and secret losses."""
        if universe:
            model.losses = self.universe_losses(model.weights)
        if claim:
            model.claim_loss = self.heldout_score(model.weights)
        if self.truth_draw is not None:
            model.pool_loss = float(self.draw_losses(self.truth_draw, model.weights).mean())
        model.secret_loss = self.secret_mean(model.weights)
        return model

    def subset(self, rule: str, windows: int, seed: int) -> np.ndarray:
        """A referee's subset as indices into the universe (``Model.losses``), sorted.

        ``referee``: ``windows`` distinct windows uniform over the universe, so uniform over
        the whole held-out pool, as ``verify.referee.pool_windows`` draws them.
        ``shard-budget`` (the rule before the fix): the shards in the order the seed
        shuffles them, until ``feed.heldout_tokens``' budget for ``windows`` windows is met,
        then ``windows`` windows uniform over those shards' universe windows."""
        rng = np.random.Generator(np.random.PCG64(seed))
        if rule == "referee":
            candidates = np.arange(len(self.window_start))
        elif rule == "shard-budget":
            order = np.random.Generator(np.random.PCG64([seed, 1])).permutation(len(self.shards))
            budget = HELDOUT_WINDOWS_PER_EVAL_WINDOW * windows * (self.params.seq_len + 1)
            chosen, total = [], 0
            for i in order:
                if total >= budget:
                    break
                chosen.append(int(i))
                total += int(self.pool_starts[i]) + self.params.seq_len
            candidates = np.flatnonzero(np.isin(self.window_shard, chosen))
        else:
            raise ValueError(f"unknown subset rule {rule!r}: expected one of {', '.join(RULES)}")
        size = len(candidates)
        return np.sort(candidates[rng.choice(size, size=windows, replace=windows > size)])

    def subset_losses(self, weights: Weights, indices: np.ndarray) -> np.ndarray:
        """A model's losses on a subset, evaluated now (``window_losses`` on each shard)."""
        out = np.empty(len(indices), dtype=np.float64)
        shard_of = self.window_shard[indices]
        for i in np.unique(shard_of):
            where = shard_of == i
            starts = torch.from_numpy(self.window_start[indices[where]])
            out[where] = self.losses(weights, self.shard_tokens[int(i)], starts)
        return out

    # Training ------------------------------------------------------------------------------

    def init(self) -> Weights:
        return init_weights(self.params)

    def train(
        self,
        weights: Weights,
        steps: int,
        *,
        lr: float,
        seed: int,
        shards: Sequence[ShardInfo] | None = None,
    ) -> tuple[Weights, float]:
        """``steps`` optimizer steps from ``weights`` (a fresh AdamW, the recipe's schedule
        over ``steps``) on the competition's training shards (or ``shards``) in ``seed``'s
        order; the new weights and the CPU seconds they took."""
        params = self.params.model_copy(update={"lr": lr, "seed": seed, "steps": steps})
        feed = ShardFeed(
            self.prepared,
            list(shards or self.train_shards),
            [],
            batch_size=params.batch_size,
            seq_len=params.seq_len,
            seed=seed,
            steps=steps,
            log=lambda _: None,
        )
        batches = feed.batches()
        with deterministic_torch(seed, 1):
            model = model_from_weights(params, weights)
            optimizer = make_optimizer(model, params)
            started = time.process_time()
            for step in range(steps):
                rate = lr_at(step, lr, params.warmup_steps, steps)
                train_step(model, optimizer, *next(batches), rate)
            cpu_s = time.process_time() - started
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, cpu_s


def _draw(tokens: torch.Tensor, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` window starts by ``subset_windows``, in draws of at most ``MAX_WINDOWS``."""
    parts = [
        subset_windows(tokens, seq_len, min(MAX_WINDOWS, count - done), seed * 1000 + i)
        for i, done in enumerate(range(0, count, MAX_WINDOWS))
    ]
    return torch.cat(parts)


def noisy(weights: Weights, relative: float, seed: int) -> Weights:
    """``weights`` plus gaussian noise of ``relative`` times each tensor's own std."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in weights.items():
        scale = float(tensor.std()) if tensor.numel() > 1 else float(tensor.abs().mean())
        noise = torch.randn(tensor.shape, generator=generator) * relative * scale
        out[name] = tensor + noise
    return out


def with_nan(weights: Weights) -> Weights:
    out = {k: v.clone() for k, v in weights.items()}
    first = next(iter(out))
    out[first].view(-1)[0] = float("nan")
    return out


def average(deltas: Sequence[Weights]) -> Weights:
    return {k: torch.stack([d[k] for d in deltas]).mean(0) for k in deltas[0]}


def minus(a: Weights, b: Weights) -> Weights:
    return {k: a[k] - b[k] for k in a}

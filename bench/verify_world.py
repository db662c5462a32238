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

Measurement uses the referee's own code (``verify.referee.subset_windows`` and
``window_losses``). Each held-out shard gets a fixed universe of windows that
``subset_windows`` drew from it, and every model's per-window losses on the universes are
computed once; a referee's subset in a trial is a seeded draw from the universes of the
shards its rule picks (``World.subset``), so thousands of trials cost bootstrap work, not
model evaluations. In this emulation the universes ARE the pool: a model's pool loss (what an
honest submitter claims) is the shard-weighted mean of its universe losses, exactly what a
referee's uniform subset estimates. A subset drawn from a finite universe varies a little less
than one drawn from the whole shard (variance factor 1 - windows / universe size: 0.96 for 256
windows over the full run's 6 x 1024-window pool, 0.75 when the ``referee`` rule picks a
single shard): there, the honest false-accusation rate is slightly optimistic and the
near-boundary detection slightly pessimistic.
"""

from __future__ import annotations

import hashlib
import itertools
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
from trainfleet.train.inner import heldout_pool, init_weights
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import (
    deterministic_torch,
    lr_at,
    make_optimizer,
    model_from_weights,
    train_step,
)
from trainfleet.verify.referee import subset_windows, window_losses
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
    losses: np.ndarray | None = None  # on the referees' universe (every shard's, joined)
    claim_loss: float = math.nan  # its exact pool loss: what an honest submitter claims
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
        universe_per_shard: int,
        secret_windows: int,
        cache_dir: Path,
    ):
        even, odd = stdlib_split(num_files)
        self.params = PARAMS
        self.settings = CacheSettings(cache_dir)
        self.dataset = stdlib_spec("verify-bench", even)
        self.secret_dataset = stdlib_spec("verify-bench-secret", odd)
        self.prepared = prepare_dataset(self.dataset, self.settings, log=lambda _: None)
        self.train_shards = self.prepared.plan.select("train")
        seq = self.params.seq_len
        # The referees' pool, shard by shard, in inner.heldout_pool's order (referee_eval's).
        self.shards = heldout_pool(self.prepared.plan)
        self.shard_tokens = [shard_tensor(self.prepared, s) for s in self.shards]
        self.num_starts = np.array([len(t) - seq for t in self.shard_tokens], dtype=np.int64)
        self.universe = [
            subset_windows(t, seq, min(universe_per_shard, int(n)), seed=10_000 + i)
            for i, (t, n) in enumerate(zip(self.shard_tokens, self.num_starts, strict=True))
        ]
        self.offsets = np.cumsum([0] + [len(u) for u in self.universe])
        self.shard_weights = self.num_starts / self.num_starts.sum()
        secret = prepare_dataset(self.secret_dataset, self.settings, log=lambda _: None)
        # Every secret document, held-out split or not: no contributor or referee saw any.
        self.secret = torch.cat([shard_tensor(secret, s) for s in secret.plan.shards])
        self.secret_starts = _draw(self.secret, seq, secret_windows, seed=3)

    # Measurement ---------------------------------------------------------------------------

    def losses(self, weights: Weights, tokens: torch.Tensor, starts: torch.Tensor) -> np.ndarray:
        return np.asarray(window_losses(self.params, weights, tokens, starts), dtype=np.float64)

    def universe_losses(self, weights: Weights) -> np.ndarray:
        """The model's losses on every shard's universe, joined (``Model.losses``)."""
        return np.concatenate(
            [
                self.losses(weights, t, u)
                for t, u in zip(self.shard_tokens, self.universe, strict=True)
            ]
        )

    def pool_mean(self, losses: np.ndarray) -> float:
        """The pool's mean loss from universe losses: each shard's universe mean weighted by
        the shard's number of windows. In this emulation the universe IS the pool, so this is
        a model's exact pool loss: what an honest submitter claims, and exactly what a
        referee's uniform subset estimates."""
        means = [losses[a:b].mean() for a, b in itertools.pairwise(self.offsets)]
        return float(np.dot(self.shard_weights, means))

    def secret_mean(self, weights: Weights) -> float:
        return float(self.losses(weights, self.secret, self.secret_starts).mean())

    def measure(self, model: Model) -> Model:
        """Fill in the model's universe losses, honest claim and secret loss."""
        model.losses = self.universe_losses(model.weights)
        model.claim_loss = self.pool_mean(model.losses)
        model.secret_loss = self.secret_mean(model.weights)
        return model

    def subset(self, rule: str, windows: int, seed: int) -> np.ndarray:
        """A referee's subset as indices into the universe (``Model.losses``).

        ``referee``: as ``verify.referee.referee_eval`` does: the held-out shards in the
        order its seed shuffles them, taken until ``feed.heldout_tokens``' budget of tokens
        for ``windows`` windows is met, then windows uniform over those shards' starts.
        ``pool``: windows uniform over the whole held-out pool."""
        chosen = list(range(len(self.shards)))
        if rule == "referee":
            order = np.random.Generator(np.random.PCG64([seed, 1])).permutation(len(chosen))
            budget = HELDOUT_WINDOWS_PER_EVAL_WINDOW * windows * (self.params.seq_len + 1)
            chosen, total = [], 0
            for i in order:
                if total >= budget:
                    break
                chosen.append(int(i))
                total += int(self.num_starts[i]) + self.params.seq_len
        elif rule != "pool":
            raise ValueError(f"unknown subset rule {rule!r}: expected 'referee' or 'pool'")
        rng = np.random.Generator(np.random.PCG64(seed))
        weights = self.num_starts[chosen] / self.num_starts[chosen].sum()
        counts = rng.multinomial(windows, weights)
        parts = []
        for i, count in zip(chosen, counts, strict=True):
            size = len(self.universe[i])
            parts.append(self.offsets[i] + rng.choice(size, size=count, replace=count > size))
        return np.sort(np.concatenate(parts))

    def subset_losses(self, weights: Weights, indices: np.ndarray) -> np.ndarray:
        """A model's losses on a subset, evaluated now (``window_losses`` on each shard)."""
        out = np.empty(len(indices), dtype=np.float64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for i in np.unique(shard_of):
            where = shard_of == i
            starts = self.universe[i][indices[where] - self.offsets[i]]
            out[where] = self.losses(weights, self.shard_tokens[i], starts)
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

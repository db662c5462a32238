"""Live-market test helpers: a tiny competition (TOML and spec), and the real models its
tests submit (``marketkit`` has the queue-level helpers).

- the baseline: the family's init (``inner.init_weights``);
- an honest, better model: the baseline trained a few AdamW steps on the training shards;
- its honest claim: its mean loss over many held-out windows (what a submitter measures);
- a model that does not fit the family: another width.

Everything is tiny (1 layer, d_model 16, seq_len 16, a 200-document synthetic corpus), so
training and every referee's evaluation take well under a second.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.spec import SyntheticDataset
from trainfleet.train.feed import shard_tensor
from trainfleet.train.inner import heldout_pool, init_weights
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import (
    deterministic_torch,
    make_optimizer,
    model_from_weights,
    train_step,
    windows,
)
from trainfleet.verify.market import CompetitionSpec
from trainfleet.verify.referee import subset_windows, window_losses

HYPER: dict[str, Any] = {
    "n_layers": 1,
    "d_model": 16,
    "n_heads": 2,
    "seq_len": 16,
    "batch_size": 8,
    "lr": 1e-2,
    "warmup_steps": 0,
    "eval_batches": 4,
}
PARAMS = GPTParams(**HYPER)
DATASET: dict[str, Any] = {
    "name": "held",
    "source": "synthetic",
    "num_dialects": 2,
    "num_documents": 200,
    "doc_tokens": 256,
    "shard_tokens": 2048,
    "heldout_fraction": 0.25,
}
SETTINGS = CacheSettings(None)
Weights = dict[str, torch.Tensor]


def competition(name: str = "tiny-lm", **terms: Any) -> dict[str, Any]:
    """A competition's spec as JSON: 3 referees needing 2, 32 windows each, 99% intervals
    (an honest claim lies inside one referee's about 99 times in 100, so inside 2 of 3 all
    but about 3 times in 10,000; a claim 0.5 nats off lies outside every one)."""
    spec: dict[str, Any] = {
        "name": name,
        "rate": 100.0,
        "margin": 0.0,
        "referees": 3,
        "quorum": 2,
        "windows": 32,
        "confidence": 0.99,
        "hyper": HYPER,
        "dataset": DATASET,
        **terms,
    }
    return CompetitionSpec.model_validate(spec).model_dump(mode="json")


def competition_toml(name: str = "tiny-lm", **terms: Any) -> str:
    """The same competition as the TOML file ``trainfleet market create`` reads."""
    spec = competition(name, **terms)
    top = {k: v for k, v in spec.items() if not isinstance(v, dict)}
    lines = ["[competition]", *(f"{k} = {_toml(v)}" for k, v in top.items() if v is not None)]
    for table in ("hyper", "dataset"):
        lines.append(f"\n[competition.{table}]")
        lines += [f"{k} = {_toml(v)}" for k, v in spec[table].items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def baseline() -> Weights:
    return init_weights(PARAMS)


@functools.cache
def _tokens(split: str) -> torch.Tensor:
    prepared = prepare_dataset(SyntheticDataset.model_validate(DATASET), SETTINGS)
    shards = prepared.plan.select("train") if split == "train" else heldout_pool(prepared.plan)
    return torch.cat([shard_tensor(prepared, s) for s in shards])


def trained(steps: int, start: Weights | None = None, seed: int = 0) -> Weights:
    """``start`` (default: the baseline) trained ``steps`` AdamW steps: a real improvement."""
    data = _tokens("train")
    with deterministic_torch(seed):
        model = model_from_weights(PARAMS, start if start is not None else baseline())
        optimizer = make_optimizer(model, PARAMS)
        for _ in range(steps):
            starts = torch.randint(0, len(data) - PARAMS.seq_len - 1, (PARAMS.batch_size,))
            train_step(model, optimizer, *windows(data, starts, PARAMS.seq_len), PARAMS.lr)
    return {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}


def heldout_mean(weights: Weights, num_windows: int = 2048, seed: int = 12345) -> float:
    """The model's mean loss over many held-out windows: an honest submitter's claim."""
    tokens = _tokens("heldout")
    starts = subset_windows(tokens, PARAMS.seq_len, num_windows, seed)
    losses = window_losses(PARAMS, weights, tokens, starts)
    return float(sum(losses) / len(losses))


def misfit() -> Weights:
    """A model of another family (d_model 32): refused before any referee runs."""
    return init_weights(GPTParams(**{**HYPER, "d_model": 32}))


def save(weights: Weights, path: Path) -> Path:
    save_file({k: weights[k].contiguous() for k in sorted(weights)}, str(path))
    return path


__all__ = [
    "DATASET",
    "HYPER",
    "PARAMS",
    "baseline",
    "competition",
    "competition_toml",
    "heldout_mean",
    "misfit",
    "save",
    "trained",
]

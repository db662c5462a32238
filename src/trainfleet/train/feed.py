"""Training batches from a prepared dataset's shards, in an order fixed in advance.

The schedule: epoch ``e`` visits every training shard of the job's path once, in the order of
``sha256(f"{seed}:{e}:{shard key}")``; a visit takes ``max(1, round(num_tokens / (batch_size *
seq_len)))`` steps of random windows inside that shard (a window never crosses a shard).
Epochs repeat until the job's steps are done. Because the whole sequence of shard visits is
known before the first step, the shard cache is given it and evicts the shard whose next use
is furthest away. Shards shorter than one window are skipped (and said so).

Held-out loss is measured on the path's held-out shards, in index order, up to
``HELDOUT_WINDOWS_PER_EVAL_WINDOW`` times the evaluation windows' worth of tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainfleet.data.prepare import PreparedDataset
from trainfleet.data.shards import ShardInfo, shard_summary, shard_tokens
from trainfleet.errors import CorpusTooSmall

HELDOUT_WINDOWS_PER_EVAL_WINDOW = 8


@dataclass(frozen=True)
class Visit:
    shard: ShardInfo
    num_steps: int


def schedule_visits(
    shards: list[ShardInfo], steps: int, tokens_per_step: int, seed: int
) -> list[Visit]:
    """The shard visits that cover ``steps`` optimizer steps (see the module doc)."""
    visits: list[Visit] = []
    covered = epoch = 0
    while covered < steps:
        order = sorted(
            shards, key=lambda s: hashlib.sha256(f"{seed}:{epoch}:{s.key}".encode()).digest()
        )
        for shard in order:
            if covered >= steps:
                break
            num_steps = min(steps - covered, max(1, round(shard.num_tokens / tokens_per_step)))
            visits.append(Visit(shard, num_steps))
            covered += num_steps
        epoch += 1
    return visits


class ShardFeed:
    """Batches of (inputs, targets) windows from a path's shards, and its held-out data."""

    def __init__(
        self,
        prepared: PreparedDataset,
        path: int,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        steps: int,
        log: Callable[[str], None],
    ):
        self.prepared = prepared
        self.path = path
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        plan = prepared.plan
        train = plan.select("train", path)
        usable = [s for s in train if s.num_tokens > seq_len]
        if len(usable) < len(train):
            log(f"skipping {len(train) - len(usable)} training shard(s) shorter than one window")
        if not usable:
            raise CorpusTooSmall(
                f"dataset {prepared.spec.name!r} path {path} has no training shard longer than "
                f"seq_len = {seq_len} tokens; add documents or raise shard_tokens"
            )
        self.visits = schedule_visits(usable, steps, batch_size * seq_len, seed)
        prepared.cache.set_schedule([prepared.cache_key(v.shard) for v in self.visits])
        self.heldout_shards: list[ShardInfo] = []

    def _tensor(self, shard: ShardInfo) -> torch.Tensor:
        """The shard as a tensor of its own width (one byte per byte token, not eight): only
        the windows drawn from it are widened to int64."""
        tokens = shard_tokens(self.prepared.spec, self.prepared.read(shard))
        if tokens.dtype == np.uint8:
            return torch.frombuffer(bytearray(tokens.tobytes()), dtype=torch.uint8)
        return torch.from_numpy(tokens.astype(np.int32))

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        offsets = torch.arange(self.seq_len + 1)
        for visit in self.visits:
            data = self._tensor(visit.shard)
            high = len(data) - self.seq_len  # a window needs seq_len + 1 tokens
            for _ in range(visit.num_steps):
                starts = torch.randint(0, high, (self.batch_size,), generator=generator)
                chunk = data[starts[:, None] + offsets].long()
                yield chunk[:, :-1], chunk[:, 1:]

    def heldout(self, num_windows: int) -> torch.Tensor:
        """The path's held-out tokens, enough for ``num_windows`` well-spread windows."""
        budget = HELDOUT_WINDOWS_PER_EVAL_WINDOW * num_windows * (self.seq_len + 1)
        parts: list[torch.Tensor] = []
        total = 0
        for shard in self.prepared.plan.select("heldout", self.path):
            if total >= budget:
                break
            parts.append(self._tensor(shard))
            self.heldout_shards.append(shard)
            total += shard.num_tokens
        if total < self.seq_len + 1:
            raise CorpusTooSmall(
                f"dataset {self.prepared.spec.name!r} path {self.path} has {total} held-out "
                f"tokens, fewer than seq_len + 1 = {self.seq_len + 1}; raise heldout_fraction "
                "or add documents"
            )
        return torch.cat(parts)

    def report(self) -> dict[str, Any]:
        """What the result records about the data: spec digest, routing and shard hashes."""
        used: dict[str, ShardInfo] = {v.shard.key: v.shard for v in self.visits}
        used.update({s.key: s for s in self.heldout_shards})
        num_train = len(self.prepared.plan.select("train", self.path))
        return {
            **self.prepared.describe(),
            "path": self.path,
            "num_train_shards": num_train,
            "num_visits": len(self.visits),
            "shards": shard_summary(list(used.values())),
            "cache": self.prepared.cache.stats.as_dict(),
        }

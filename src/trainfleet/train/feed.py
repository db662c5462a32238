"""Training batches from a prepared dataset's shards, in an order fixed in advance.

The schedule: epoch ``e`` visits every training shard of the job's path once, in the order of
``sha256(f"{seed}:{e}:{shard key}")``; a visit takes ``max(1, round(num_tokens / (batch_size *
seq_len)))`` steps of random windows inside that shard (a window never crosses a shard).
Epochs repeat until the job's steps are done. Because the whole sequence of shard visits is
known before the first step, the shard cache is given it and evicts the shard whose next use
is furthest away. Shards shorter than one window are skipped (and said so).

Held-out loss is measured on the path's held-out shards, in index order, up to
``HELDOUT_WINDOWS_PER_EVAL_WINDOW`` times the evaluation windows' worth of tokens.

The batch at step ``i`` is a pure function of (shards, seed, ``i``): the schedule is
prefix-stable (a longer run repeats a shorter one's visits) and the window generator draws the
same numbers per step whatever happened before. So a feed may start at ``start_step``: it
fast-forwards the generator through the earlier steps (the same draws, no shard read) and then
yields exactly what one feed from step 0 would have yielded from there on. A DiLoCo replica
(``inner``) starts each round at its global step this way, and one replica training rounds
0..R-1 sees exactly the batches plain training sees in one go.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
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


def heldout_tokens(
    prepared: PreparedDataset,
    shards: Sequence[ShardInfo],
    num_windows: int,
    seq_len: int,
    where: str,
) -> tuple[torch.Tensor, list[ShardInfo]]:
    """Held-out tokens from ``shards`` (in the given order), enough for ``num_windows``
    well-spread windows, and the shards used."""
    budget = HELDOUT_WINDOWS_PER_EVAL_WINDOW * num_windows * (seq_len + 1)
    parts: list[torch.Tensor] = []
    used: list[ShardInfo] = []
    total = 0
    for shard in shards:
        if total >= budget:
            break
        parts.append(shard_tensor(prepared, shard))
        used.append(shard)
        total += shard.num_tokens
    if total < seq_len + 1:
        raise CorpusTooSmall(
            f"dataset {prepared.spec.name!r} {where} has {total} held-out "
            f"tokens, fewer than seq_len + 1 = {seq_len + 1}; raise heldout_fraction "
            "or add documents"
        )
    return torch.cat(parts), used


def shard_tensor(prepared: PreparedDataset, shard: ShardInfo) -> torch.Tensor:
    """The shard as a tensor of its own width (one byte per byte token, not eight): only
    the windows drawn from it are widened to int64."""
    tokens = shard_tokens(prepared.spec, prepared.read(shard))
    if tokens.dtype == np.uint8:
        return torch.frombuffer(bytearray(tokens.tobytes()), dtype=torch.uint8)
    return torch.from_numpy(tokens.astype(np.int32))


class ShardFeed:
    """Batches of (inputs, targets) windows from a set of training shards (a path's, or a
    DiLoCo replica's share), from ``start_step`` to ``steps``, and their held-out data."""

    def __init__(
        self,
        prepared: PreparedDataset,
        train: Sequence[ShardInfo],
        heldout: Sequence[ShardInfo],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        steps: int,
        log: Callable[[str], None],
        start_step: int = 0,
        where: str = "",
        describe: dict[str, Any] | None = None,
    ):
        self.prepared = prepared
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.start_step = start_step
        self.where = where
        self.heldout_pool = list(heldout)
        self._describe = describe or {}
        usable = [s for s in train if s.num_tokens > seq_len]
        if len(usable) < len(train):
            log(f"skipping {len(train) - len(usable)} training shard(s) shorter than one window")
        if not usable:
            raise CorpusTooSmall(
                f"dataset {prepared.spec.name!r} {where} has no training shard longer than "
                f"seq_len = {seq_len} tokens; add documents or raise shard_tokens"
            )
        self.num_train_shards = len(train)
        self.visits = schedule_visits(usable, steps, batch_size * seq_len, seed)
        prepared.cache.set_schedule([prepared.cache_key(v.shard) for v in self._ahead()])
        self.heldout_shards: list[ShardInfo] = []

    @classmethod
    def for_path(
        cls,
        prepared: PreparedDataset,
        path: int,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        steps: int,
        log: Callable[[str], None],
    ) -> ShardFeed:
        """The feed of one path of the dataset (all of it when it is not routed)."""
        plan = prepared.plan
        return cls(
            prepared,
            plan.select("train", path),
            plan.select("heldout", path),
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
            steps=steps,
            log=log,
            where=f"path {path}",
            describe={"path": path},
        )

    def _ahead(self) -> list[Visit]:
        """The visits that hold steps at or after ``start_step``."""
        ahead, first = [], 0
        for visit in self.visits:
            if first + visit.num_steps > self.start_step:
                ahead.append(visit)
            first += visit.num_steps
        return ahead

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        offsets = torch.arange(self.seq_len + 1)
        step = 0
        for visit in self.visits:
            high = visit.shard.num_tokens - self.seq_len  # a window needs seq_len + 1 tokens
            skip = min(visit.num_steps, max(0, self.start_step - step))
            for _ in range(skip):  # the same draws as the steps before start_step, unused
                torch.randint(0, high, (self.batch_size,), generator=generator)
            step += skip
            if skip == visit.num_steps:
                continue
            data = shard_tensor(self.prepared, visit.shard)
            assert len(data) - self.seq_len == high
            for _ in range(visit.num_steps - skip):
                starts = torch.randint(0, high, (self.batch_size,), generator=generator)
                chunk = data[starts[:, None] + offsets].long()
                step += 1
                yield chunk[:, :-1], chunk[:, 1:]

    def heldout(self, num_windows: int) -> torch.Tensor:
        """The held-out tokens, enough for ``num_windows`` well-spread windows."""
        tokens, self.heldout_shards = heldout_tokens(
            self.prepared, self.heldout_pool, num_windows, self.seq_len, self.where
        )
        return tokens

    def report(self) -> dict[str, Any]:
        """What the result records about the data: spec digest, routing and shard hashes."""
        used: dict[str, ShardInfo] = {v.shard.key: v.shard for v in self._ahead()}
        used.update({s.key: s for s in self.heldout_shards})
        return {
            **self.prepared.describe(),
            **self._describe,
            "num_train_shards": self.num_train_shards,
            "num_visits": len(self._ahead()),
            "shards": shard_summary(list(used.values())),
            "cache": self.prepared.cache.stats.as_dict(),
        }

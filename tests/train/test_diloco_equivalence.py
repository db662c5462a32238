"""The gate: DiLoCo with one replica, outer lr 1, no momentum and a lossless codec IS plain
training, bit for bit (same init, same batches, same AdamW state, same lr schedule)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from trainfleet.data.prepare import CacheSettings
from trainfleet.data.spec import SyntheticDataset
from trainfleet.manifest.runs import CompressionSpec, ReplicaTask
from trainfleet.train import outer, pseudograd
from trainfleet.train.inner import init_weights, run_replica
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import DataSource, train

# 512-token shards at 4 x 16 tokens a step: a shard visit is 8 steps, so rounds of 5 steps
# start in the middle of a visit (the feed must fast-forward inside a shard).
SPEC = SyntheticDataset(
    name="eq", source="synthetic", num_dialects=2, num_documents=60, doc_tokens=128,
    shard_tokens=512,
)  # fmt: skip
ROUNDS, INNER_STEPS = 3, 5
PARAMS = GPTParams(
    n_layers=1, d_model=16, n_heads=2, seq_len=16, batch_size=4, steps=ROUNDS * INNER_STEPS,
    warmup_steps=3, eval_batches=2,
)  # fmt: skip
THREADS = 2


def _task(round_: int) -> ReplicaTask:
    return ReplicaTask(
        run="eq",
        run_id="e" * 64,
        round=round_,
        replica=0,
        num_replicas=1,
        weights="0" * 64,
        weights_size=0,
        inner_steps=INNER_STEPS,
        global_step=round_ * INNER_STEPS,
        total_steps=ROUNDS * INNER_STEPS,
        params=PARAMS.model_dump(),
        dataset=SPEC,
        compression=CompressionSpec(kind="none"),
    )


def _plain(tmp_path: Path, log: list[str]) -> dict[str, torch.Tensor]:
    data = DataSource(SPEC, None, CacheSettings(None))
    train(PARAMS, "full", tmp_path / "plain", num_threads=THREADS, log=log.append, data=data)
    return load_file(str(tmp_path / "plain/model.safetensors"))


def _diloco(
    tmp_path: Path, log: list[str], *, keep_state: bool = True
) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """ROUNDS rounds of one replica, outer lr 1 and no momentum; the weights and, per round,
    whether the replica resumed its optimizer. ``keep_state=False``: a newcomer every round."""
    weights = init_weights(PARAMS)
    resumed = []
    for round_ in range(ROUNDS):
        metrics = run_replica(
            _task(round_),
            weights,
            tmp_path / ("state" if keep_state else f"state-{round_}"),
            tmp_path / f"round-{round_}",
            log=log.append,
            num_threads=THREADS,
            settings=CacheSettings(None),
        )
        resumed.append(metrics["resumed_optimizer"])
        data = (tmp_path / f"round-{round_}/pseudograd.safetensors").read_bytes()
        decoded = pseudograd.decode(data, weights)
        assert decoded.codec == "none" and decoded.meta["round"] == str(round_)
        weights, momentum = outer.outer_step(weights, decoded.delta, None, lr=1.0, mu=0.0)
        assert momentum is None
    return weights, resumed


def _steps(lines: list[str]) -> list[str]:
    """The progress lines without their throughput."""
    return [line.rsplit(" tok/s", 1)[0] for line in lines if line.startswith("step ")]


def test_one_replica_outer_lr_one_is_plain_training_bit_for_bit(tmp_path: Path) -> None:
    plain_lines: list[str] = []
    plain = _plain(tmp_path, plain_lines)
    replica_lines: list[str] = []
    weights, resumed = _diloco(tmp_path, replica_lines)

    assert resumed == [False, True, True]
    assert sorted(weights) == sorted(plain)
    assert [name for name in plain if not torch.equal(weights[name], plain[name])] == []
    # The per-step lines agree too: global step numbers, losses and learning rates.
    assert len(_steps(plain_lines)) == ROUNDS * INNER_STEPS
    assert _steps(replica_lines) == _steps(plain_lines)


def test_the_gate_can_fail_without_the_carried_optimizer_state(tmp_path: Path) -> None:
    plain = _plain(tmp_path, [])
    weights, resumed = _diloco(tmp_path, [], keep_state=False)
    assert resumed == [False, False, False]
    assert not any(torch.equal(weights[name], plain[name]) for name in plain)

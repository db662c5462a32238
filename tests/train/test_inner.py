"""A DiLoCo replica's round: its data share, its resumable feed, its state between rounds,
adaptive H, the codec picked for a slow link, and the replica program's exit codes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from trainfleet import env
from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.spec import RouterSpec, SyntheticDataset
from trainfleet.manifest.runs import CompressionSpec, ReplicaTask
from trainfleet.train import pseudograd
from trainfleet.train.feed import ShardFeed
from trainfleet.train.inner import (
    PSEUDOGRAD_FILE,
    heldout_loss,
    heldout_pool,
    init_weights,
    replica_seed,
    replica_shards,
    run_replica,
)
from trainfleet.train.recipes import GPTParams
from trainfleet.train.replica import main

SPEC = SyntheticDataset(
    name="inner", source="synthetic", num_dialects=2, num_documents=60, doc_tokens=128,
    shard_tokens=512,
)  # fmt: skip
ROUTED = SyntheticDataset(
    name="routed", source="synthetic", num_dialects=2, num_documents=80, doc_tokens=128,
    shard_tokens=512, router=RouterSpec(num_paths=2, num_features=64, sample_documents=40),
)  # fmt: skip
PARAMS = GPTParams(
    n_layers=1, d_model=16, n_heads=2, seq_len=16, batch_size=4, steps=100, warmup_steps=2,
    eval_batches=2,
)  # fmt: skip
SETTINGS = CacheSettings(None)


def _task(**overrides: Any) -> ReplicaTask:
    fields: dict[str, Any] = {
        "run": "r",
        "run_id": "a" * 64,
        "round": 0,
        "replica": 0,
        "num_replicas": 2,
        "weights": "0" * 64,
        "weights_size": 0,
        "inner_steps": 3,
        "global_step": 0,
        "total_steps": 30,
        "params": PARAMS.model_dump(),
        "dataset": SPEC,
        "compression": CompressionSpec(),
    }
    return ReplicaTask.model_validate({**fields, **overrides})


def _run(tmp_path: Path, name: str, task: ReplicaTask, **kw: Any) -> dict[str, Any]:
    return run_replica(
        task,
        init_weights(PARAMS),
        tmp_path / "state",
        tmp_path / name,
        log=lambda _: None,
        num_threads=1,
        settings=SETTINGS,
        **kw,
    )


def _batches(feed: ShardFeed, count: int) -> list[torch.Tensor]:
    return [inputs for inputs, _ in itertools.islice(feed.batches(), count)]


def test_a_feed_started_at_step_s_yields_what_one_from_zero_yields_from_s() -> None:
    prepared = prepare_dataset(SPEC, SETTINGS, log=lambda _: None)
    shards = prepared.plan.select("train")

    def feed(start: int, steps: int) -> ShardFeed:
        return ShardFeed(
            prepared, shards, [], batch_size=4, seq_len=16, seed=3, steps=steps,
            log=lambda _: None, start_step=start,
        )  # fmt: skip

    whole = _batches(feed(0, 40), 40)
    for start in (1, 7, 8, 13, 39):  # visits are 8 steps: inside, at and across their edges
        rest = _batches(feed(start, 40), 40)
        assert len(rest) == 40 - start
        assert all(torch.equal(a, b) for a, b in zip(rest, whole[start:], strict=True))
    # A shorter schedule is a prefix of a longer one: round r never needs the run's length.
    short = _batches(feed(5, 12), 10)  # ends after step 12
    assert all(torch.equal(a, b) for a, b in zip(short, whole[5:12], strict=True))
    assert not torch.equal(whole[0], whole[1])


def test_replicas_share_every_training_shard_of_every_path_exactly_once() -> None:
    plan = prepare_dataset(ROUTED, SETTINGS, log=lambda _: None).plan
    train = plan.select("train")
    assert {s.path for s in train} == {0, 1}
    for n in (1, 3, 4):
        shares = [replica_shards(plan, k, n) for k in range(n)]
        keys = sorted(s.key for share in shares for s in share)
        assert keys == sorted(s.key for s in train)
    assert replica_shards(plan, 0, 1) == train
    assert replica_seed(5, 0) == 5 and replica_seed(5, 1) != replica_seed(5, 2)
    assert {s.path for s in heldout_pool(plan)} == {0, 1}


def test_init_weights_are_seeded_and_heldout_loss_is_deterministic() -> None:
    weights = init_weights(PARAMS)
    again = init_weights(PARAMS)
    assert all(torch.equal(weights[n], again[n]) for n in weights)
    other = init_weights(PARAMS.model_copy(update={"seed": 1}))
    assert not torch.equal(weights["tok_emb.weight"], other["tok_emb.weight"])
    first = heldout_loss(PARAMS, ROUTED, weights, SETTINGS, num_threads=1)
    assert first == heldout_loss(PARAMS, ROUTED, weights, SETTINGS, num_threads=1)
    assert first == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.1)


def test_round_r_plus_one_resumes_the_optimizer_and_a_gap_or_stranger_starts_fresh(
    tmp_path: Path,
) -> None:
    first = _run(tmp_path, "r0", _task(round=0))
    assert first["resumed_optimizer"] is False and first["inner_steps_done"] == 3
    assert _run(tmp_path, "r1", _task(round=1, global_step=3))["resumed_optimizer"] is True
    # A retry of round 1 still finds round 0's state (two rounds are kept).
    assert _run(tmp_path, "r1b", _task(round=1, global_step=3))["resumed_optimizer"] is True
    assert _run(tmp_path, "r3", _task(round=3, global_step=9))["resumed_optimizer"] is False
    other_run = _task(round=4, global_step=12, run_id="b" * 64)
    assert _run(tmp_path, "x", other_run)["resumed_optimizer"] is False
    other_replica = _task(round=4, global_step=12, replica=1)
    assert _run(tmp_path, "y", other_replica)["resumed_optimizer"] is False
    assert _run(tmp_path, "r4", _task(round=4, global_step=12))["resumed_optimizer"] is True
    kept = sorted(p.name for p in (tmp_path / "state" / ("a" * 16 + "-k0")).iterdir())
    assert kept == ["round-3.json", "round-3.pt", "round-4.json", "round-4.pt"]


def test_outputs_metrics_and_a_decodable_pseudo_gradient(tmp_path: Path) -> None:
    metrics = _run(tmp_path, "out", _task(replica=1))
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    decoded = pseudograd.decode((out / PSEUDOGRAD_FILE).read_bytes(), init_weights(PARAMS))
    assert decoded.meta["replica"] == "1" and decoded.meta["inner_steps_done"] == "3"
    assert pseudograd.global_norm(decoded.delta) > 0
    assert metrics["tokens"] == 3 * PARAMS.batch_size * PARAMS.seq_len
    assert metrics["codec"] == "none" and metrics["payload_bytes"] > 4 * metrics["num_params"]
    assert metrics["data"]["replica"] == 1 and metrics["data"]["shards"]
    assert metrics["first_loss"] > 0 and metrics["train_loss"] > 0


def test_adaptive_h_stops_at_the_time_target_after_one_step(tmp_path: Path) -> None:
    metrics = _run(tmp_path, "out", _task(inner_steps=50, target_s=0.0))
    assert metrics["inner_steps"] == 50 and metrics["inner_steps_done"] == 1


def test_a_slow_link_picks_a_sparser_codec_and_keeps_the_residual(tmp_path: Path) -> None:
    topk = CompressionSpec(kind="topk", density=0.5, bits=8)
    slow = _run(tmp_path, "slow", _task(compression=topk), max_mbps=1e-6)
    assert slow["codec"] != "none" and slow["payload_bytes"] < 4 * slow["num_params"]
    state = torch.load(tmp_path / "state" / ("a" * 16 + "-k0") / "round-0.pt", weights_only=True)
    assert state["residual"] is not None and set(state["residual"]) == set(init_weights(PARAMS))
    fast = _run(tmp_path, "fast", _task(round=1, global_step=3, compression=topk), max_mbps=1e9)
    assert fast["resumed_optimizer"] is True and fast["codec"].startswith("topk")


def _write_task(tmp_path: Path, task: dict[str, Any] | str) -> Path:
    file = tmp_path / "task.json"
    file.write_text(task if isinstance(task, str) else json.dumps(task))
    return file


def _args(tmp_path: Path, task: Path, weights: Path) -> list[str]:
    return [
        "--task", str(task), "--weights", str(weights), "--state-dir", str(tmp_path / "state"),
        "--output", str(tmp_path / "out"),
    ]  # fmt: skip


def test_the_program_refuses_a_bad_task_or_weights_file_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = json.loads(_task().model_dump_json())
    weights = tmp_path / "w.safetensors"
    save_file(init_weights(PARAMS), str(weights))

    bad_task = _write_task(tmp_path, {**good, "inner_steps": 0})
    assert main(_args(tmp_path, bad_task, weights)) == 2
    assert "invalid --task: inner_steps" in capsys.readouterr().err
    assert main(_args(tmp_path, _write_task(tmp_path, "{"), weights)) == 2
    assert main(_args(tmp_path, _write_task(tmp_path, {**good, "replica": 2}), weights)) == 2
    assert "replica 2 >= num_replicas 2" in capsys.readouterr().err

    task = _write_task(tmp_path, good)
    wrong_shape = dict(init_weights(PARAMS), **{"pos_emb.weight": torch.zeros(8, 16)})
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    assert main(_args(tmp_path, task, tmp_path / "shape.safetensors")) == 2
    assert "wrong shape ['pos_emb.weight']" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert main(_args(tmp_path, task, tmp_path / "junk.safetensors")) == 2
    half = {n: t.half() for n, t in init_weights(PARAMS).items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    assert main(_args(tmp_path, task, tmp_path / "half.safetensors")) == 2
    assert "float32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_program_runs_a_task_as_a_subprocess(tmp_path: Path) -> None:
    task = _write_task(tmp_path, json.loads(_task().model_dump_json()))
    weights = tmp_path / "w.safetensors"
    save_file(init_weights(PARAMS), str(weights))
    result = subprocess.run(
        [sys.executable, "-m", "trainfleet.train.replica", *_args(tmp_path, task, weights)],
        capture_output=True,
        text=True,
        env={**os.environ, env.NUM_THREADS: "1", env.MAX_MBPS: "1000"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "step 3/30 loss" in result.stdout
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["inner_steps_done"] == 3 and metrics["resumed_optimizer"] is False
    assert (tmp_path / "out" / PSEUDOGRAD_FILE).stat().st_size == metrics["payload_bytes"]

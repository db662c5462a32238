"""The DiLoCo benchmark: its harness drives the real replica and coordinator code (one replica
at outer lr 1, no momentum, fp32 is plain training), and the quick mode writes its metrics."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from trainfleet.data.prepare import CacheSettings
from trainfleet.data.spec import StdlibDataset
from trainfleet.manifest.runs import CompressionSpec
from trainfleet.train.inner import heldout_loss
from trainfleet.train.recipes import GPTParams

ROOT = Path(__file__).resolve().parents[2]


def bench(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a top-level package beside src/
    return importlib.import_module(f"bench.{name}")


def test_one_replica_diloco_is_the_one_worker_arm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arms = bench(monkeypatch, "diloco_arms")
    ours = bench(monkeypatch, "diloco_ours")
    params = GPTParams(
        n_layers=1, d_model=32, n_heads=2, seq_len=32, batch_size=4, warmup_steps=2, eval_batches=2
    )
    dataset = StdlibDataset(name="stdlib", source="stdlib", max_documents=40, shard_tokens=16384)
    setup = arms.Setup(params, dataset, tmp_path / "cache", 1, 12, 4)
    weights = arms.initial_weights(params)
    held = arms.HeldOut(setup)
    # the bench's evaluator is the coordinator's
    assert held.loss(weights) == heldout_loss(
        params, dataset, weights, CacheSettings(tmp_path / "cache")
    )

    single = arms.one_worker(setup, weights, 3e-3, held)
    arm = {
        "inner_steps": 4,
        "warmup_rounds": 0,
        "inner_lr": 3e-3,
        "outer_lr": 1.0,
        "momentum": 0.0,
        "codec": CompressionSpec(kind="none"),
        "label": "one replica",
    }
    diloco = ours.our_diloco(setup, weights, held, tmp_path / "ours", arm)

    assert [p.steps for p in diloco.points] == [p.steps for p in single.points] == [4, 8, 12]
    assert [p.loss for p in diloco.points] == [p.loss for p in single.points]
    assert diloco.final_loss < held.loss(weights)
    assert diloco.points[-1].sent == 3 * diloco.extra["payload_bytes_mean"]
    assert diloco.points[-1].sent > 3 * 4 * arms.num_params(weights)  # fp32 end weights


def test_quick_run_writes_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = bench(monkeypatch, "diloco")
    out = tmp_path / "diloco.json"
    # Quick sizes with 2 replicas, not 4: the sync-DP arm spawns a process per replica (each
    # imports torch), and what is checked here is how the figures are derived, per replica.
    sizes = dataclasses.replace(main.Sizes.pick(True, 0.2), replicas=2)
    monkeypatch.setattr(main.Sizes, "pick", classmethod(lambda *_: sizes))

    main.main(["--quick", "--scale", "0.2", "--no-torchft", "--out", str(out)])

    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["benchmark"] == "diloco"
    assert result["params"]["quick"] is True
    assert {"cores", "torch", "commit", "torchft"} <= set(result["env"])
    dp_bytes = m["sync_dp_bytes_sent_per_replica"]
    assert dp_bytes == result["params"]["steps"] * 2 * 4 * m["num_params"]
    for codec in ("fp32", "int8", "topk"):
        k = f"diloco_h5_{codec}"
        assert math.isfinite(m[f"{k}_heldout_bpb"])
        assert m[f"{k}_compression_vs_sync"] == dp_bytes / m[f"{k}_bytes_sent_per_replica"]
    # int8 sends about a quarter of fp32; topk (1%, 4 bits + int32 indices) far less
    assert (
        m["diloco_h5_int8_bytes_sent_per_replica"] < m["diloco_h5_fp32_bytes_sent_per_replica"] / 3
    )
    assert (
        m["diloco_h5_topk_bytes_sent_per_replica"] < m["diloco_h5_int8_bytes_sent_per_replica"] / 5
    )
    assert m["one_worker_bytes_sent_per_replica"] == 0
    assert isinstance(m["goal_within_2pct_and_1000x_held"], bool)
    assert m["sync_dp_time_to_sync_loss_s_1g"] is not None  # the target is its own final loss


def test_churn_figures_come_from_the_run_records(monkeypatch: pytest.MonkeyPatch) -> None:
    churn = bench(monkeypatch, "diloco_churn")

    def rnd(n: int, wall: float) -> dict[str, object]:
        return {
            "round": n,
            "opened_at": 100.0 * n,
            "wall_s": wall,
            "late_applied": n == 2,
            "heldout_loss": 3.0 - n,
            "bytes_up": 10,
            "bytes_down": 20,
        }

    def contrib(n: int, worker: str, status: str, steps: int = 5) -> dict[str, object]:
        return {
            "round": n,
            "worker_id": worker,
            "status": status,
            "compute_s": 2.0,
            "inner_steps_done": steps,
            "applied_in_round": n if status == "applied" else None,
        }

    detail = {
        "rounds": [rnd(0, 10.0), rnd(1, 14.0), rnd(2, 10.0)],
        "contributions": [
            contrib(0, "a", "applied"),
            contrib(0, "b", "applied"),
            contrib(1, "a", "applied"),
            contrib(1, "n", "dropped", 3),
            contrib(2, "n", "applied"),
            contrib(2, "a", "applied"),
        ],
    }
    kills = [{"round": 1, "time": 104.0, "host": "hb", "jobs": ["churn.r1.k1"]}]
    m = churn.measure(detail, kills, {"new": 0.0}, {"a": "ha", "n": "new"})

    assert m["applied_compute_s"] == 10.0 and m["reported_compute_s"] == 12.0
    assert m["killed_compute_s_upper_bound"] == 4.0  # killed 4 s after round 1 opened
    assert m["goodput"] == 10.0 / 16.0
    assert m["stall_s_per_kill_mean"] == 4.0  # 14 s against a calm median of 10 s
    assert m["newcomer_discarded_inner_steps"] == 3
    assert m["newcomer_first_applied_round_max"] == 2
    assert m["late_applied"] == 1

"""The referee program: per-window losses of two models on one seeded held-out subset, and a
panel judging real referees' losses of a tiny model (an honest claim, an inflated one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trainfleet import env
from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.spec import SyntheticDataset
from trainfleet.errors import CorpusTooSmall
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
from trainfleet.verify.gate import paired_gate
from trainfleet.verify.panel import judge, report_from_losses
from trainfleet.verify.referee import (
    EXIT_REFUSED,
    EXIT_USAGE,
    ModelRefused,
    main,
    referee_eval,
    subset_windows,
    window_losses,
)
from trainfleet.verify.spec import RefereeTask

DATASET = SyntheticDataset(
    name="held", source="synthetic", num_dialects=2, num_documents=200, doc_tokens=256,
    shard_tokens=2048, heldout_fraction=0.25,
)  # fmt: skip
PARAMS = GPTParams(
    n_layers=1, d_model=32, n_heads=2, seq_len=32, batch_size=16, lr=1e-2, warmup_steps=2,
    steps=40,
)  # fmt: skip
SETTINGS = CacheSettings(None)
GATE: dict[str, Any] = {"margin": 0.0, "confidence": 0.95, "resamples": 1000}


def _task(**overrides: Any) -> RefereeTask:
    fields: dict[str, Any] = {
        "submission_id": "s1",
        "competition_id": "c1",
        "index": 0,
        "candidate": "c" * 64,
        "frontier": "f" * 64,
        "hyper": PARAMS.model_dump(),
        "dataset": DATASET,
        "windows": 64,
        "seed": 11,
        "producer": "alice",
    }
    return RefereeTask.model_validate({**fields, **overrides})


def _trained(steps: int) -> dict[str, torch.Tensor]:
    """The family's init trained ``steps`` steps on the training shards: a real improvement."""
    prepared = prepare_dataset(DATASET, SETTINGS)
    data = torch.cat([shard_tensor(prepared, s) for s in prepared.plan.select("train")])
    with deterministic_torch(PARAMS.seed):
        model = model_from_weights(PARAMS, init_weights(PARAMS))
        optimizer = make_optimizer(model, PARAMS)
        for _ in range(steps):
            starts = torch.randint(0, len(data) - PARAMS.seq_len - 1, (PARAMS.batch_size,))
            train_step(model, optimizer, *windows(data, starts, PARAMS.seq_len), PARAMS.lr)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {"frontier": folder / "frontier.safetensors", "candidate": folder / "cand.safetensors"}
    save_file(init_weights(PARAMS), str(paths["frontier"]))
    save_file(_trained(PARAMS.steps), str(paths["candidate"]))
    return paths


def test_subset_windows_are_seeded_distinct_and_inside_the_pool() -> None:
    pool = torch.arange(1000)
    starts = subset_windows(pool, 32, 64, seed=3)
    assert torch.equal(starts, subset_windows(pool, 32, 64, seed=3))
    assert not torch.equal(starts, subset_windows(pool, 32, 64, seed=4))
    assert len(set(starts.tolist())) == 64
    assert int(starts.min()) >= 0 and int(starts.max()) + 32 < 1000
    assert starts.tolist() == sorted(starts.tolist())
    few = subset_windows(torch.arange(40), 32, 64, seed=3)  # 8 starts: drawn with replacement
    assert len(few) == 64 and set(few.tolist()) <= set(range(8))
    with pytest.raises(CorpusTooSmall):
        subset_windows(torch.arange(32), 32, 4, seed=0)


def test_window_losses_average_to_the_models_own_loss() -> None:
    prepared = prepare_dataset(DATASET, SETTINGS)
    tokens = torch.cat([shard_tensor(prepared, s) for s in heldout_pool(prepared.plan)])
    starts = subset_windows(tokens, PARAMS.seq_len, 300, seed=0)  # two forward batches
    weights = init_weights(PARAMS)
    losses = window_losses(PARAMS, weights, tokens, starts)
    assert len(losses) == 300
    with torch.no_grad():
        _, loss = model_from_weights(PARAMS, weights)(*windows(tokens, starts, PARAMS.seq_len))
    assert loss is not None
    assert float(np.mean(losses)) == pytest.approx(loss.item(), rel=1e-5)
    assert len(set(losses)) > 200  # per window, not one number repeated


def test_referee_eval_pairs_the_models_on_the_same_seeded_windows(models: dict[str, Path]) -> None:
    task = _task()
    first = referee_eval(task, models["candidate"], models["frontier"], SETTINGS)
    assert first == referee_eval(task, models["candidate"], models["frontier"], SETTINGS)
    assert first["windows"] == 64 and first["seed"] == 11
    assert len(first["candidate_losses"]) == len(first["frontier_losses"]) == 64
    gate = paired_gate(first["candidate_losses"], first["frontier_losses"], **GATE)
    assert gate.certified, gate.reason  # 40 steps of training beat the init, window by window
    other = referee_eval(_task(seed=12), models["candidate"], models["frontier"], SETTINGS)
    assert other["candidate_losses"] != first["candidate_losses"]
    itself = referee_eval(task, models["frontier"], models["frontier"], SETTINGS)
    assert itself["candidate_losses"] == itself["frontier_losses"] == first["frontier_losses"]
    free_ride = paired_gate(itself["candidate_losses"], itself["frontier_losses"], **GATE)
    assert not free_ride.certified and free_ride.improvement == 0.0


def test_a_model_outside_the_family_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    weights = init_weights(PARAMS)
    wrong = {
        "extra": {**weights, "smuggled": torch.zeros(1)},
        "shape": {**weights, "tok_emb.weight": torch.zeros(256, 16)},
        "float64": {k: v.double() for k, v in weights.items()},
    }
    for name, tensors in wrong.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ModelRefused, match="does not fit the model family"):
            referee_eval(_task(), tmp_path / f"{name}.safetensors", models["frontier"], SETTINGS)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelRefused, match="not a readable safetensors"):
        referee_eval(_task(), models["candidate"], tmp_path / "junk.safetensors", SETTINGS)


def test_a_diverged_model_reports_nulls_that_the_panel_refuses(
    models: dict[str, Path], tmp_path: Path
) -> None:
    diverged = {k: torch.full_like(v, float("nan")) for k, v in init_weights(PARAMS).items()}
    save_file(diverged, str(tmp_path / "nan.safetensors"))
    metrics = referee_eval(_task(), tmp_path / "nan.safetensors", models["frontier"], SETTINGS)
    assert metrics["candidate_losses"] == [None] * 64
    json.dumps(metrics, allow_nan=False)  # strict JSON: it travels as is
    report = report_from_losses(
        0, "w", "h", metrics["candidate_losses"], metrics["frontier_losses"], seed=0, **GATE
    )
    assert not report.ok and "non-finite" in report.reason


def _args(tmp_path: Path, task: Path, models: dict[str, Path]) -> list[str]:
    return [
        "--task", str(task), "--candidate", str(models["candidate"]),
        "--frontier", str(models["frontier"]), "--output", str(tmp_path / "out"),
    ]  # fmt: skip


def test_the_program_writes_metrics_as_a_subprocess(
    models: dict[str, Path], tmp_path: Path
) -> None:
    task = tmp_path / "task.json"
    task.write_text(_task().model_dump_json())
    result = subprocess.run(
        [sys.executable, "-m", "trainfleet.verify.referee", *_args(tmp_path, task, models)],
        capture_output=True,
        text=True,
        env={**os.environ, env.NUM_THREADS: "1"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "referee 0 of s1: 64 windows" in result.stdout
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["windows"] == 64 and metrics["seed"] == 11 and metrics["eval_s"] > 0
    expected = referee_eval(_task(), models["candidate"], models["frontier"], SETTINGS)
    assert metrics["candidate_losses"] == expected["candidate_losses"]


@pytest.mark.parametrize(
    "task",
    [
        "not json",
        json.dumps({"submission_id": "s1"}),
        _task().model_dump_json().replace('"windows":64', '"windows":5000'),
        _task().model_dump_json().replace('"n_layers":1', '"n_layers":"many"'),
        _task().model_dump_json()[:-1] + ',"verdict":"accept"}',
    ],
)
def test_a_malformed_task_exits_2(
    models: dict[str, Path], tmp_path: Path, task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "task.json").write_text(task)
    assert main(_args(tmp_path, tmp_path / "task.json", models)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("trainfleet.verify.referee: error: malformed task")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_refused_model_exits_3(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "task.json").write_text(_task().model_dump_json())
    (tmp_path / "bad.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors")
    args = _args(
        tmp_path, tmp_path / "task.json", {**models, "candidate": tmp_path / "bad.safetensors"}
    )
    assert main(args) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "refused: the candidate is not a readable safetensors file" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_panel_of_real_referees_accepts_the_truth_and_rejects_a_near_boundary_cheat(
    models: dict[str, Path],
) -> None:
    """Three referees measure the trained model on their own subsets. The honest claim (its
    loss over 2048 other windows) lies inside their intervals; an inflated claim 1.7
    half-widths better (lower) than that lies outside most of them: rejected by m = 2 of 3."""
    reports = []
    for index, seed in enumerate((101, 202, 303)):
        task = _task(index=index, seed=seed)
        metrics = referee_eval(task, models["candidate"], models["frontier"], SETTINGS)
        reports.append(
            report_from_losses(
                index,
                f"w{index}",
                f"host{index}",
                metrics["candidate_losses"],
                metrics["frontier_losses"],
                seed=seed,
                windows=64,
                **GATE,
            )
        )
    assert all(r.ok for r in reports)
    prepared = prepare_dataset(DATASET, SETTINGS)
    tokens = torch.cat([shard_tensor(prepared, s) for s in heldout_pool(prepared.plan)])
    starts = subset_windows(tokens, PARAMS.seq_len, 2048, seed=999)
    with deterministic_torch(999):
        weights = {name: load_file(str(path)) for name, path in models.items()}
        truth = float(np.mean(window_losses(PARAMS, weights["candidate"], tokens, starts)))
        frontier_score = float(np.mean(window_losses(PARAMS, weights["frontier"], tokens, starts)))

    honest = judge(truth, frontier_score, reports, m=2, n=3)
    assert honest.state == "accepted", honest.reason
    assert honest.certified == 3 and honest.improvement > 0
    assert honest.trusted_score == pytest.approx(frontier_score - honest.improvement)
    assert honest.trusted_score == pytest.approx(truth, abs=0.05)  # the panel's score is right

    half_width = float(np.median([r.candidate.half_width for r in reports]))
    cheat = truth - 1.7 * half_width
    verdict = judge(cheat, frontier_score, reports, m=2, n=3)
    assert verdict.state == "rejected", verdict.reason
    assert verdict.claim_inside <= 1
    assert "inflated claim" in verdict.reason
    # The rejection is the claim's, not the model's: the trusted score is unchanged.
    assert verdict.trusted_score == honest.trusted_score

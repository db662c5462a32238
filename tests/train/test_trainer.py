"""The ``gpt`` trainer: bit-identical under a seed, learns, saves a checkpoint that loads back;
without a ``dataset`` it trains on the built-in spec ``hyper.corpus`` names."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from trainfleet import env
from trainfleet.data.builtin import builtin_dataset
from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.train.__main__ import main
from trainfleet.train.feed import ShardFeed
from trainfleet.train.model import GPT
from trainfleet.train.recipes import GPTParams
from trainfleet.train.trainer import (
    deterministic_torch,
    evaluate,
    load_checkpoint,
    lr_at,
    train,
)

TINY = {
    "n_layers": 1,
    "d_model": 32,
    "n_heads": 2,
    "seq_len": 32,
    "batch_size": 8,
    "steps": 12,
    "warmup_steps": 3,
    "eval_batches": 2,
    "corpus_bytes": 50_000,
}
VARYING = {"tokens_per_s", "elapsed_s"}
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss \d+\.\d{4} lr \d\.\de-\d\d tok/s \d+$")


def _train(tmp_path: Path, name: str, mode: str = "full", **overrides: Any) -> dict[str, Any]:
    params = GPTParams.model_validate({**TINY, **overrides})
    return train(params, mode, tmp_path / name, num_threads=1, log=lambda _: None)


def _stable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in VARYING}


def test_same_seed_gives_bit_identical_metrics(tmp_path: Path) -> None:
    first = _train(tmp_path, "a", seed=7)
    second = _train(tmp_path, "b", seed=7)
    assert first["heldout_loss"] == second["heldout_loss"]
    assert first["train_loss"] == second["train_loss"]
    assert _stable(first) == _stable(second)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()


def test_different_seed_gives_different_losses(tmp_path: Path) -> None:
    first = _train(tmp_path, "a", seed=0)
    second = _train(tmp_path, "b", seed=1)
    assert first["heldout_loss"] != second["heldout_loss"]
    assert first["train_loss"] != second["train_loss"]


def test_smoke_mode_runs_five_steps_and_logs_each(tmp_path: Path) -> None:
    lines: list[str] = []
    params = GPTParams.model_validate({**TINY, "steps": 50})
    metrics = train(params, "smoke", tmp_path, num_threads=1, log=lines.append)
    assert metrics["steps"] == 5
    steps_logged = [m.groups() for m in map(STEP_LINE.match, lines) if m]
    assert steps_logged == [(str(i), "5") for i in range(1, 6)]
    assert lines[-1].startswith("held-out loss ")
    assert json.loads((tmp_path / "config.json").read_text())["mode"] == "smoke"


def test_writes_checkpoint_config_and_metrics(tmp_path: Path) -> None:
    metrics = _train(tmp_path, "out")
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "full"
    assert GPTParams.model_validate(config["params"]) == GPTParams.model_validate(TINY)
    assert metrics["steps"] == TINY["steps"]
    assert metrics["num_threads"] == 1
    assert metrics["heldout_bpb"] == pytest.approx(metrics["heldout_loss"] / math.log(2))
    data = metrics["data"]
    spec = builtin_dataset(GPTParams.model_validate(TINY))
    assert data["dataset"] == "stdlib" and data["routing"] == "unrouted" and data["path"] == 0
    assert data["digest"] == prepare_dataset(spec, CacheSettings(None)).plan.digest
    assert {s["key"].split("/")[0] for s in data["shards"]} == {"train", "heldout"}
    assert metrics["tokens_per_s"] > 0


def test_checkpoint_loads_back_and_reproduces_heldout_loss(tmp_path: Path) -> None:
    metrics = _train(tmp_path, "out")
    model, params = load_checkpoint(tmp_path / "out")
    assert model.num_params() == metrics["num_params"]
    prepared = prepare_dataset(builtin_dataset(params), CacheSettings(None), log=lambda _: None)
    feed = ShardFeed.for_path(
        prepared, 0, batch_size=8, seq_len=params.seq_len, seed=0, steps=1, log=lambda _: None
    )
    heldout = feed.heldout(params.eval_batches * params.batch_size)
    with deterministic_torch(params.seed, num_threads=1):
        loss = evaluate(model, heldout, params.batch_size, params.eval_batches)
    assert loss == metrics["heldout_loss"]


def test_training_reduces_loss_and_logs_about_ten_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    params = GPTParams.model_validate({**TINY, "steps": 40, "lr": 1e-2})
    metrics = train(params, "full", tmp_path, num_threads=1, log=lines.append)
    logged_losses = [float(line.split()[3]) for line in lines if STEP_LINE.match(line)]
    assert logged_losses[-1] < logged_losses[0]
    assert metrics["train_loss"] < math.log(256) - 1.0
    assert metrics["heldout_loss"] < math.log(256) - 1.0
    assert len([line for line in lines if STEP_LINE.match(line)]) == 10


def test_fresh_model_predicts_bytes_near_uniformly() -> None:
    with deterministic_torch(seed=0):
        model = GPT(n_layers=1, d_model=32, n_heads=2, seq_len=32)
        data = torch.randint(0, 256, (4, 33))
        _, loss = model(data[:, :-1], data[:, 1:])
    assert loss is not None
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)


def test_train_restores_torch_global_state(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    _train(tmp_path, "out", steps=2)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_lr_warms_up_then_decays_to_a_tenth() -> None:
    lrs = [lr_at(step, 1.0, warmup_steps=4, total_steps=20) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_entry_point_runs_as_a_subprocess(tmp_path: Path) -> None:
    params = json.dumps({**TINY, "steps": 3})
    output = str(tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "trainfleet.train", "--params", params, "--output", output],
        capture_output=True,
        text=True,
        env={**os.environ, env.NUM_THREADS: "1"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["num_threads"] == 1
    assert "step 3/3 loss" in result.stdout
    # Another process, same params and threads: the same numbers, bit for bit.
    assert _stable(_train(tmp_path, "in-process", steps=3)) == _stable(metrics)


def test_entry_point_rejects_bad_params_with_exit_2(tmp_path: Path) -> None:
    params = json.dumps({"d_model": 30, "n_heads": 4})
    result = subprocess.run(
        [sys.executable, "-m", "trainfleet.train", "--params", params, "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "n_heads (4) must divide d_model (30)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_entry_point_rejects_invalid_json_and_small_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--params", '{"steps": ', "--output", str(tmp_path)]) == 2
    assert "invalid --params" in capsys.readouterr().err
    too_long = json.dumps({**TINY, "seq_len": 4096, "corpus_bytes": 10_000})
    assert main(["--params", too_long, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "held-out tokens, fewer than seq_len + 1 = 4097" in err
    assert "hyper.corpus 'stdlib' capped at corpus_bytes = 10000: raise corpus_bytes" in err
    assert not (tmp_path / "metrics.json").exists()


def test_synthetic_corpus_trains_on_its_builtin_spec_and_reports_the_floor(
    tmp_path: Path,
) -> None:
    first = _train(tmp_path, "a", corpus="synthetic", seed=3, steps=4)
    again = _train(tmp_path, "b", corpus="synthetic", seed=3, steps=4)
    other = _train(tmp_path, "c", corpus="synthetic", seed=4, steps=4)
    assert _stable(first) == _stable(again)
    data = first["data"]
    assert data["dataset"] == "synthetic"
    assert data["loss_floor_nats"] > 0
    assert (
        data["digest"]
        == prepare_dataset(
            builtin_dataset(GPTParams.model_validate({**TINY, "corpus": "synthetic", "seed": 3})),
            CacheSettings(None),
        ).plan.digest
    )
    # The seed picks the text as well as the initialisation.
    assert other["data"]["digest"] != data["digest"]
    assert other["heldout_loss"] != first["heldout_loss"]


def test_builtin_corpus_is_cached_where_the_worker_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path / "cache"))
    first = _train(tmp_path, "a", steps=2)
    second = _train(tmp_path, "b", steps=2)
    assert first["data"]["cache"]["builds"] > 0
    assert second["data"]["cache"]["builds"] == 0  # every shard found on the worker's disk
    assert list((tmp_path / "cache/plans").glob("*.json"))

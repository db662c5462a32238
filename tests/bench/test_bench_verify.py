"""The cheat benchmark runs end to end at tiny sizes, writes every metric it reports, and its
figures say what the verification rules promise."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a top-level package beside src/
    bench_verify = importlib.import_module("bench.verify")
    out = tmp_path / "verify.json"

    bench_verify.main(["--quick", "--rule", "both", "--out", str(out)])

    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["benchmark"] == "verify"
    assert result["params"]["quick"] is True
    assert {"cores", "numpy", "torch", "commit"} <= set(result["env"])
    sizes = bench_verify.Sizes.pick(True)
    kinds = {
        "inflated_x1_7",
        "inflated_x3",
        "inflated_x10",
        "free_rider_same_file",
        "free_rider_new_bytes",
        "noisy_copy",
        "sandbagger_f_0_2",
        "diverged",
        "nan_weights",
    }
    for setting in sizes.settings():
        p = f"referee_{setting.key}"
        assert set(bench_verify.kinds_of(metrics, "referee", setting.key)) == kinds
        for kind in kinds:
            rate, lo, hi = (metrics[f"{p}_det_{kind}_{x}"] for x in ("rate", "lo", "hi"))
            assert 0 <= lo <= rate <= hi <= 1
            inflated = kind.startswith("inflated")  # judged on the honest trials' reports
            trials = sizes.honest_trials if inflated else sizes.cheat_trials
            assert metrics[f"{p}_det_{kind}_trials"] == trials
        # A free-rider never earns anything, whatever its bytes; NaN weights are always
        # rejected; a claim ten half-widths too low is always rejected.
        for kind in ("free_rider_same_file", "free_rider_new_bytes", "nan_weights"):
            assert metrics[f"{p}_det_{kind}_rate"] == 1.0
            assert metrics[f"{p}_det_{kind}_paid_nats"] == 0.0
        assert metrics[f"{p}_det_nan_weights_rejected"] == sizes.cheat_trials
        assert metrics[f"{p}_det_inflated_x10_rate"] == 1.0
        # Honest submissions: the false-accusation rate lies inside its own interval.
        false, lo, hi = (metrics[f"{p}_false_{x}"] for x in ("rate", "lo", "hi"))
        assert metrics[f"{p}_false_trials"] == sizes.honest_trials
        assert 0 <= lo <= false <= hi <= 1
        assert metrics[f"{p}_false_paid_nats"] > 0  # honest improvements do get paid
        assert isinstance(metrics[f"{p}_goal_met"], bool)
        assert metrics[f"compute_fraction_n{setting.n}w{setting.windows}"] > 0
    for w in sizes.windows:
        assert metrics[f"referee_cpu_s_w{w}"] > 0
        assert metrics[f"half_width_referee_w{w}"] > 0
    assert metrics["half_width_referee_w64"] < metrics["half_width_referee_w16"]
    # Payments telescope: what was paid is exactly the frontier's total move.
    assert math.isclose(
        metrics["market_referee_n3m2w64_total_paid"],
        metrics["market_referee_n3m2w64_baseline_minus_final_score"],
        rel_tol=1e-9,
        abs_tol=1e-12,
    )
    for name in ("spearman_submissions", "spearman_contributors", "spearman_submissions_ideal"):
        assert -1 <= metrics[f"market_referee_n3m2w64_{name}"] <= 1
    # A cheat is paid at most about what its model is really worth (its own improvement).
    assert (
        metrics["market_referee_n3m2w64_cheats_paid_nats"]
        <= metrics["market_referee_n3m2w64_cheats_paid_value_nats"] + 0.05
    )
    tag = "market_referee_n3m2w64"
    competitions = sizes.market_settings[0][-1]
    assert metrics[f"{tag}_competitions"] == competitions
    for name in bench_verify.MARKET_SPREAD:
        values = metrics[f"{tag}_{name}_values"]
        assert len(values) == competitions
        assert metrics[f"{tag}_{name}_min"] == min(values) <= metrics[f"{tag}_{name}"]
    for w in sizes.diloco_windows:
        assert -1 <= metrics[f"referee_diloco_w{w}_spearman_mean"] <= 1
    # The historical arm (the subset rule before the fix) runs on the summarised settings.
    old = [s for s in sizes.settings() if bench_verify.summarised(s, sizes)]
    assert old and sizes.settings_of("shard-budget") == old
    for setting in old:
        assert 0 <= metrics[f"shard-budget_{setting.key}_false_rate"] <= 1
        assert metrics[f"shard-budget_{setting.key}_det_nan_weights_rate"] == 1.0


def test_the_bench_measures_what_a_competition_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An honest claim is exactly ``heldout_score``; a referee's subset is distinct windows
    of the universe, which is ``pool_windows``' own draw over the whole held-out pool."""
    monkeypatch.syspath_prepend(str(ROOT))
    world_module = importlib.import_module("bench.verify_world")
    from trainfleet.verify.referee import heldout_score, pool_windows

    world = world_module.World(120, 512, 64, tmp_path / "cache", truth_windows=64)
    weights = world.init()
    assert world.heldout_score(weights) == heldout_score(
        world.params, world.dataset, weights, world.settings, num_threads=1
    )
    draw = pool_windows(world.prepared, world.params.seq_len, 512, world_module.UNIVERSE_SEED)
    assert world.universe_losses(weights).tolist() == draw.losses(world.params, weights)
    for seed in range(5):
        chosen = world.subset("referee", 64, seed)
        assert len(set(chosen.tolist())) == 64 and chosen.min() >= 0 and chosen.max() < 512
        assert list(chosen) == sorted(chosen)
        assert world.subset_losses(weights, chosen).tolist() == pytest.approx(
            world.universe_losses(weights)[chosen].tolist(), abs=1e-5
        )
    with pytest.raises(ValueError, match="unknown subset rule 'pool'"):
        world.subset("pool", 64, 0)

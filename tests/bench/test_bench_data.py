"""The data-plane benchmark runs end to end at tiny sizes and writes every metric it reports."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a top-level package beside src/
    bench_data = importlib.import_module("bench.data")
    out = tmp_path / "data.json"

    bench_data.main(["--quick", "--scale", "0.02", "--out", str(out)])

    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["benchmark"] == "data"
    assert result["params"]["quick"] is True
    assert {"cores", "numpy", "torch", "commit"} <= set(result["env"])
    for name in ("synthetic", "files_jsonl", "stdlib"):
        assert metrics[f"{name}_materialize_mb_per_s"] > 0
        assert metrics[f"{name}_materialize_tokens_per_s"] > 0
        assert metrics[f"{name}_disk_read_mb_per_s_reference"] > 0
    assert metrics["rss_streamed_bytes"] >= 10 * metrics["rss_bound_bytes"]
    assert isinstance(metrics["rss_goal_held"], bool)
    for percent in (25, 50, 75):
        assert (
            metrics[f"rebuilds_cap{percent}_furthest"]
            <= metrics[f"rebuilds_cap{percent}_lru_reference"]
        )
    assert metrics["rebuilds_real_matches_simulated"] is True
    assert 0 < metrics["router_purity"] <= 1
    assert metrics["router_digests_equal"] is True
    assert len(metrics["router_digest_inprocess"]) == 64

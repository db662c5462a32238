"""The feature-store benchmark runs end to end at tiny sizes and writes every metric it reports,
with no silent success over its interleavings."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a top-level package beside src/
    bench_features = importlib.import_module("bench.features")
    out = tmp_path / "features.json"

    bench_features.main(
        [
            "--quick",
            "--sizes-mib",
            "0.01,0.05",
            "--repeats",
            "2",
            "--interleave-ops",
            "400",
            "--out",
            str(out),
        ]
    )

    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["benchmark"] == "features"
    assert result["params"]["quick"] is True
    assert result["params"]["sizes_mib"] == [0.01, 0.05]
    assert {"cores", "torch", "commit", "safetensors", "blake3", "httpx", "uvicorn"} <= set(
        result["env"]
    )
    for label in ("0p01mib", "0p05mib"):
        assert metrics[f"shm_copy_ceiling_{label}_gbps"] > 0
        assert metrics[f"shm_copy_ceiling_warm_{label}_gbps"] > 0
        for backend in ("in_process", "shared_dir", "http"):
            assert metrics[f"{backend}_{label}_gbps"] > 0
            assert metrics[f"{backend}_{label}_ceiling_ratio"] > 0
    for backend in ("in_process", "shared_dir", "http"):
        assert metrics[f"interleave_{backend}_ops"] == 400
        assert metrics[f"interleave_{backend}_ok_gets"] > 0
        assert metrics[f"interleave_{backend}_silent_successes"] == 0
        assert metrics[f"interleave_{backend}_wrong_errors"] == 0
        assert metrics[f"interleave_{backend}_mismatches"] == 0
    assert metrics["interleave_silent_successes"] == 0
    assert "goal_shared_dir_ratio" not in metrics  # 16 MiB was not measured
    assert all(isinstance(v, (int, float, bool)) for v in metrics.values())  # flat

"""The link check of ``bench.diloco``'s model: quick mode, at a high cap, against a real
coordinator, writes every transfer's measured and modelled times (no timed pass/fail)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_mode_measures_every_transfer_against_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a top-level package beside src/
    link = importlib.import_module("bench.diloco_link")
    out = tmp_path / "diloco_link.json"
    assert link.main(["--quick", "--caps", "400", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["params"]["quick"] is True and result["params"]["caps_mbps"] == [400]
    assert {"cores", "python", "torch", "commit"} <= set(result["env"])
    metrics = result["metrics"]
    for what in ("weights_down", "upload_none", "upload_int8"):
        key = f"small_{what}_400mbps"
        assert metrics[f"{key}_bytes"] > 0
        assert metrics[f"{key}_modelled_s"] == pytest.approx(metrics[f"{key}_bytes"] * 8 / 400e6)
        assert math.isfinite(metrics[f"{key}_ratio"]) and metrics[f"{key}_ratio"] > 0.5
        assert math.isfinite(metrics[f"{key}_idle_ratio"]) and metrics[f"{key}_idle_ratio"] > 0
    # the README's model: 120,576 fp32 params; int8 is about a quarter of fp32
    assert metrics["small_weights_down_400mbps_bytes"] > 4 * 120_576
    assert (
        metrics["small_upload_int8_400mbps_bytes"] < metrics["small_upload_none_400mbps_bytes"] / 3
    )
    assert "| small | weights_down | 400 |" in capsys.readouterr().out

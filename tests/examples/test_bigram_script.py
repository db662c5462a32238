"""The example command job runs as the worker would run it and reports a sane metric."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "scripts" / "train_bigram.py"


def run_script(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRAINFLEET_OUTPUT_DIR": str(tmp_path / "out"),
        "TRAINFLEET_NUM_THREADS": "1",
        "TRAINFLEET_JOB_ID": "test-job",
        "TRAINFLEET_ATTEMPT": "1",
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bigram_script_trains_and_writes_metrics(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "--steps", "20", "--lr", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "step 20/20 loss" in proc.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert math.isfinite(metrics["heldout_loss"])
    assert 0 < metrics["heldout_loss"] < math.log(256)
    assert metrics["tokens_per_s"] > 0
    tensors = load_file(str(tmp_path / "out" / "bigram.safetensors"))
    assert tensors["logits"].shape == (256, 256)


def test_bigram_script_rejects_unknown_flags(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "--steps", "20", "--batch_size", "8")
    assert proc.returncode == 2
    assert "unrecognized arguments: --batch_size 8" in proc.stderr
    assert not (tmp_path / "out").exists()

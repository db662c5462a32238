"""The chaos benchmark counts what it claims to count, and runs end to end at a tiny size."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def chaos(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a top-level package beside src/
    return importlib.import_module("bench.chaos")


def mark(job: str, run: str, ev: str, t: float) -> dict[str, Any]:
    return {"job": job, "run": run, "pid": 1, "ev": ev, "t": t}


def detail(state: str, completions: int, run: str | None = None, sha: str = "ab") -> dict:
    result = {"metrics": {"run": run}, "artifact": sha} if run else None
    return {
        "job": {"state": state, "result": result},
        "events": [{"kind": "completed"}] * completions,
        "artifacts": [{"sha256": sha}] if run else [],
    }


def test_outcomes_are_counted_from_records_and_markers(chaos: ModuleType) -> None:
    jobs = {"ok": "short", "twice": "short", "lost": "short", "dropped": "short", "doom": "doomed"}
    markers = [
        # ok: a killed execution, then a clean one that started after it died
        mark("ok", "r1", "start", 0.0),
        mark("ok", "r1", "tick", 1.0),
        mark("ok", "r2", "start", 2.0),
        mark("ok", "r2", "end", 3.0),
        # twice: the second execution started while the first still ticked
        mark("twice", "a", "start", 0.0),
        mark("twice", "b", "start", 0.5),
        mark("twice", "a", "tick", 1.0),
        mark("twice", "a", "end", 1.5),
        mark("twice", "b", "end", 2.0),
        # dropped: ran to its end, but the job is pending again with no result
        mark("dropped", "d", "start", 0.0),
        mark("dropped", "d", "end", 1.0),
        mark("doom", "x", "start", 0.0),
    ]
    details = {
        "ok": detail("completed", 1, "r2"),
        "twice": detail("completed", 2, "b"),
        "lost": detail("pending", 0),
        "dropped": detail("pending", 0),
        "doom": detail("failed", 0),
    }
    counts = chaos.count_outcomes(jobs, markers, details, lambda sha: sha == "ab")
    assert counts["exactly_once"] == 1  # ok
    assert counts["completed_more_than_once"] == 1  # twice
    assert counts["run_twice_at_once"] == 1  # twice, not ok
    assert counts["lost"] == 2  # lost, dropped (doom failed legitimately)
    assert counts["results_lost"] == 1  # dropped
    assert counts["stuck"] == 2 and counts["expected_failed"] == 1
    # A result whose bytes are not in the store did not land either.
    assert chaos.count_outcomes(jobs, markers, details, lambda sha: False)["results_lost"] == 3


@pytest.mark.slow
def test_a_tiny_chaos_run_writes_its_metrics(chaos: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    args = ["--quick", "--faults", "2", "--workers", "2", "--max-minutes", "0.5"]
    chaos.main([*args, "--drain-s", "30", "--out", str(out)])
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["benchmark"] == "chaos" and result["params"]["seed"] == 7
    assert {"cores", "python", "torch", "commit"} <= set(result["env"])
    assert metrics["faults_injected"] >= 1 and metrics["jobs_total"] >= 1
    for key in ("jobs_lost", "jobs_run_twice_at_once", "jobs_results_lost"):
        assert isinstance(metrics[key], int)

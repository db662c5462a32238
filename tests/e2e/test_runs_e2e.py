"""End to end, collaborative runs (DiLoCo: Douillard et al. 2023, arXiv 2311.08105): a live
coordinator drives the rounds, real ``trainfleet join`` workers claim the replica tasks,
fetch the global weights, run ``python -m trainfleet.train.replica`` and upload their
pseudo-gradients; the CLI shows the run and exports its model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from livefleet import Fleet, wait_until
from trainfleet.train.trainer import load_checkpoint

pytestmark = pytest.mark.slow

DATASET = """
[datasets.syn]
source = "synthetic"
num_documents = 200
doc_tokens = 256
shard_tokens = 4096
"""
HYPER = (
    "hyper = { n_layers = 1, d_model = 16, n_heads = 2, seq_len = 16, batch_size = 4,"
    " lr = 1e-2, warmup_steps = 0, eval_batches = 2 }"
)


def run_toml(rounds: int = 2, **extra: object) -> str:
    lines = [
        "[[runs]]",
        'name = "collab"',
        'dataset = "syn"',
        "replicas = 2",
        "inner_steps = 5",
        f"rounds = {rounds}",
        HYPER,
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return DATASET + "\n".join(lines) + "\n"


def run_detail(fleet: Fleet) -> dict[str, Any]:
    return fleet.operator.run("collab")


def wait_run(fleet: Fleet, what: str, predicate: Any, timeout_s: float = 300) -> dict[str, Any]:
    """Wait until ``predicate(detail)``; the detail then."""

    def check() -> dict[str, Any] | None:
        detail = run_detail(fleet)
        return detail if predicate(detail) else None

    result: dict[str, Any] = wait_until(check, timeout_s, what, interval_s=0.5)
    return result


def completed(fleet: Fleet, timeout_s: float = 400) -> dict[str, Any]:
    return wait_run(
        fleet, "the run to complete", lambda d: d["run"]["state"] == "completed", timeout_s
    )


def worker_ids(fleet: Fleet, host: str) -> set[str]:
    return {w["id"] for w in fleet.operator.workers() if w["host"] == host}


def test_a_tiny_run_finishes_improves_and_exports_a_loadable_model(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.reload(run_toml())
    fleet.start_worker("cpu-a")
    fleet.start_worker("cpu-b", "--max-mbps", "8")  # a capped link: the run does not care
    detail = completed(fleet)

    rounds = detail["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["state"] == "closed" for r in rounds)
    assert all(r["accepted"] + r["late_applied"] >= 1 for r in rounds)
    assert rounds[-1]["heldout_loss"] < rounds[0]["heldout_loss"]
    assert sum(r["bytes_up"] for r in rounds) > 0 and sum(r["bytes_down"] for r in rounds) > 0
    jobs = {j["name"]: j for j in fleet.operator.jobs()}
    done = [j for name, j in jobs.items() if name.startswith("collab.r")]
    results = [j["result"] for j in done if j["state"] == "completed"]
    assert results and all(
        r["contribution"]["payload_bytes"] == r["artifact_size"] for r in results
    )

    # Each worker cached only rounds' weights, by hash, and kept replica state per run.
    run_id, starts = detail["run"]["id"], {r["weights"] for r in rounds}
    for worker in fleet.workers:
        cached = {p.name.split(".")[0] for p in (worker.workdir / "cache" / "weights").iterdir()}
        assert cached and cached <= starts
    assert any((w.workdir / "runs" / run_id).is_dir() for w in fleet.workers)

    out = fleet.cli("runs", check=True).stdout
    assert "collab" in out and "completed" in out and "2/2" in out
    png = tmp_path / "loss.png"
    show = fleet.cli("run", "show", "collab", "--png", str(png), check=True).stdout
    assert "held-out loss" in show and "run collab" in show
    assert png.read_bytes()[:4] == b"\x89PNG"

    fleet.cli("run", "export", "collab", "--output", str(tmp_path / "model"), check=True)
    model, params = load_checkpoint(tmp_path / "model")
    assert (params.n_layers, params.d_model) == (1, 16)
    final = load_file(str(tmp_path / "model" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], final[k]) for k in final)
    assert (
        fleet.coord.store.read_bytes(detail["run"]["weights"])
        == (tmp_path / "model" / "model.safetensors").read_bytes()
    )


def test_a_worker_killed_mid_round_costs_at_most_its_contribution(fleet: Fleet) -> None:
    fleet.reload(run_toml(min_quorum=2))  # every round waits for both replicas
    victim = fleet.start_worker("cpu-a")
    fleet.start_worker("cpu-b")
    wait_run(fleet, "round 1 to open", lambda d: d["run"]["round"] >= 1, 300)

    def running_late_replica() -> str | None:  # a replica of round 1 or later, on cpu-a
        names = [n for n in victim.job_names() if n.startswith("collab.r")]
        return next((n for n in names if not n.startswith("collab.r0.")), None)

    killed = wait_until(running_late_replica, 120, "cpu-a to run a replica", interval_s=0.05)
    killed_round = int(killed.split(".")[1][1:])
    victim_ids = worker_ids(fleet, "cpu-a")
    victim.kill_daemon()  # its job dies with it; the coordinator requeues the task
    fleet.start_worker("cpu-c")
    detail = completed(fleet)

    assert [r["accepted"] for r in detail["rounds"]] == [2, 2]  # nothing else was lost
    job = fleet.job(killed)["job"]
    assert job["state"] == "completed" and job["attempt"] >= 2
    ours = [
        c
        for c in detail["contributions"]
        if c["worker_id"] in victim_ids and c["round"] == killed_round and c["job_id"] == job["id"]
    ]
    assert ours == []  # the killed attempt never reported


def test_a_newcomer_contributes_from_its_next_round(fleet: Fleet) -> None:
    fleet.reload(run_toml(rounds=3))  # the newcomer's first round (joined_in + 1) included
    fleet.start_worker("cpu-a")
    joined_in = wait_run(fleet, "round 1 to open", lambda d: d["run"]["round"] >= 1)["run"]["round"]
    fleet.start_worker("cpu-b")
    wait_until(lambda: worker_ids(fleet, "cpu-b"), 60, "cpu-b to register")
    newcomer = worker_ids(fleet, "cpu-b")
    detail = completed(fleet)

    applied = [
        c
        for c in detail["contributions"]
        if c["worker_id"] in newcomer and c["status"] == "applied"
    ]
    assert applied, "the newcomer's contributions were never applied"
    assert min(c["applied_in_round"] for c in applied) <= joined_in + 1

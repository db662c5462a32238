"""End to end, reload semantics and the shard ledger: a live coordinator, real `trainfleet join`
workers, the real CLI. An edited job's old version never runs ahead of the new one (it stays
visible and is requeued only on purpose); a name resolves to the job in the current manifest;
manifest warnings and errors reach the operator; the first report of a shard is checked
against the coordinator's own plan of the spec."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fleetkit import routed_dataset_toml
from livefleet import Fleet, slow_job
from trainfleet.data.verify import fit_router_for
from trainfleet.errors import BadRequest
from trainfleet.manifest import parse_manifest

pytestmark = pytest.mark.slow


def sweep(seconds: float, priority: int) -> str:
    """One command job "j"; its identity is its hyperparameters (``seconds``)."""
    return "[hosts.cpu-a]\n" + slow_job("j", seconds, priority=priority)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_an_edited_job_runs_instead_of_its_old_version(fleet: Fleet, tmp_path: Path) -> None:
    fleet.reload(sweep(0.1, priority=5))
    old_id = fleet.job("j")["job"]["id"]
    out = fleet.cli("reload", write(tmp_path, "v2.toml", sweep(0.2, priority=0)), check=True)
    assert "1 added, 0 changed, 0 kept, 1 removed" in out.stdout

    # The name now means the job in the manifest; the old version is listed beside it.
    detail = fleet.job("j")
    new_id = detail["job"]["id"]
    assert new_id != old_id and detail["job"]["in_manifest"]
    assert [(o["id"], o["in_manifest"]) for o in detail["same_name"]] == [(old_id, False)]
    shown = fleet.cli("show", "j", check=True).stdout
    assert f"also named j: {old_id[:12]} (pending, removed from the manifest)" in shown

    # A worker takes the new version only, although the old one had the higher priority...
    worker = fleet.start_worker("cpu-a", "--claim-wait-s", "0")  # polls: each claim is seen
    assert fleet.wait_state(new_id, {"completed", "failed"}, timeout_s=30)["state"] == "completed"
    # ...and, asking again and again, is never handed the old one.
    asked = len(worker.proxy.seen("POST", r"/claim$"))
    worker.proxy.wait_for("POST", r"/claim$", count=asked + 3, timeout_s=15)
    old = fleet.job(old_id)
    assert old["job"]["state"] == "pending" and old["job"]["attempt"] == 0
    assert "claimed" not in [e["kind"] for e in old["events"]]
    explained = fleet.operator.explain(old_id)["message"]
    assert "removed from the manifest" in explained and "not claimable" in explained

    # Requeued on purpose, the old version runs too.
    out = fleet.cli("requeue", old_id, check=True)
    assert "removed from the manifest: pinned" in out.stdout
    done = fleet.wait_state(old_id, {"completed", "failed"}, timeout_s=30)
    assert done["state"] == "completed" and done["pinned"] and not done["in_manifest"]
    worker.sigterm()
    assert worker.wait(timeout=30) == 0


def test_reload_prints_warnings_and_names_the_nearest_key(fleet: Fleet, tmp_path: Path) -> None:
    text = '[defaults]\nmax_attempts = 2\n[hosts.cpu-a]\nallow_jobs = ["gpt-*"]\n' + sweep(
        0.1, priority=0
    ).replace("[hosts.cpu-a]\n", "")
    out = fleet.cli("reload", "--dry-run", write(tmp_path, "warn.toml", text), check=True)
    assert "warning: hosts.cpu-a.allow_jobs: pattern 'gpt-*' matches no job" in out.stdout
    assert "warning: max_attempts is deprecated: it is now max_failures" in out.stdout

    bad = "[defaults]\npriorty = 1\n" + sweep(0.1, priority=0).replace("kind =", "knd =")
    out = fleet.cli("reload", write(tmp_path, "bad.toml", bad))
    assert out.returncode != 0
    assert "defaults.priorty: Extra inputs are not permitted; did you mean 'priority'?" in (
        out.stdout + out.stderr
    )
    assert "did you mean 'kind'?" in out.stdout + out.stderr


def test_a_deeply_nested_manifest_is_refused_cleanly(fleet: Fleet, tmp_path: Path) -> None:
    deep = "a = " + "[" * 20_000 + "]" * 20_000 + "\n"
    with pytest.raises(BadRequest) as info:  # the coordinator: a 400, not a 500
        fleet.operator.reload(deep, "deep.toml")
    assert "deeper than" in info.value.message
    out = fleet.cli("reload", write(tmp_path, "deep.toml", deep))  # the CLI's own check
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "nested deeper than 32 levels" in out.stdout + out.stderr


DATASET = routed_dataset_toml(
    "dialects",
    num_documents=120,
    doc_tokens=128,
    shard_tokens=2048,
    num_features=64,
    sample_documents=100,
)
TINY = (
    "hyper = { steps = 5, n_layers = 1, d_model = 16, n_heads = 2, seq_len = 16, batch_size = 4,"
    " eval_batches = 2 }"
)


def test_the_first_report_of_a_shard_is_checked_against_the_spec(fleet: Fleet) -> None:
    # Before: the first job to report a shard defined its hash. Here the first (and only)
    # worker routes with a tampered router it trusts, and is caught all the same.
    fleet.reload(DATASET + f'[[jobs]]\nname = "first"\ndataset = "dialects"\npath = 0\n{TINY}\n')
    spec = parse_manifest(DATASET).datasets["dialects"]
    honest = fit_router_for(spec)
    centroids = np.array(honest.centroids)
    centroids[0], centroids[1] = honest.centroids[1], honest.centroids[0]
    tampered = dataclasses.replace(honest, centroids=centroids).to_json()
    fleet.operator.publish_router(tampered["fit_id"], tampered)
    worker = fleet.start_worker("cpu-a", "--exit-when-idle-s", "1.5")
    job = fleet.wait_state("first", {"completed", "failed"}, timeout_s=120)
    assert worker.wait(timeout=60) == 0
    assert job["state"] == "completed", job["error"]  # the result is kept...
    assert job["result"]["metrics"]["data"]["routing"] == "trusted"
    assert job["flags"] and all("coordinator's plan" in f for f in job["flags"])  # ...flagged
    assert "shard_mismatch" in [e["kind"] for e in fleet.job("first")["events"]]

"""End to end, the data plane: jobs carry dataset specs, live workers materialize shards, report
their hashes, and refuse (or get flagged for) a tampered router."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fleetkit import routed_dataset_toml
from livefleet import Fleet
from trainfleet.data.prepare import CacheSettings, prepare_dataset
from trainfleet.data.verify import fit_router_for
from trainfleet.manifest import parse_manifest

pytestmark = pytest.mark.slow

DATASET = routed_dataset_toml(
    "dialects",
    num_documents=300,
    doc_tokens=256,
    shard_tokens=8192,
    num_features=256,
    sample_documents=200,
)
TINY = (
    "hyper = { steps = 5, n_layers = 1, d_model = 16, n_heads = 2, seq_len = 16, batch_size = 4,"
    " eval_batches = 2 }"
)


def routed_job(name: str, path: int) -> str:
    return f'[[jobs]]\nname = "{name}"\ndataset = "dialects"\npath = {path}\n{TINY}\n'


def _spec():  # type: ignore[no-untyped-def]
    return parse_manifest(DATASET).datasets["dialects"]


def _tampered_router() -> dict:  # type: ignore[type-arg]
    """An honest fit with one centroid nudged: self-consistent digest, wrong routing."""
    honest = fit_router_for(_spec())
    centroids = np.array(honest.centroids)
    centroids[0], centroids[1] = honest.centroids[1], honest.centroids[0]
    return dataclasses.replace(honest, centroids=centroids).to_json()


def test_dataset_job_trains_on_local_shards_and_reports_their_hashes(fleet: Fleet, tmp_path):
    fleet.reload(DATASET + routed_job("p0", 0) + routed_job("p1", 1))
    worker = fleet.start_worker("cpu-a", "--exit-when-idle-s", "0.5", "--max-shards", "2")
    for name in ("p0", "p1"):
        job = fleet.wait_state(name, {"completed", "failed"}, timeout_s=120)
        assert job["state"] == "completed", job["error"]
        assert job["flags"] == []
    assert worker.wait(timeout=60) == 0

    # What the worker reports is what this process materializes from the spec alone.
    local = prepare_dataset(
        _spec(), CacheSettings(directory=tmp_path / "cache"), log=lambda _: None
    )
    expected = {s.key: s.sha256 for s in local.plan.shards}
    for path, name in enumerate(("p0", "p1")):
        data = fleet.job(name)["job"]["result"]["metrics"]["data"]
        assert data["routing"] == "fit-here" and data["digest"] == local.plan.digest
        assert data["router_digest"] == local.router.digest  # type: ignore[union-attr]
        reported = {s["key"]: s["sha256"] for s in data["shards"]}
        assert reported and all(key.split("/")[1] == str(path) for key in reported)
        assert reported == {key: expected[key] for key in reported}
        assert data["cache"]["builds"] >= 1
    # The operator can re-check a job's shards from another machine's point of view.
    manifest = tmp_path / "m.toml"
    manifest.write_text(DATASET)
    out = fleet.cli(
        "data",
        "verify",
        str(manifest),
        "--job",
        "p0",
        "--cache-dir",
        str(tmp_path / "v"),
        check=True,
    )
    assert "shard hashes re-materialized and equal" in out.stdout


def test_verifying_worker_refuses_a_tampered_router_and_the_job_is_not_retried(fleet: Fleet):
    fleet.reload(DATASET + routed_job("p2", 2))
    tampered = _tampered_router()
    fleet.operator.publish_router(tampered["fit_id"], tampered)
    worker = fleet.start_worker("cpu-v", "--exit-when-idle-s", "0.5", "--verify-routing")
    job = fleet.wait_state("p2", {"completed", "failed"}, timeout_s=120)
    assert job["state"] == "failed" and job["attempt"] == 1, job
    assert "routing verification failed" in job["error"]
    assert worker.wait(timeout=60) == 0
    events = [e["kind"] for e in fleet.job("p2")["events"]]
    assert events.count("claimed") == 1  # fatal: never offered again


def test_a_tampered_router_used_unverified_is_flagged_by_the_shard_ledger(fleet: Fleet):
    fleet.reload(DATASET + routed_job("honest", 0))
    worker = fleet.start_worker("cpu-a", "--exit-when-idle-s", "0.5")
    assert fleet.wait_state("honest", {"completed", "failed"}, timeout_s=120)["flags"] == []
    assert worker.wait(timeout=60) == 0

    tampered = _tampered_router()
    fleet.operator.publish_router(tampered["fit_id"], tampered)
    fleet.reload(DATASET + routed_job("honest", 0) + routed_job("trusting", 0))
    worker = fleet.start_worker("cpu-b", "--exit-when-idle-s", "0.5")
    job = fleet.wait_state("trusting", {"completed", "failed"}, timeout_s=120)
    assert job["state"] == "completed", job["error"]  # the result is kept...
    assert job["result"]["metrics"]["data"]["routing"] == "trusted"
    assert job["flags"] and "train/0/" in job["flags"][0]  # ...and flagged
    assert "shard_mismatch" in [e["kind"] for e in fleet.job("trusting")["events"]]
    assert worker.wait(timeout=60) == 0

"""The queue's data plane: published routers, and the shard ledger, which checks every
reported shard hash against the coordinator's own plan of the job's dataset spec (the first
report too), refuses a result for another dataset digest, flags a dataset job that reports no
hashes, and falls back to first-report-wins, flagged "unverified", where it cannot plan."""

from __future__ import annotations

import json
import sqlite3
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetkit import FakeClock, make_cap, manifest_of, routed_dataset_toml
from trainfleet.data.shards import ShardPlan, plan_shards
from trainfleet.data.spec import dataset_digest
from trainfleet.data.verify import fit_router_for
from trainfleet.errors import BadRequest, NotFound
from trainfleet.manifest.spec import Manifest
from trainfleet.queue import JobQueue
from trainfleet.queue import sqlite as sqlite_module
from trainfleet.queue.ledger import ShardReport, shard_reports
from trainfleet.queue.sqlite import SQLiteQueue, SQLQueue

SHA_A, SHA_B = "a" * 64, "b" * 64
# Jobs are claimed in this order: three on path 0 of the routed dataset "tiny", one on
# path 1, one on a dataset the coordinator cannot read ("elsewhere"), one without a dataset.
MANIFEST = (
    routed_dataset_toml("tiny")
    + '\n[datasets.elsewhere]\nsource = "files"\nroot = "/nonexistent/trainfleet-test"\n'
    'paths = ["*.txt"]\n'
    + "".join(
        f'\n[[jobs]]\nname = "{name}"\ndataset = "{ds}"\n{path}hyper = {{ steps = 5 }}\n'
        for name, ds, path in [
            ("p0a", "tiny", "path = 0\n"),
            ("p0b", "tiny", "path = 0\n"),
            ("p0c", "tiny", "path = 0\n"),
            ("p1", "tiny", "path = 1\n"),
            ("far1", "elsewhere", ""),
            ("far2", "elsewhere", ""),
        ]
    )
    + '\n[[jobs]]\nname = "plain"\nhyper = { steps = 5 }\n'
)


@cache
def manifest() -> Manifest:
    return manifest_of(MANIFEST)


@cache
def tiny_plan() -> ShardPlan:
    """The shards of "tiny" as a worker plans them."""
    spec = manifest().datasets["tiny"]
    return plan_shards(spec, fit_router_for(spec))


TINY = dataset_digest(manifest().datasets["tiny"])
FAR = dataset_digest(manifest().datasets["elsewhere"])


def true_shards(path: int) -> list[tuple[str, str]]:
    """(key, sha256) of the path's train and held-out shards, as an honest worker reports."""
    return [(s.key, s.sha256) for s in tiny_plan().shards if s.path == path]


def result(*shards: tuple[str, str], digest: str = TINY) -> dict[str, Any]:
    """A trainer's result reporting ``(key, sha256)`` shards of dataset ``digest``."""
    return {
        "metrics": {
            "loss": 1.5,
            "data": {
                "digest": digest,
                "shards": [{"key": k, "sha256": h, "num_tokens": 5} for k, h in shards],
            },
        },
        "artifact": None,
    }


def finish(queue: JobQueue, worker: str, outcome: dict[str, Any], name: str | None = None):  # type: ignore[no-untyped-def]
    """Claim the next job (check its name), run it and complete it with ``outcome``."""
    claim = queue.claim(worker)
    assert claim is not None
    assert name is None or claim.job.name == name
    queue.heartbeat(claim.job.id, worker, claim.epoch)
    return queue.complete(claim.job.id, worker, claim.epoch, outcome)


@pytest.fixture
def worker(queue: JobQueue) -> str:
    queue.apply_manifest(manifest())
    record, _ = queue.register_worker(make_cap("cpu-a"))
    return record.id


# --- routers ------------------------------------------------------------------------------


def test_get_router_before_publish_is_not_found(queue: JobQueue) -> None:
    with pytest.raises(NotFound, match="f" * 8):
        queue.get_router("f" * 64)


def test_publish_stores_and_a_second_publish_replaces(queue: JobQueue, clock: FakeClock) -> None:
    first = queue.publish_router("f" * 64, "1" * 64, {"centroids": "AAAA", "n": 1})
    assert (first.fit_id, first.digest, first.published_at) == ("f" * 64, "1" * 64, clock())
    assert queue.get_router("f" * 64) == {"centroids": "AAAA", "n": 1}
    clock.advance(5)
    second = queue.publish_router("f" * 64, "2" * 64, {"centroids": "BBBB", "n": 2})
    assert (second.digest, second.published_at) == ("2" * 64, clock())
    assert queue.get_router("f" * 64) == {"centroids": "BBBB", "n": 2}
    # Routers are per fit id: another dataset's is untouched and still missing.
    with pytest.raises(NotFound):
        queue.get_router("0" * 64)


# --- the shard ledger, against the coordinator's plan of the spec -----------------------------


def test_an_honest_first_report_matches_the_plan_without_flags(queue: JobQueue, worker: str):
    outcome = result(*true_shards(0))
    done = finish(queue, worker, outcome, "p0a")
    assert done.state == "completed"
    assert done.flags == []
    assert done.result == outcome
    kinds = [e.kind for e in queue.events(done.id)]
    assert "shard_mismatch" not in kinds and "data_flag" not in kinds


def test_the_first_report_is_checked_too(queue: JobQueue, worker: str) -> None:
    # Before: the first reporter's hashes became the reference, whatever they were.
    (key, _), *rest = true_shards(0)
    outcome = result((key, SHA_B), *rest)
    done = finish(queue, worker, outcome, "p0a")
    assert done.state == "completed" and done.result == outcome  # kept...
    assert len(done.flags) == 1  # ...and flagged, for the one shard that differs
    flag = done.flags[0]
    assert f"shard {key} " in flag and SHA_B[:16] in flag and "coordinator's plan" in flag
    assert [e.detail for e in queue.events(done.id) if e.kind == "shard_mismatch"] == [flag]
    assert queue.get_job(done.id).flags == [flag]
    # An honest second report of the same shard is not blamed for the first one's lie.
    assert finish(queue, worker, result(*true_shards(0)), "p0b").flags == []


def test_unknown_shards_and_shards_of_another_path_are_flagged(queue: JobQueue, worker: str):
    other_path = true_shards(1)[0]
    done = finish(queue, worker, result(*true_shards(0), other_path, ("train/0/999", SHA_A)))
    assert len(done.flags) == 2
    assert f"shard {other_path[0]} belongs to another path than the job's (0)" in done.flags
    assert any("train/0/999" in f and "not in the coordinator's plan" in f for f in done.flags)


def test_a_result_for_another_dataset_digest_is_refused(queue: JobQueue, worker: str) -> None:
    claim = queue.claim(worker)
    assert claim is not None and claim.job.name == "p0a"
    queue.heartbeat(claim.job.id, worker, claim.epoch)
    with pytest.raises(BadRequest, match="trained on another spec") as info:
        queue.complete(claim.job.id, worker, claim.epoch, result(*true_shards(0), digest="e" * 64))
    assert info.value.details == {"reported_digest": "e" * 64, "expected_digest": TINY}
    job = queue.get_job(claim.job.id)
    assert job.state == "running" and job.result is None and job.flags == []  # nothing written
    # The same attempt may still report what it really did.
    assert queue.complete(claim.job.id, worker, claim.epoch, result(*true_shards(0))).flags == []


def test_a_dataset_job_that_reports_no_shard_hashes_is_flagged(queue: JobQueue, worker: str):
    for outcome in ({}, {"metrics": {"loss": 2.0}}, result()):
        done = finish(queue, worker, outcome)
        assert done.state == "completed" and done.result == outcome
        assert done.flags == ["dataset job reported no shard hashes for 'tiny'"]
        assert [e.kind for e in queue.events(done.id)][-1] == "data_flag"


def test_a_job_without_a_dataset_reporting_shards_is_flagged_not_recorded(
    queue: JobQueue,
) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"\n'))
    worker, _ = queue.register_worker(make_cap("cpu-a"))
    first = finish(queue, worker.id, result(("train/0/0", SHA_A), digest=FAR), "a")
    assert first.flags == [
        f"reports 1 shard hash(es) of dataset {FAR[:12]} but the job has no dataset: not recorded"
    ]
    # Nothing went into the ledger: a disagreeing second report is compared with nothing.
    second = finish(queue, worker.id, result(("train/0/0", SHA_B), digest=FAR), "b")
    assert len(second.flags) == 1 and "not recorded" in second.flags[0]


def test_a_dataset_the_coordinator_cannot_read_falls_back_to_the_first_report(
    queue: JobQueue, worker: str
) -> None:
    for _ in range(4):
        finish(queue, worker, result(*true_shards(0)))
    first = finish(queue, worker, result(("train/0/0", SHA_A), digest=FAR), "far1")
    assert len(first.flags) == 1
    assert first.flags[0].startswith("unverified: shard hashes of 'elsewhere' not checked")
    assert "the coordinator cannot read the source" in first.flags[0]
    second = finish(queue, worker, result(("train/0/0", SHA_B), digest=FAR), "far2")
    assert len(second.flags) == 2
    assert first.id[:12] in second.flags[0] and "first report" in second.flags[0]
    assert second.flags[1].startswith("unverified: ")


def test_the_plan_is_made_once_per_digest(
    queue: JobQueue, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = sqlite_module.plan_expected_shards

    def counting(spec, budget_s):  # type: ignore[no-untyped-def]
        calls.append(spec.name)
        return real(spec, budget_s)

    monkeypatch.setattr(sqlite_module, "plan_expected_shards", counting)
    for _ in range(4):
        assert (
            finish(queue, worker, result(*true_shards(0) if _ < 3 else true_shards(1))).flags == []
        )
    assert calls == ["tiny"]


def test_planning_past_its_budget_ledgers_the_dataset_unverified(make_queue) -> None:  # type: ignore[no-untyped-def]
    queue = make_queue(shard_plan_budget_s=1e-9)
    queue.apply_manifest(manifest())
    worker, _ = queue.register_worker(make_cap("cpu-a"))
    done = finish(queue, worker.id, result(*true_shards(0)), "p0a")
    assert len(done.flags) == 1
    assert "planning took longer than 1e-09s on the coordinator" in done.flags[0]


def test_a_huggingface_dataset_is_not_downloaded_by_the_coordinator() -> None:
    from trainfleet.queue.shard_plans import plan_expected_shards

    spec = manifest_of(
        '[datasets.hf]\nsource = "huggingface"\nrepo = "x/y"\nrevision = "'
        + "0" * 40
        + '"\n[[jobs]]\nname = "a"\ndataset = "hf"\n'
    ).datasets["hf"]
    plan = plan_expected_shards(spec, budget_s=5)
    assert plan.status == "unverified" and "Hugging Face" in plan.detail and plan.shards == {}


MALFORMED_DATA: list[Any] = [
    None,
    "not a table",
    [TINY],
    {"shards": [{"key": "train/0/0", "sha256": SHA_B}]},  # no digest
    {"digest": 7, "shards": [{"key": "train/0/0", "sha256": SHA_B}]},
    {"digest": TINY},  # no shards
    {"digest": TINY, "shards": "train/0/0"},
    {"digest": TINY, "shards": [None, 3, "x", ["train/0/0", SHA_B]]},
    {"digest": TINY, "shards": [{"key": "train/0/0"}, {"sha256": SHA_B}]},
    {"digest": TINY, "shards": [{"key": 0, "sha256": SHA_B}, {"key": "train/0/0", "sha256": 1}]},
]


@pytest.mark.parametrize(
    "data", MALFORMED_DATA, ids=[f"case{i}" for i in range(len(MALFORMED_DATA))]
)
def test_malformed_data_does_not_crash_the_completion(
    queue: JobQueue, worker: str, data: Any
) -> None:
    outcome = {"metrics": {"data": data}, "artifact": None}
    done = finish(queue, worker, outcome)
    assert done.state == "completed"
    assert done.result == outcome
    assert done.flags == ["dataset job reported no shard hashes for 'tiny'"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
shard_entries = st.fixed_dictionaries(
    {}, optional={"key": json_values | st.text(max_size=8), "sha256": json_values | st.text()}
)
data_values = json_values | st.fixed_dictionaries(
    {}, optional={"digest": json_values, "shards": st.lists(shard_entries | json_values)}
)


@given(data=data_values)
def test_shard_reports_read_only_well_formed_entries(data: Any) -> None:
    reports = shard_reports({"metrics": {"data": data}})
    assert all(isinstance(r, ShardReport) for r in reports)
    if reports:
        assert isinstance(data, dict) and isinstance(data["digest"], str)
        expected = [
            ShardReport(data["digest"], s["key"], s["sha256"])
            for s in data["shards"]
            if isinstance(s, dict)
            and isinstance(s.get("key"), str)
            and isinstance(s.get("sha256"), str)
        ]
        assert reports == expected


# --- migration ----------------------------------------------------------------------------


def test_a_database_from_before_flags_gets_the_column(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "old.db"
    queue = SQLiteQueue(path, clock=clock)
    queue.apply_manifest(manifest())
    queue.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX jobs_pending_claim")  # a later version's, on those columns
    conn.execute("ALTER TABLE jobs DROP COLUMN flags")
    conn.execute("ALTER TABLE jobs DROP COLUMN pinned")
    conn.execute("DROP TABLE schema_migrations")  # as a file from before versioned schemas
    conn.close()
    conn = sqlite3.connect(path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    assert "flags" not in columns and "pinned" not in columns
    conn.close()

    queue = SQLiteQueue(path, clock=clock)
    try:
        assert {json.dumps(j.flags) for j in queue.list_jobs()} == {"[]"}
        assert not any(j.pinned for j in queue.list_jobs())
        worker, _ = queue.register_worker(make_cap("cpu-a"))
        flagged = finish(queue, worker.id, result(("train/0/0", SHA_B)))
        assert len(flagged.flags) == 1
    finally:
        queue.close()
    # Opening a current database again changes nothing (the migration is idempotent).
    queue = SQLiteQueue(path, clock=clock)
    try:
        assert json.dumps(queue.get_job(flagged.id).flags) == json.dumps(flagged.flags)
    finally:
        queue.close()


def test_a_spec_stored_with_max_attempts_reads_as_max_failures(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 4\n'))
    assert isinstance(queue, SQLQueue)
    with queue.db.tx() as conn:  # as an older release stored it
        (spec,) = conn.execute("SELECT spec FROM jobs").fetchone()
        old = json.loads(spec)
        old["max_attempts"] = old.pop("max_failures")
        conn.execute("UPDATE jobs SET spec = ?", (json.dumps(old),))
    assert queue.get_job("j").spec.max_failures == 4
    plan = queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 4\n'))
    assert plan.changed == [] and len(plan.kept) == 1

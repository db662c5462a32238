"""The queue's data plane: published routers, and the shard ledger that flags (never rejects)
a result whose shard hashes disagree with the first report of the same shard."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.errors import NotFound
from trainfleet.queue import JobQueue
from trainfleet.queue.ledger import ShardReport, shard_reports
from trainfleet.queue.sqlite import SQLiteQueue

DIGEST = "d" * 64
OTHER_DIGEST = "e" * 64
SHA_A, SHA_B = "a" * 64, "b" * 64
JOBS = "".join(f'[[jobs]]\nname = "j{i}"\nhyper = {{ steps = 5 }}\n' for i in range(4))


def result(*shards: tuple[str, str], digest: str = DIGEST) -> dict[str, Any]:
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


def finish(queue: JobQueue, worker: str, outcome: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Claim the next job, run it and complete it with ``outcome``; the completed record."""
    claim = queue.claim(worker)
    assert claim is not None
    queue.heartbeat(claim.job.id, worker, claim.epoch)
    return queue.complete(claim.job.id, worker, claim.epoch, outcome)


@pytest.fixture
def worker(queue: JobQueue) -> str:
    queue.apply_manifest(manifest_of(JOBS))
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


# --- the shard ledger ---------------------------------------------------------------------


def test_first_report_of_a_shard_is_recorded_without_flags(queue: JobQueue, worker: str) -> None:
    outcome = result(("train/0/0", SHA_A), ("train/0/1", SHA_B))
    done = finish(queue, worker, outcome)
    assert done.state == "completed"
    assert done.flags == []
    assert done.result == outcome
    assert "shard_mismatch" not in [e.kind for e in queue.events(done.id)]


def test_a_disagreeing_hash_completes_the_job_and_flags_it(queue: JobQueue, worker: str) -> None:
    first = finish(queue, worker, result(("train/0/0", SHA_A), ("train/0/1", SHA_A)))
    outcome = result(("train/0/0", SHA_B), ("train/0/1", SHA_A))
    second = finish(queue, worker, outcome)
    assert second.state == "completed"
    assert second.result == outcome  # the result is kept...
    assert len(second.flags) == 1  # ...and flagged, for the one shard that differs
    flag = second.flags[0]
    assert "shard train/0/0 " in flag
    assert DIGEST[:12] in flag and SHA_B[:16] in flag and SHA_A[:16] in flag
    assert first.id[:12] in flag
    mismatches = [e for e in queue.events(second.id) if e.kind == "shard_mismatch"]
    assert [e.detail for e in mismatches] == [flag]
    assert mismatches[0].worker_id == worker
    # The flag is stored, not just returned; the first job is not blamed after the fact.
    assert queue.get_job(second.id).flags == [flag]
    assert queue.get_job(first.id).flags == []


def test_the_first_hash_stays_the_reference(queue: JobQueue, worker: str) -> None:
    first = finish(queue, worker, result(("train/0/0", SHA_A)))
    finish(queue, worker, result(("train/0/0", SHA_B)))
    # A third report agreeing with the second is still judged against the first.
    third = finish(queue, worker, result(("train/0/0", SHA_B)))
    assert len(third.flags) == 1 and first.id[:12] in third.flags[0]


def test_the_same_hash_is_not_flagged(queue: JobQueue, worker: str) -> None:
    finish(queue, worker, result(("train/0/0", SHA_A)))
    again = finish(queue, worker, result(("train/0/0", SHA_A)))
    assert again.flags == []
    assert "shard_mismatch" not in [e.kind for e in queue.events(again.id)]


def test_shards_are_keyed_by_dataset_digest_too(queue: JobQueue, worker: str) -> None:
    finish(queue, worker, result(("train/0/0", SHA_A)))
    other = finish(queue, worker, result(("train/0/0", SHA_B), digest=OTHER_DIGEST))
    assert other.flags == []


def test_results_without_data_are_untouched(queue: JobQueue, worker: str) -> None:
    finish(queue, worker, result(("train/0/0", SHA_A)))
    for outcome in ({}, {"metrics": {"loss": 2.0}, "artifact": None}):
        done = finish(queue, worker, outcome)
        assert done.state == "completed"
        assert done.result == outcome
        assert done.flags == []


MALFORMED_DATA: list[Any] = [
    None,
    "not a table",
    [DIGEST],
    {"shards": [{"key": "train/0/0", "sha256": SHA_B}]},  # no digest
    {"digest": 7, "shards": [{"key": "train/0/0", "sha256": SHA_B}]},
    {"digest": DIGEST},  # no shards
    {"digest": DIGEST, "shards": "train/0/0"},
    {"digest": DIGEST, "shards": [None, 3, "x", ["train/0/0", SHA_B]]},
    {"digest": DIGEST, "shards": [{"key": "train/0/0"}, {"sha256": SHA_B}]},
    {"digest": DIGEST, "shards": [{"key": 0, "sha256": SHA_B}, {"key": "train/0/0", "sha256": 1}]},
]


@pytest.mark.parametrize(
    "data", MALFORMED_DATA, ids=[f"case{i}" for i in range(len(MALFORMED_DATA))]
)
def test_malformed_data_does_not_crash_the_completion(
    queue: JobQueue, worker: str, data: Any
) -> None:
    finish(queue, worker, result(("train/0/0", SHA_A)))
    outcome = {"metrics": {"data": data}, "artifact": None}
    done = finish(queue, worker, outcome)
    assert done.state == "completed"
    assert done.result == outcome
    assert done.flags == []  # nothing readable disagrees with train/0/0's SHA_A


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
    queue.apply_manifest(manifest_of(JOBS))
    queue.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE jobs DROP COLUMN flags")
    conn.close()
    conn = sqlite3.connect(path)
    assert "flags" not in [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    conn.close()

    queue = SQLiteQueue(path, clock=clock)
    try:
        assert [j.flags for j in queue.list_jobs()] == [[], [], [], []]
        worker, _ = queue.register_worker(make_cap("cpu-a"))
        finish(queue, worker.id, result(("train/0/0", SHA_A)))
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

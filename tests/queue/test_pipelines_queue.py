"""The durable ref queue of pipelines on both backends: reload, start/fail, the attempt fence,
publish (MAC, share, re-publish), lease partitions and retirement, stranded partitions, ack and
return, producer sync, the settle rules, counts, and migration 6 from a version-5 database.
Exactly-once under random interleavings: ``test_pipelines_exactly_once``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetkit import FakeClock, manifest_of
from pipelinekit import TEACHER_MODEL, Kit, ids_of, manifest_text, partition, start
from trainfleet.errors import BadRequest, Conflict, NotFound, StaleEpoch
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue import JobQueue, open_queue
from trainfleet.queue.db import open_database
from trainfleet.queue.migrations import MIGRATIONS, latest, migrate, schema_state
from trainfleet.queue.sqlite_schema import SPEC_COLUMNS, scheduling_columns
from trainfleet.testing.postgres import fresh_schema, require_server


@pytest.fixture
def kit(queue: JobQueue, clock: FakeClock) -> Kit:
    return start(queue, clock)


# reload, start, fail ----------------------------------------------------------------------
def test_a_reload_adds_a_waiting_pipeline_without_jobs_or_a_served_secret(
    queue: JobQueue,
) -> None:
    plan = queue.apply_manifest(manifest_of(manifest_text()), dry_run=True)
    assert [(e.name, e.state) for e in plan.pipelines] == [("distill", "added")]
    assert queue.list_pipelines() == []  # a dry run writes nothing
    plan = queue.apply_manifest(manifest_of(manifest_text()))
    (pipeline,) = queue.list_pipelines()
    assert plan.pipelines[0].id == pipeline.id and pipeline.state == "waiting"
    assert pipeline.teacher_job == queue.get_job("teacher").id and pipeline.teacher_model is None
    assert "secret" not in pipeline.model_dump() and "secret" not in pipeline.model_dump_json()
    assert len(bytes.fromhex(queue.pipeline_secret(pipeline.id))) == 32
    assert queue.pipeline_jobs(pipeline.id) == []
    assert queue.pipelines_to_drive() == [pipeline]
    assert queue.get_pipeline("distill") == queue.get_pipeline(pipeline.id) == pipeline
    with pytest.raises(NotFound):
        queue.get_pipeline("nope")
    assert [e.state for e in queue.apply_manifest(manifest_of(manifest_text())).pipelines] == [
        "kept"
    ]


def test_a_scheduling_change_updates_in_place_and_an_identity_change_supersedes(
    kit: Kit,
) -> None:
    queue, pid = kit.queue, kit.pipeline.id
    plan = kit.reload(consumers=3, priority=4)
    (entry,) = plan.pipelines
    assert entry.state == "changed" and entry.changes["consumers"] == [1, 3]
    assert queue.get_pipeline(pid).consumers == 3
    pending = [j for j in queue.pipeline_jobs(pid) if j.state == "pending"]
    assert pending and all(j.priority == 4 for j in pending)  # pending jobs rescheduled
    assert queue.ensure_consumers(pid) == 2
    plan = kit.reload(consumers=3, priority=4, samples=9)
    new = queue.get_pipeline("distill")
    assert new.id != pid and new.state == "waiting"
    assert {(e.id, e.state) for e in plan.pipelines} == {(new.id, "changed"), (pid, "superseded")}
    assert next(e for e in plan.pipelines if e.id == new.id).changes == {"id": [pid, new.id]}
    old = queue.get_pipeline(pid)
    assert old.state == "superseded" and not old.in_manifest
    assert {j.state for j in queue.pipeline_jobs(pid)} == {"cancelled"}
    queue.apply_manifest(manifest_of(HEAD_ONLY))
    assert not queue.get_pipeline(new.id).in_manifest
    assert queue.get_pipeline(new.id).state == "waiting"  # removed: left as it is


HEAD_ONLY = '[[jobs]]\nname = "other"\nkind = "command"\ncommand = ["true"]\n'


def test_start_inserts_pinned_producer_and_consumer_jobs_once(kit: Kit) -> None:
    queue, pid = kit.queue, kit.pipeline.id
    assert kit.pipeline.state == "producing" and kit.pipeline.teacher_model == TEACHER_MODEL
    jobs = queue.pipeline_jobs(pid)
    assert [(j.name, j.spec.kind) for j in jobs] == [
        ("distill.producer0", "producer"),
        ("distill.consumer0", "consumer"),
    ]
    assert all(j.state == "pending" and j.pinned and not j.in_manifest for j in jobs)
    assert jobs[0].spec.allowed_hosts == ["prod"] and jobs[1].spec.allowed_hosts == ["cons"]
    assert queue.start_pipeline(pid, TEACHER_MODEL) == queue.get_pipeline(pid)  # again: same
    assert len(queue.pipeline_jobs(pid)) == 2
    with pytest.raises(Conflict, match="producing"):
        queue.start_pipeline(pid, "ab" * 32)
    assert queue.is_bound(TEACHER_MODEL) and not queue.is_bound("ab" * 32)
    assert queue.pipelines_to_drive() == [queue.get_pipeline(pid)]
    assert kit.claim("prod").job.name == "distill.producer0"  # claimable: pinned


def test_failing_a_pipeline_cancels_its_jobs_and_ends_its_attempts(kit: Kit) -> None:
    queue, pid = kit.queue, kit.pipeline.id
    producer = kit.claim("prod")
    failed = queue.fail_pipeline(pid, "teacher gone")
    assert failed.state == "failed" and failed.detail == "teacher gone"
    assert {j.state for j in queue.pipeline_jobs(pid)} == {"cancelled"}
    with pytest.raises(StaleEpoch):
        queue.producer_sync(producer.id, producer.epoch, [])
    assert queue.fail_pipeline(pid, "again") == failed  # ended: unchanged
    assert queue.pipelines_to_drive() == []
    assert queue.ensure_consumers(pid) == 0


# the attempt fence and publish ----------------------------------------------------------
def test_pipeline_attempt_fences_by_epoch(kit: Kit) -> None:
    queue = kit.queue
    producer = kit.claim("prod")
    job, pipeline, secret = queue.pipeline_attempt(producer.id, producer.epoch)
    assert job.id == producer.id and pipeline.id == kit.pipeline.id
    assert bytes.fromhex(secret) == kit.secret
    with pytest.raises(StaleEpoch):
        queue.pipeline_attempt(producer.id, producer.epoch + 1)
    queue.fail(producer.id, producer.worker, producer.epoch, "lost")
    with pytest.raises(StaleEpoch):
        queue.publish_samples(producer.id, producer.epoch, [kit.ref(0)])
    with pytest.raises(BadRequest, match="not a pipeline"):
        queue.pipeline_attempt(queue.get_job("teacher").id, 0)
    with pytest.raises(NotFound):
        queue.pipeline_attempt("f" * 64, 1)


def test_publish_verifies_each_mac_the_pipeline_and_the_share(
    queue: JobQueue, clock: FakeClock
) -> None:
    kit = start(queue, clock, producers=2)
    producer = kit.claim("prod")
    assert producer.index == 0
    with pytest.raises(BadRequest, match="sample '00000002': its ref does not verify"):
        queue.publish_samples(
            producer.id, producer.epoch, [kit.ref(0), kit.ref(2, secret=b"x" * 32)]
        )
    forged = kit.ref(4) | {"size": 11}
    with pytest.raises(BadRequest, match="'00000004'"):
        queue.publish_samples(producer.id, producer.epoch, [forged])
    with pytest.raises(BadRequest, match="another pipeline"):
        kit.publish(producer, [0], pipeline="ab" * 32)
    with pytest.raises(BadRequest, match="not in producer 0's share"):
        kit.publish(producer, [1])
    with pytest.raises(BadRequest, match="not a sample id"):
        queue.publish_samples(producer.id, producer.epoch, [kit.ref(0, sample_id="x")])
    with pytest.raises(BadRequest, match="not a sample id"):
        kit.publish(producer, [8])  # samples = 8: idx 0..7
    assert kit.states() == {}  # a refused publish took nothing, not even its good refs
    consumer = kit.claim("cons")
    with pytest.raises(BadRequest, match="only producers publish"):
        kit.publish(consumer, [0])
    assert kit.publish(producer, [0, 2]) == ids_of(kit, [0, 2])
    reply = queue.publish_samples(producer.id, producer.epoch, [kit.ref(2), kit.ref(4)])
    assert reply.accepted == ["00000004"]
    assert [(s.sample_id, s.reason) for s in reply.skipped] == [("00000002", "already ready")]


def test_a_requeued_sample_is_published_again_with_its_new_ref(kit: Kit) -> None:
    queue = kit.queue
    producer, consumer = kit.claim("prod"), kit.claim("cons")
    kit.publish(producer, [0, 1])
    lease = queue.lease_samples(consumer.id, consumer.epoch, 8)
    assert [s["sample_id"] for s in lease.samples] == ["00000000", "00000001"]
    assert queue.return_samples(consumer.id, consumer.epoch, ["00000000", "00000001"]) == 2
    assert kit.states() == {"00000000": "requeued", "00000001": "requeued"}
    sync = queue.producer_sync(producer.id, producer.epoch, [])
    assert sync.produce[:2] == [0, 1] and not sync.finished
    assert kit.publish(producer, [0], generation=2) == ["00000000"]
    lease = queue.lease_samples(consumer.id, consumer.epoch, 8)
    assert [(s["sample_id"], s["generation"]) for s in lease.samples] == [("00000000", 2)]
    assert queue.pipeline_counts(kit.pipeline.id).reproduced == 1


# lease, ack, return -----------------------------------------------------------------------
def test_leases_partition_by_bucket_and_an_index_beyond_consumers_retires(
    queue: JobQueue, clock: FakeClock
) -> None:
    kit = start(queue, clock, samples=24, consumers=2)
    producer = kit.claim("prod")
    c0, c1 = kit.claim_consumer(0), kit.claim_consumer(1)
    kit.publish(producer, list(range(24)))
    got0 = queue.lease_samples(c0.id, c0.epoch, 256)
    got1 = queue.lease_samples(c1.id, c1.epoch, 256)
    assert [int(s["sample_id"]) for s in got0.samples] == partition(2, 0, 24)
    assert [int(s["sample_id"]) for s in got1.samples] == partition(2, 1, 24)
    assert got0.num_consumers == 2 and not got0.retire and not got0.done
    assert queue.lease_samples(c0.id, c0.epoch, 256).samples == []  # nothing leased twice
    kit.reload(samples=24, consumers=1)
    retire = queue.lease_samples(c1.id, c1.epoch, 4)
    assert retire.retire and retire.samples == [] and retire.num_consumers == 1
    with pytest.raises(BadRequest, match="max_samples"):
        queue.lease_samples(c0.id, c0.epoch, 0)
    with pytest.raises(BadRequest, match="only consumers lease"):
        queue.lease_samples(producer.id, producer.epoch, 1)


def test_a_stranded_partition_is_taken_by_a_live_consumer(
    queue: JobQueue, clock: FakeClock
) -> None:
    kit = start(queue, clock, samples=16, consumers=2)
    producer = kit.claim("prod")
    c0 = kit.claim_consumer(0)
    kit.publish(producer, list(range(16)))
    mine = queue.lease_samples(c0.id, c0.epoch, 256)
    assert [int(s["sample_id"]) for s in mine.samples] == partition(2, 0, 16)
    # c1 waits for a free worker (pending): its partition is not left waiting with it
    stranded = queue.lease_samples(c0.id, c0.epoch, 256)
    assert [int(s["sample_id"]) for s in stranded.samples] == partition(2, 1, 16)
    c1 = kit.claim_consumer(1)
    assert queue.lease_samples(c1.id, c1.epoch, 256).samples == []  # nothing leased twice
    c1_job = next(j for j in queue.pipeline_jobs(kit.pipeline.id) if j.name.endswith("consumer1"))
    queue.cancel(c1_job.id)
    assert queue.ensure_consumers(kit.pipeline.id) == 0  # an operator's cancel stands


def test_ack_is_idempotent_for_its_attempt_and_refused_to_others(kit: Kit) -> None:
    queue = kit.queue
    producer, consumer = kit.claim("prod"), kit.claim("cons")
    kit.publish(producer, [0, 1, 2])
    queue.lease_samples(consumer.id, consumer.epoch, 2)
    first = queue.ack_samples(consumer.id, consumer.epoch, [("00000000", 5)])
    assert [(r.sample_id, r.accepted) for r in first] == [("00000000", True)]
    again = queue.ack_samples(consumer.id, consumer.epoch, [("00000000", 9), ("00000002", 1)])
    assert [(r.accepted, r.reason) for r in again] == [
        (True, "acked already"),
        (False, "ready, not leased to you"),
    ]
    assert queue.ack_samples(consumer.id, consumer.epoch, [("99999999", 1)])[0].reason == (
        "no such sample"
    )
    conn = queue._conn()  # type: ignore[attr-defined]
    step = conn.execute("SELECT step FROM pipeline_samples WHERE sample_id = '00000000'")
    assert step.fetchone()[0] == 5  # unchanged by the second ack
    queue.fail(consumer.id, consumer.worker, consumer.epoch, "lost")
    other = kit.claim("cons")
    with pytest.raises(StaleEpoch):
        queue.ack_samples(consumer.id, consumer.epoch, [("00000001", 1)])
    refused = queue.ack_samples(other.id, other.epoch, [("00000001", 1)])
    assert not refused[0].accepted  # leased to the dead attempt (now back to ready)
    assert queue.return_samples(other.id, other.epoch, ["00000000"]) == 0  # not its lease


# producer sync --------------------------------------------------------------------------
def test_producer_sync_lists_what_to_release_and_make_and_finishes(kit: Kit) -> None:
    queue = kit.queue
    producer, consumer = kit.claim("prod"), kit.claim("cons")
    sync = queue.producer_sync(producer.id, producer.epoch, [])
    assert sync.produce == list(range(8)) and sync.release == [] and not sync.finished
    kit.publish(producer, list(range(8)))
    assert queue.producer_sync(producer.id, producer.epoch, []).produce == []
    leased = queue.lease_samples(consumer.id, consumer.epoch, 8).samples
    sync = queue.producer_sync(producer.id, producer.epoch, ["00000003"])  # not consumed yet
    assert sync.release == []
    acks = [(s["sample_id"], i) for i, s in enumerate(leased)]
    queue.ack_samples(consumer.id, consumer.epoch, acks)
    sync = queue.producer_sync(producer.id, producer.epoch, [])
    assert [r["sample_id"] for r in sync.release] == ids_of(kit, list(range(8)))  # 3 too
    assert sync.release[0] == kit.ref(0)  # the ref as published
    sync = queue.producer_sync(producer.id, producer.epoch, ids_of(kit, list(range(8))))
    assert sync.release == [] and not sync.finished  # consumed, not committed yet
    assert queue.lease_samples(consumer.id, consumer.epoch, 8).done
    queue.complete(consumer.id, consumer.worker, consumer.epoch, {})
    assert queue.producer_sync(producer.id, producer.epoch, []).finished
    counts = queue.pipeline_counts(kit.pipeline.id)
    assert (counts.committed, counts.released, counts.backlog) == (8, 8, 0)
    queue.complete(producer.id, producer.worker, producer.epoch, {})
    assert queue.settle_pipelines() == 1
    assert queue.get_pipeline(kit.pipeline.id).state == "completed"
    assert queue.pipelines_to_drive() == []


# settle ---------------------------------------------------------------------------------
def test_an_expired_lease_returns_to_ready_at_the_injected_time(kit: Kit) -> None:
    queue = kit.queue
    producer, consumer = kit.claim("prod"), kit.claim("cons")
    kit.publish(producer, [0])
    queue.lease_samples(consumer.id, consumer.epoch, 1)
    now = kit.clock()
    assert queue.settle_pipelines(now + 59) == 0 and kit.states() == {"00000000": "leased"}
    assert queue.settle_pipelines(now + 60) == 1 and kit.states() == {"00000000": "ready"}
    assert not queue.ack_samples(consumer.id, consumer.epoch, [("00000000", 0)])[0].accepted


def test_a_dead_consumer_attempt_gives_back_its_leases_and_requeues_what_it_consumed(
    kit: Kit,
) -> None:
    queue = kit.queue
    producer, consumer = kit.claim("prod"), kit.claim("cons")
    kit.publish(producer, [0, 1, 2])
    queue.lease_samples(consumer.id, consumer.epoch, 3)
    queue.ack_samples(consumer.id, consumer.epoch, [("00000000", 0)])
    queue.fail(consumer.id, consumer.worker, consumer.epoch, "killed")
    assert queue.settle_pipelines() == 3
    assert kit.states() == {"00000000": "requeued", "00000001": "ready", "00000002": "ready"}


def test_a_completed_consumer_commits_and_a_dead_http_producer_requeues_its_ready(
    kit: Kit,
) -> None:
    queue = kit.queue
    producer, consumer = kit.claim("prod"), kit.claim("cons")
    kit.publish(producer, [0, 1, 2])
    queue.lease_samples(consumer.id, consumer.epoch, 2)
    queue.ack_samples(consumer.id, consumer.epoch, [("00000000", 0)])
    queue.fail(producer.id, producer.worker, producer.epoch, "killed")
    assert queue.settle_pipelines() == 1  # 2 was ready on the dead server
    queue.complete(consumer.id, consumer.worker, consumer.epoch, {})
    queue.settle_pipelines()
    assert kit.states() == {"00000000": "committed", "00000001": "requeued", "00000002": "requeued"}
    again = kit.claim("prod")
    assert queue.producer_sync(again.id, again.epoch, []).produce == [1, 2, 3, 4, 5, 6, 7]


def test_a_dead_producer_of_a_shared_dir_store_leaves_its_ready_samples(
    queue: JobQueue, clock: FakeClock
) -> None:
    kit = start(queue, clock, store="dir:/shared/kd")
    producer = kit.claim("prod")
    kit.publish(producer, [0], store="dir:/shared/kd")
    queue.fail(producer.id, producer.worker, producer.epoch, "killed")
    assert queue.settle_pipelines() == 0 and kit.states() == {"00000000": "ready"}


def test_ensure_consumers_grows_shrinks_and_revives_only_its_own_cancels(
    queue: JobQueue, clock: FakeClock
) -> None:
    kit = start(queue, clock, consumers=3)
    pid = kit.pipeline.id

    def consumers() -> dict[str, str]:
        return {j.name: j.state for j in queue.pipeline_jobs(pid) if j.spec.kind == "consumer"}

    assert consumers() == {f"distill.consumer{k}": "pending" for k in range(3)}
    kit.reload(consumers=1)
    assert queue.ensure_consumers(pid) == 0
    assert consumers() == {
        "distill.consumer0": "pending",
        "distill.consumer1": "cancelled",
        "distill.consumer2": "cancelled",
    }
    kit.reload(consumers=2)
    assert queue.ensure_consumers(pid) == 1
    assert consumers()["distill.consumer1"] == "pending"
    assert queue.ensure_consumers(pid) == 0  # nothing more to do


def test_counts_tell_where_every_sample_stands(kit: Kit) -> None:
    queue = kit.queue
    producer, consumer = kit.claim("prod"), kit.claim("cons")
    kit.publish(producer, [0, 1, 2, 3])
    queue.lease_samples(consumer.id, consumer.epoch, 3)
    queue.ack_samples(consumer.id, consumer.epoch, [("00000000", 0)])
    queue.return_samples(consumer.id, consumer.epoch, ["00000001"])
    counts = queue.pipeline_counts(kit.pipeline.id)
    assert counts.model_dump() == {
        "samples": 8,
        "produced": 4,
        "backlog": 1 + 1 + 4,  # ready 3, requeued 1, 4 not yet produced
        "in_flight": 1,
        "consumed": 1,
        "committed": 0,
        "released": 0,
        "requeued": 1,
        "reproduced": 0,
    }


# migration 6 ------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def v5_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database at schema version 5 holding a pending job, as the release before left it."""
    if request.param == "sqlite":
        yield from _at_version_5(f"sqlite:///{tmp_path / 'queue.db'}")
    else:
        require_server()
        with fresh_schema() as url:
            yield from _at_version_5(url)


def _at_version_5(url: str) -> Iterator[str]:
    db = open_database(url)
    try:
        migrate(db, to=5)
        spec = JobSpec(name="old", kind="command", command=["true"])
        # The spec columns as of version 5 (version 7 added ``submitter``, the last one).
        columns = SPEC_COLUMNS.removesuffix(", submitter")
        values = scheduling_columns(spec, "c" * 64)[: len(columns.split(","))]
        marks = ", ".join("?" for _ in values)
        with db.tx() as conn:
            conn.execute(
                f"INSERT INTO jobs (id, seq, name, state, {columns}, created_at,"
                f" updated_at, pending_since, manifest_hash) VALUES (?, 1, 'old', 'pending',"
                f" {marks}, 1000, 1000, 1000, 'm')",
                ("c" * 64, *values),
            )
        assert schema_state(db).version == 5
    finally:
        db.close()
    yield url


def test_migration_6_upgrades_a_version_5_database_which_then_runs_a_pipeline(
    v5_url: str,
) -> None:
    db = open_database(v5_url)
    try:
        assert [m.version for m in migrate(db)] == list(range(6, latest() + 1))
        with db.read() as conn:
            old = conn.execute("SELECT name, pipeline_id FROM jobs").fetchall()
            assert [tuple(r) for r in old] == [("old", None)]
            assert conn.execute("SELECT COUNT(*) FROM pipeline_samples").fetchone()[0] == 0
        with db.tx() as conn:  # its steps again change nothing (a half-applied database)
            for step in MIGRATIONS[5].steps(conn.dialect):
                conn.execute(step) if isinstance(step, str) else step(conn)
    finally:
        db.close()
    queue = open_queue(v5_url)
    try:
        clock = FakeClock()
        queue.clock = clock
        kit = start(queue, clock)
        producer = kit.claim("prod")
        assert kit.publish(producer, [0]) == ["00000000"]
        assert queue.get_job("old").state == "pending"
        assert queue.pipeline_counts(kit.pipeline.id).produced == 1
    finally:
        queue.close()

"""LocalControl keeps the durable ref queue's rules: partitions, retire, ack, return, sync."""

from __future__ import annotations

import os

import pytest

from trainfleet.errors import BadRequest, StaleEpoch
from trainfleet.features.ref import SampleRef, sign_ref
from trainfleet.manifest.pipelines import bucket, sample_id
from trainfleet.pipeline.control import LocalControl

SECRET = os.urandom(32)


def ref(idx: int, generation: int = 1, secret: bytes = SECRET) -> SampleRef:
    return sign_ref(
        store="mem:test",
        pipeline="p",
        sample_id=sample_id(idx),
        key=sample_id(idx),
        generation=generation,
        digest="0" * 64,
        size=1,
        secret=secret,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_consumers_lease_their_stable_partition_in_index_order() -> None:
    control = LocalControl(20, 1, 2, SECRET)
    producer = control.producer(0)
    assert producer.publish([ref(i) for i in range(20)]).accepted == [
        sample_id(i) for i in range(20)
    ]
    for k in range(2):
        lease = control.consumer(k).lease(100)
        ids = [r.sample_id for r in lease.samples]
        assert ids == sorted(ids)
        assert ids == [sample_id(i) for i in range(20) if bucket(sample_id(i)) % 2 == k]
        assert not lease.retire and not lease.done and lease.num_consumers == 2


def test_fewer_consumers_retire_the_extra_ones_and_repartition() -> None:
    control = LocalControl(8, 1, 3, SECRET)
    control.producer(0).publish([ref(i) for i in range(8)])
    third = control.consumer(2)
    control.set_consumers(2)
    lease = third.lease(8)
    assert lease.retire and lease.samples == [] and lease.num_consumers == 2
    taken = [r.sample_id for k in range(2) for r in control.consumer(k).lease(8).samples]
    assert sorted(taken) == [sample_id(i) for i in range(8)]


def test_ack_is_idempotent_for_its_attempt_and_refused_for_others() -> None:
    control = LocalControl(4, 1, 1, SECRET)
    control.producer(0).publish([ref(i) for i in range(4)])
    first = control.consumer(0)
    leased = [r.sample_id for r in first.lease(2).samples]
    [ok] = first.ack([(leased[0], 0)])
    [again] = first.ack([(leased[0], 5)])
    [not_leased] = first.ack([(sample_id(3), 1)])
    assert ok.accepted and again.accepted and not not_leased.accepted
    assert "ready" in not_leased.reason
    second = control.consumer(0)  # a new attempt of the same job writes the first one off
    with pytest.raises(StaleEpoch):
        first.ack([(leased[1], 1)])
    assert control.states()[leased[0]] == "requeued"  # consumed by an attempt written off
    assert [r.sample_id for r in second.lease(4).samples] == sorted(
        {sample_id(i) for i in range(4)} - {leased[0]}
    )


def test_done_only_when_every_sample_is_consumed_and_commit_on_completion() -> None:
    control = LocalControl(3, 1, 1, SECRET)
    producer = control.producer(0)
    producer.publish([ref(0), ref(1)])
    consumer = control.consumer(0)
    lease = consumer.lease(10)
    consumer.ack([(r.sample_id, i) for i, r in enumerate(lease.samples)])
    assert not consumer.lease(10).done  # sample 2 was never published
    producer.publish([ref(2)])
    [last] = consumer.lease(10).samples
    consumer.ack([(last.sample_id, 2)])
    assert consumer.lease(10).done
    control.end(consumer, completed=True)
    assert set(control.states().values()) == {"committed"}


def test_return_requeues_and_sync_asks_for_it_again_then_releases_and_finishes() -> None:
    control = LocalControl(2, 1, 1, SECRET)
    producer = control.producer(0)
    assert producer.sync([]).produce == [0, 1]
    producer.publish([ref(0), ref(1)])
    consumer = control.consumer(0)
    a, b = consumer.lease(2).samples
    assert consumer.return_samples([a.sample_id]) == 1
    consumer.ack([(b.sample_id, 0)])
    sync = producer.sync([])
    assert sync.produce == [int(a.sample_id)]
    assert [r.sample_id for r in sync.release] == [b.sample_id] and not sync.finished
    assert producer.publish([ref(int(a.sample_id), generation=2)]).accepted == [a.sample_id]
    assert producer.publish([ref(int(a.sample_id), generation=3)]).skipped == [
        (a.sample_id, "already ready")
    ]
    [again] = consumer.lease(2).samples
    assert again.generation == 2
    consumer.ack([(again.sample_id, 1)])
    control.end(consumer, completed=True)
    sync = producer.sync([b.sample_id])
    assert [r.sample_id for r in sync.release] == [a.sample_id] and not sync.finished
    assert producer.sync([a.sample_id]).finished
    assert control.counts()["reproduced"] == 1


def test_expired_lease_returns_and_dead_producer_requeues_in_memory_samples() -> None:
    clock = Clock()
    control = LocalControl(2, 1, 1, SECRET, lease_s=10, clock=clock)
    producer = control.producer(0)
    producer.publish([ref(0), ref(1)])
    consumer = control.consumer(0)
    assert len(consumer.lease(1).samples) == 1
    clock.now = 11
    control.settle()
    assert set(control.states().values()) == {"ready"}
    control.end(producer, completed=False)  # its in-memory store died with it
    assert set(control.states().values()) == {"requeued"}
    assert control.producer(0).sync([]).produce == [0, 1]


def test_dir_store_samples_outlive_their_producer() -> None:
    control = LocalControl(1, 1, 1, SECRET, store="dir:/shared")
    producer = control.producer(0)
    producer.publish([ref(0)])
    control.end(producer, completed=False)
    assert control.states() == {sample_id(0): "ready"}


def test_an_orphaned_partition_is_taken_by_another_consumer() -> None:
    control = LocalControl(10, 1, 2, SECRET)
    control.producer(0).publish([ref(i) for i in range(10)])
    other = control.consumer(1)
    control.end(other, completed=True)  # finished (e.g. before a re-partition)
    consumer = control.consumer(0)
    own = consumer.lease(10).samples
    assert own and all(bucket(r.sample_id) % 2 == 0 for r in own)
    orphans = consumer.lease(10).samples  # its own partition is empty now
    assert orphans and all(bucket(r.sample_id) % 2 == 1 for r in orphans)
    assert sorted(r.sample_id for r in own + orphans) == [sample_id(i) for i in range(10)]


def test_publish_checks_mac_and_share() -> None:
    control = LocalControl(4, 2, 1, SECRET)
    producer = control.producer(1)
    with pytest.raises(BadRequest, match="00000001"):
        producer.publish([ref(1, secret=os.urandom(32))])
    with pytest.raises(BadRequest, match="share"):
        producer.publish([ref(0)])
    with pytest.raises(BadRequest):
        producer.lease(1)  # type: ignore[attr-defined]  # a producer cannot lease
    assert producer.publish([ref(1), ref(3)]).accepted == [sample_id(1), sample_id(3)]

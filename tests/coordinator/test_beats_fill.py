"""The heartbeat book filled by claims (``HeartbeatBook(fill_on_claim=True)``): an attempt's
first beat is answered from memory, and claimed -> running (with its ``running`` event) is
written by the flush, or by the completion's or the next claim's own transaction."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_api import ONE_JOB
from test_beats import direct

from fleetkit import make_cap, manifest_of
from trainfleet.coordinator.beats import HeartbeatBook, Pace
from trainfleet.errors import Conflict, StaleEpoch
from trainfleet.queue.sqlite import SQLQueue


@pytest.fixture
def book(queue: SQLQueue) -> HeartbeatBook:
    pace = Pace(base_interval_s=2.0, min_lease_s=8.0, budget_per_s=500)
    return HeartbeatBook(queue, pace, fill_on_claim=True)


def claimed(queue: SQLQueue, book: HeartbeatBook) -> tuple[str, str, int]:
    queue.apply_manifest(manifest_of(ONE_JOB))
    worker, _ = queue.register_worker(make_cap("cpu-a"))
    claim = queue.claim(worker.id)
    assert claim is not None
    book.expect(claim.job.id, worker.id, claim.epoch)
    return claim.job.id, worker.id, claim.epoch


def kinds(queue: SQLQueue, job_id: str) -> list[Any]:
    return [(e.kind, e.from_state, e.to_state) for e in queue.events(job_id)][-3:]


def test_the_first_beat_is_answered_from_memory_and_the_flush_starts_the_job(
    queue: SQLQueue, book: HeartbeatBook
) -> None:
    job_id, worker, epoch = claimed(queue, book)
    reply = book.answer(job_id, worker, epoch)
    assert reply is not None and reply.state == "running"
    assert queue.get_job(job_id).state == "claimed"  # not written yet
    assert asyncio.run(book.flush(direct)) == 1
    assert queue.get_job(job_id).state == "running"
    assert kinds(queue, job_id)[-1] == ("running", "claimed", "running")
    book.answer(job_id, worker, epoch)
    asyncio.run(book.flush(direct))  # a later beat only renews the lease
    assert [k for k, _, _ in kinds(queue, job_id)].count("running") == 1


def test_a_completion_writes_the_unflushed_first_beat_first(
    queue: SQLQueue, book: HeartbeatBook
) -> None:
    job_id, worker, epoch = claimed(queue, book)
    book.answer(job_id, worker, epoch)
    start = book.take_start(job_id, worker, epoch)
    assert start is not None and start.start
    _, record = queue.complete_plain(job_id, worker, epoch, {}, start)
    assert record is not None and record.state == "completed"
    assert record.heartbeat_at == start.at  # the beat's lease renewal, folded in
    assert kinds(queue, job_id)[-2:] == [
        ("running", "claimed", "running"),
        ("completed", "running", "completed"),
    ]
    running = [e for e in queue.events(job_id) if e.kind == "running"]
    assert [e.at for e in running] == [start.at]  # stamped when the beat arrived


def test_a_start_beat_of_a_job_already_running_adds_no_second_running_event(
    queue: SQLQueue, book: HeartbeatBook
) -> None:
    job_id, worker, epoch = claimed(queue, book)
    queue.heartbeat(job_id, worker, epoch)  # written straight to the database
    book.answer(job_id, worker, epoch)
    start = book.take_start(job_id, worker, epoch)
    assert start is not None
    _, record = queue.complete_plain(job_id, worker, epoch, {}, start)
    assert record is not None and record.state == "completed"
    assert [k for k, _, _ in kinds(queue, job_id)] == ["claimed", "running", "completed"]


def test_a_batch_folds_each_start_and_a_fenced_item_writes_nothing(
    queue: SQLQueue, book: HeartbeatBook
) -> None:
    queue.apply_manifest(manifest_of(ONE_JOB + ONE_JOB.replace("solo", "duo")))
    worker, _ = queue.register_worker(make_cap("cpu-a"))
    queue.set_worker_slots(worker.id, 2)
    got = queue.claim_many(worker.id, 2)
    assert len(got) == 2
    starts = {}
    for c in got:
        book.expect(c.job.id, worker.id, c.epoch)
        book.answer(c.job.id, worker.id, c.epoch)
        beat = book.take_start(c.job.id, worker.id, c.epoch)
        assert beat is not None
        starts[c.job.id] = beat
    good, bad = got
    items = [(good.job.id, good.epoch, {}), (bad.job.id, bad.epoch + 1, {})]
    out = queue.complete_plain_many(worker.id, items, starts)
    assert not isinstance(out[0], Exception) and out[0][0].state == "completed"
    assert isinstance(out[1], StaleEpoch)
    assert [k for k, _, _ in kinds(queue, good.job.id)] == ["claimed", "running", "completed"]
    assert [e.kind for e in queue.events(bad.job.id)][-1] == "claimed"  # nothing written
    assert queue.get_job(bad.job.id).state == "claimed"


def test_a_claim_asked_again_after_a_beat_is_not_redelivered(
    queue: SQLQueue, book: HeartbeatBook
) -> None:
    job_id, worker, epoch = claimed(queue, book)
    book.answer(job_id, worker, epoch)
    starts = book.take_starts(worker)
    assert [b.job_id for b in starts] == [job_id]
    with pytest.raises(Conflict):  # the beat is written first: the job runs, the slot is busy
        queue.claim_many(worker, 1, starts=starts)
    for b in starts:  # the 409 rolled the beat back: the route gives it back to the book
        book.give_back(b)
    assert book.take_starts(worker) == starts


def test_a_failed_write_before_a_route_keeps_the_first_beat_for_the_next_flush(
    queue: SQLQueue, book: HeartbeatBook
) -> None:
    """``write_starts`` runs before every route but the hot six: a database that refuses the
    write (a full disk) is logged, the route still runs, and the beat is written later."""
    job_id, worker, epoch = claimed(queue, book)
    book.answer(job_id, worker, epoch)

    async def refused(fn: Any, *args: Any) -> Any:
        raise OSError("no space left on device")

    asyncio.run(book.write_starts(refused))  # does not raise: the route goes on
    assert queue.get_job(job_id).state == "claimed"
    asyncio.run(book.write_starts(direct))
    assert queue.get_job(job_id).state == "running"
    assert kinds(queue, job_id)[-1] == ("running", "claimed", "running")

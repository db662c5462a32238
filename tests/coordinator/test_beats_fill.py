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
from trainfleet.errors import Conflict
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
    assert kinds(queue, job_id)[-2:] == [
        ("running", "claimed", "running"),
        ("completed", "running", "completed"),
    ]


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

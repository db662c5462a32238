"""The heartbeat book (``coordinator.beats``): beats answered from memory, flushed in one
transaction, fenced, and paced to the fleet; the credential cache and long-poll claims
beside it. On the fake clock: no test waits for time to pass."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_api import ONE_JOB, OP, Api, assert_error, serve

from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.coordinator.auth import TokenCache
from trainfleet.coordinator.beats import HeartbeatBook, Pace
from trainfleet.errors import StaleEpoch
from trainfleet.queue import JobQueue
from trainfleet.queue.beats import Beat
from trainfleet.testing.wait import wait_until


async def direct(fn: Callable[..., Any], *args: Any) -> Any:
    """The book's ``run``: the queue call, in the test's thread."""
    return fn(*args)


def beat(book: HeartbeatBook, job_id: str, worker: str, epoch: int) -> Any:
    return asyncio.run(book.beat(job_id, worker, epoch, direct))


def flush(book: HeartbeatBook) -> int:
    return asyncio.run(book.flush(direct))


def claimed(queue: JobQueue, host: str = "cpu-a") -> tuple[str, str, int]:
    """(job id, worker id, epoch) of a fresh claim of the job 'solo'."""
    queue.apply_manifest(manifest_of(ONE_JOB))
    worker, _ = queue.register_worker(make_cap(host))
    claim = queue.claim(worker.id)
    assert claim is not None
    return claim.job.id, worker.id, claim.epoch


@pytest.fixture
def book(queue: JobQueue) -> HeartbeatBook:
    return HeartbeatBook(queue, Pace(base_interval_s=2.0, min_lease_s=8.0, budget_per_s=500))


def test_beats_are_answered_from_memory_and_written_by_the_flush(
    queue: JobQueue, book: HeartbeatBook, clock: FakeClock
) -> None:
    job_id, worker, epoch = claimed(queue)
    first = beat(book, job_id, worker, epoch)  # unknown to the book: the database answers
    assert (first.cancel, first.state) == (False, "running")
    assert queue.get_job(job_id).state == "running"
    written = queue.get_job(job_id).heartbeat_at

    clock.advance(3)
    second = beat(book, job_id, worker, epoch)
    assert second.state == "running"
    assert queue.get_job(job_id).heartbeat_at == written  # not written yet: in memory
    assert flush(book) == 1
    assert queue.get_job(job_id).heartbeat_at == clock.now  # the beat's own time
    assert flush(book) == 0  # nothing new


def test_a_flush_never_moves_a_lease_backwards(
    queue: JobQueue, book: HeartbeatBook, clock: FakeClock
) -> None:
    job_id, worker, epoch = claimed(queue)
    beat(book, job_id, worker, epoch)
    clock.advance(1)
    beat(book, job_id, worker, epoch)  # in the book at t+1
    clock.advance(1)
    assert queue.renew_leases() == 1  # a coordinator start renews to t+2
    flush(book)
    assert queue.get_job(job_id).heartbeat_at == clock.now


def test_fencing_a_stale_epoch_or_another_worker_is_refused_by_the_database(
    queue: JobQueue, book: HeartbeatBook
) -> None:
    job_id, worker, epoch = claimed(queue)
    beat(book, job_id, worker, epoch)
    with pytest.raises(StaleEpoch):
        beat(book, job_id, worker, epoch - 1)
    other, _ = queue.register_worker(make_cap("cpu-b"))
    with pytest.raises(StaleEpoch):
        beat(book, job_id, other.id, epoch)
    assert book.answer(job_id, worker, epoch) is not None  # the holder is still known


def test_a_cancel_reaches_the_worker_within_one_flush(queue: JobQueue, book: HeartbeatBook) -> None:
    job_id, worker, epoch = claimed(queue)
    beat(book, job_id, worker, epoch)
    queue.cancel(job_id)  # through another coordinator, say: this book was not told
    assert beat(book, job_id, worker, epoch).cancel is False  # still from memory
    flush(book)
    reply = beat(book, job_id, worker, epoch)
    assert (reply.cancel, reply.state) == (True, "cancelled")


def test_a_reaped_attempt_is_forgotten_at_the_flush_and_then_fenced(
    queue: JobQueue, book: HeartbeatBook, clock: FakeClock
) -> None:
    job_id, worker, epoch = claimed(queue)
    beat(book, job_id, worker, epoch)
    clock.advance(60)
    assert [j.id for j in queue.reap()] == [job_id]
    beat(book, job_id, worker, epoch)  # answered from memory until the flush
    flush(book)
    with pytest.raises(StaleEpoch):
        beat(book, job_id, worker, epoch)
    assert queue.get_job(job_id).state == "pending"


def test_heartbeat_many_is_fenced_and_marks_the_workers_seen(
    queue: JobQueue, clock: FakeClock
) -> None:
    job_id, worker, epoch = claimed(queue)
    queue.heartbeat(job_id, worker, epoch)
    clock.advance(2)
    result = queue.heartbeat_many(
        [
            Beat(job_id, worker, epoch, clock.now),
            Beat(job_id, worker, epoch + 1, clock.now),  # an epoch never issued
            Beat("f" * 64, worker, 1, clock.now),  # no such job
        ]
    )
    states = sorted((o.epoch, o.state) for o in result.outcomes if o.job_id == job_id)
    assert states == [(epoch, "running"), (epoch + 1, None)]
    assert [o.state for o in result.outcomes if o.job_id == "f" * 64] == [None]
    assert result.online_workers == 1
    assert queue.get_job(job_id).heartbeat_at == clock.now
    [w] = queue.list_workers()
    assert w.last_seen == clock.now


def test_the_interval_and_lease_scale_with_the_fleet() -> None:
    pace = Pace(base_interval_s=2.0, min_lease_s=8.0, budget_per_s=500)
    assert pace.interval_s(10) == 2.0 and pace.lease_s(2.0) == 8.0
    assert pace.interval_s(1_000) == 2.0  # the default holds up to ~1,000 workers
    assert pace.interval_s(10_000) == 20.0
    assert pace.lease_s(20.0) == 61.0  # >= 3 intervals + 1 s


def test_a_longer_lease_applies_at_once_and_a_shorter_one_only_after_a_lease(
    queue: JobQueue, book: HeartbeatBook, clock: FakeClock
) -> None:
    assert (book.interval_s, book.lease_s) == (2.0, 8.0)
    assert queue.settings.heartbeat_timeout_s == 8.0  # what the reaper uses
    book.pace_for(10_000, clock.now)
    assert (book.interval_s, book.lease_s) == (20.0, 61.0)
    assert queue.settings.heartbeat_timeout_s == 61.0
    assert queue.settings.offline_after_s >= 2 * 61.0  # beating workers never look offline
    job_id, worker, epoch = claimed(queue)
    reply = beat(book, job_id, worker, epoch)
    assert (reply.heartbeat_interval_s, reply.heartbeat_timeout_s) == (20.0, 61.0)

    book.pace_for(10, clock.now)  # the fleet shrank: workers still beat every 20 s
    assert book.lease_s == 61.0
    clock.advance(60)
    book.pace_for(10, clock.now)
    assert book.lease_s == 61.0
    clock.advance(2)
    book.pace_for(10, clock.now)
    assert (book.interval_s, book.lease_s) == (2.0, 8.0)
    assert queue.settings.heartbeat_timeout_s == 8.0


def test_the_token_cache_expires_and_a_clear_beats_a_lookup_in_flight(clock: FakeClock) -> None:
    cache = TokenCache(ttl_s=1.0, clock=clock)
    cache.put("worker", "tok", "w-1", cache.generation)
    assert cache.get("worker", "tok") == "w-1"
    assert cache.get("host", "tok") is None  # kinds are apart
    clock.advance(1.0)
    assert cache.get("worker", "tok") is None  # another coordinator's revoke: seen in 1 s
    generation = cache.generation  # a lookup begins...
    cache.clear()  # ...a revoke commits meanwhile...
    cache.put("worker", "tok", "w-1", generation)  # ...its answer is not kept
    assert cache.get("worker", "tok") is None and len(cache) == 0


def test_a_revoked_worker_is_refused_at_once_despite_the_cache(api: Api) -> None:
    worker, job_id = api.claimed()
    assert api.http.post(
        f"/v1/jobs/{job_id}/heartbeat", json={"epoch": 1}, headers=worker.auth
    ).is_success
    assert api.coord.tokens.get("worker", worker.token) == worker.id  # cached
    assert api.http.post(f"/v1/workers/{worker.id}/revoke", headers=OP).is_success
    r = api.http.post(f"/v1/jobs/{job_id}/heartbeat", json={"epoch": 1}, headers=worker.auth)
    assert_error(r, 401, "unauthorized")


def test_a_long_poll_claim_is_answered_when_work_arrives(tmp_path: Path, clock: FakeClock) -> None:
    with serve(tmp_path, clock) as api:
        worker = api.register()
        got: list[Any] = []
        asked = threading.Thread(
            target=lambda: got.append(
                api.http.post("/v1/workers/claim", json={"wait_s": 30}, headers=worker.auth)
            )
        )
        asked.start()
        try:  # the claim found nothing and waits...
            wait_until(lambda: api.coord.work.waiting == 1, 10, "the claim to wait")
            assert not got
        finally:  # ...until the reload wakes it
            api.reload(ONE_JOB)
            asked.join(20)
        assert got and got[0].status_code == 200
        assert got[0].json()["claim"]["job"]["name"] == "solo"


def test_a_waiting_long_poll_answers_null_when_shutdown_begins(
    tmp_path: Path, clock: FakeClock
) -> None:
    """uvicorn's graceful shutdown waits for requests in flight: ``serve`` closes the work
    signal first (``server._Server.handle_exit``), so a waiting claim answers at once."""
    with serve(tmp_path, clock) as api:
        worker = api.register()
        got: list[Any] = []
        asked = threading.Thread(
            target=lambda: got.append(
                api.http.post("/v1/workers/claim", json={"wait_s": 30}, headers=worker.auth)
            )
        )
        asked.start()
        try:
            wait_until(lambda: api.coord.work.waiting == 1, 10, "the claim to wait")
        finally:
            api.coord.work.close()
            asked.join(20)
        assert got and got[0].status_code == 200 and got[0].json() == {"claim": None}
        assert api.coord.work.waiting == 0
        # and a claim that arrives after shutdown began does not wait at all
        r = api.http.post("/v1/workers/claim", json={"wait_s": 30}, headers=worker.auth)
        assert r.status_code == 200 and r.json() == {"claim": None}


def test_a_long_poll_with_nothing_to_claim_answers_null_and_a_bad_wait_is_a_400(
    api: Api,
) -> None:
    worker = api.register()
    r = api.http.post("/v1/workers/claim", json={"wait_s": 0.2}, headers=worker.auth)
    assert r.status_code == 200 and r.json() == {"claim": None}
    for body in ({"wait_s": 31}, {"wait_s": -1}, {"wait_s": "x"}, {"other": 1}):
        r = api.http.post("/v1/workers/claim", json=body, headers=worker.auth)
        assert_error(r, 400, "bad_request")


def test_a_big_flush_is_written_in_chunks_and_a_failed_chunk_keeps_its_beats_and_the_rest(
    queue: JobQueue, book: HeartbeatBook, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More beats than ``FLUSH_CHUNK`` go to the database in several transactions, so no one
    of them holds the writer for the whole flush; a chunk that fails keeps its beats and
    every later one for the next flush, and the chunks before it stay written."""
    from trainfleet.coordinator import beats as beats_module

    monkeypatch.setattr(beats_module, "FLUSH_CHUNK", 2)
    jobs = "\n".join(f'[[jobs]]\nname = "j{i}"' for i in range(5))
    queue.apply_manifest(manifest_of(jobs))
    held = []
    for i in range(5):
        worker, _ = queue.register_worker(make_cap(f"h{i}"))
        claim = queue.claim(worker.id)
        assert claim is not None
        held.append((claim.job.id, worker.id, claim.epoch))
        beat(book, claim.job.id, worker.id, claim.epoch)  # the database answers: running
    clock.advance(3)
    for job_id, worker, epoch in held:
        beat(book, job_id, worker, epoch)  # in memory now
    sizes: list[int] = []
    real = queue.heartbeat_many

    def failing_third(chunk: list[Beat]) -> Any:
        sizes.append(len(chunk))
        if len(sizes) == 2:
            raise RuntimeError("the disk is full")
        return real(chunk)

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return failing_third(*args) if fn == queue.heartbeat_many else fn(*args)

    with pytest.raises(RuntimeError, match="disk is full"):
        asyncio.run(book.flush(run))
    written = [queue.get_job(j).heartbeat_at == clock.now for j, _, _ in held]
    assert sum(written) == 2  # the first chunk; the second failed and the third never ran
    sizes.clear()
    assert flush(book) == 3  # the failed chunk's beats and the rest: kept for the next flush
    assert all(queue.get_job(j).heartbeat_at == clock.now for j, _, _ in held)

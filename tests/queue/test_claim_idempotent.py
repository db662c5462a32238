"""Claims and reports are idempotent: a worker whose reply was lost asks again and gets what
it already has; a worker still running a job is told which one it holds."""

from __future__ import annotations

import pytest

from fleetkit import make_cap, manifest_of
from trainfleet.errors import Conflict
from trainfleet.queue import JobQueue

TWO_JOBS = '[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"'


def register(queue: JobQueue, host: str = "cpu-a") -> str:
    worker, _ = queue.register_worker(make_cap(host))
    return worker.id


def test_asking_again_before_any_heartbeat_returns_the_same_claim(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(TWO_JOBS))
    w = register(queue)
    first = queue.claim(w)
    assert first is not None
    again = queue.claim(w)  # the first reply was lost on the way back
    assert again is not None
    assert (again.job.id, again.epoch, again.attempt) == (first.job.id, first.epoch, 1)
    job = queue.get_job(first.job.id)
    assert job.attempt == 1 and job.epoch == first.epoch and job.state == "claimed"
    kinds = [e.kind for e in queue.events(first.job.id)]
    assert kinds.count("claimed") == 1 and kinds.count("redelivered") == 1
    # The other job was not taken, and the re-delivered claim works as the first would.
    assert queue.get_job("b").state == "pending"
    queue.heartbeat(again.job.id, w, again.epoch)
    assert queue.complete(again.job.id, w, again.epoch, {}).attempt == 1


def test_a_worker_running_a_job_is_told_which_one_it_holds(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(TWO_JOBS))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    queue.heartbeat(c.job.id, w, c.epoch)
    with pytest.raises(Conflict, match="still holds") as info:
        queue.claim(w)
    assert info.value.details == {"job_id": c.job.id, "epoch": c.epoch, "state": "running"}
    # Failing the held job (what the worker does on this 409) frees it to claim again.
    queue.fail(c.job.id, w, c.epoch, "lost track", retryable=True, release=False)
    nxt = queue.claim(w)
    assert nxt is not None and nxt.epoch > 0


def test_another_worker_never_gets_someone_elses_claim(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "only"'))
    a, b = register(queue, "a"), register(queue, "b")
    assert queue.claim(a) is not None
    assert queue.claim(b) is None


def test_a_repeated_complete_whose_reply_was_lost_is_accepted_once(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "only"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    queue.heartbeat(c.job.id, w, c.epoch)
    result = {"metrics": {"loss": 1.0}}
    first = queue.complete(c.job.id, w, c.epoch, result)
    again = queue.complete(c.job.id, w, c.epoch, result)  # the worker retried
    assert again.state == first.state == "completed"
    assert [e.kind for e in queue.events(c.job.id)].count("completed") == 1
    with pytest.raises(Conflict):  # a different result is no repeat
        queue.complete(c.job.id, w, c.epoch, {"metrics": {"loss": 0.0}})


def test_a_repeated_upload_records_the_artifact_once(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "only"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    sha = "ab" * 32
    first = queue.record_artifact(c.job.id, w, c.epoch, sha, 10, "outputs.tar.zst")
    again = queue.record_artifact(c.job.id, w, c.epoch, sha, 10, "outputs.tar.zst")
    assert again == first
    assert [a.sha256 for a in queue.artifacts(c.job.id)] == [sha]

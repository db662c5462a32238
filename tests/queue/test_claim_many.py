"""Batch claims and completions at the queue, on every backend: ``claim_many`` is bounded by
the worker's slots, and ``complete_many`` completes each item in its own savepoint, so a
fenced item is rolled back alone while the others commit."""

from __future__ import annotations

from fleetkit import make_cap, manifest_of
from trainfleet.errors import NotFound, StaleEpoch
from trainfleet.queue import JobQueue

JOBS = "\n".join(f'[[jobs]]\nname = "j{i}"' for i in range(4))


def test_claim_many_is_bounded_by_slots(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    one, _ = queue.register_worker(make_cap("cpu-a"))
    three, _ = queue.register_worker(make_cap("cpu-b"))
    queue.set_worker_slots(three.id, 3)
    assert [c.job.name for c in queue.claim_many(one.id, 4)] == ["j0"]
    assert [c.job.name for c in queue.claim_many(three.id, 4)] == ["j1", "j2", "j3"]


def test_complete_many_rolls_back_a_refused_item_alone(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    w, _ = queue.register_worker(make_cap("cpu-a"))
    queue.set_worker_slots(w.id, 3)
    got = queue.claim_many(w.id, 3)
    for c in got:
        queue.heartbeat(c.job.id, w.id, c.epoch)
    items = [(c.job.id, c.epoch, {"metrics": {"i": n}}) for n, c in enumerate(got)]
    items[1] = (got[1].job.id, got[1].epoch + 1, {})  # not this attempt's epoch
    items.append(("f" * 64, 1, {}))
    out = queue.complete_many(w.id, items)
    assert isinstance(out[1], StaleEpoch) and isinstance(out[3], NotFound)
    assert [getattr(r, "state", None) for r in out] == ["completed", None, "completed", None]
    assert queue.get_job("j0").result == {"metrics": {"i": 0}}
    assert queue.get_job("j1").state == "running"
    assert queue.get_job("j2").state == "completed"

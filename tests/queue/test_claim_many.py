"""Batch claims and completions at the queue, on every backend: ``claim_many`` is bounded by
the worker's slots, and ``complete_many`` completes each item in its own savepoint, so a
fenced item is rolled back alone while the others commit."""

from __future__ import annotations

from fleetkit import make_cap, manifest_of
from trainfleet.errors import NotFound, StaleEpoch, Unauthorized
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


def test_heartbeat_each_refuses_a_fenced_beat_alone_and_marks_the_worker_seen(
    queue: JobQueue,
) -> None:
    """A clean batch runs in one savepoint; one refused beat reruns the batch a savepoint
    per item: the others still move to running, with one event each."""
    each = getattr(queue, "heartbeat_each", None)
    if each is None:
        return  # a queue without batch beats
    queue.apply_manifest(manifest_of(JOBS))
    w, _ = queue.register_worker(make_cap("cpu-a"))
    queue.set_worker_slots(w.id, 3)
    got = queue.claim_many(w.id, 3)
    items = [(c.job.id, c.epoch) for c in got]
    items[1] = (got[1].job.id, got[1].epoch + 1)
    out = each(w.id, items)
    assert isinstance(out[1], StaleEpoch)
    assert [getattr(r, "state", None) for r in out] == ["running", None, "running"]
    assert [queue.get_job(f"j{i}").state for i in range(3)] == ["running", "claimed", "running"]
    assert [e.kind for e in queue.events(got[0].job.id)].count("running") == 1
    again = each(w.id, [(c.job.id, c.epoch) for c in got])  # a clean batch: all ok
    assert [getattr(r, "state", None) for r in again] == ["running"] * 3
    assert [e.kind for e in queue.events(got[0].job.id)].count("running") == 1


def test_heartbeat_each_of_a_revoked_worker_refuses_every_beat(queue: JobQueue) -> None:
    each = getattr(queue, "heartbeat_each", None)
    if each is None:
        return
    queue.apply_manifest(manifest_of(JOBS))
    w, _ = queue.register_worker(make_cap("cpu-a"))
    queue.set_worker_slots(w.id, 2)
    got = queue.claim_many(w.id, 2)
    queue.revoke_worker(w.id)
    out = each(w.id, [(c.job.id, c.epoch) for c in got])
    assert all(isinstance(r, Unauthorized) for r in out)


def test_a_worker_claiming_several_jobs_holds_the_last_as_its_current_job(
    queue: JobQueue,
) -> None:
    queue.apply_manifest(manifest_of(JOBS))
    w, _ = queue.register_worker(make_cap("cpu-a"))
    queue.set_worker_slots(w.id, 3)
    got = queue.claim_many(w.id, 3)
    current = {r.id: r.current_job for r in queue.list_workers()}[w.id]
    assert current == got[-1].job.id


def test_batches_write_each_jobs_events_as_one_by_one_calls_do(queue: JobQueue) -> None:
    """Batched claims, beats and completions write their events together (issue 9): each job
    still shows exactly the events, in the order, of a job claimed, beaten and completed
    alone, a refused item rolls back alone, and the worker's slot is freed."""
    if getattr(queue, "complete_plain_many", None) is None:
        return  # a queue without batch completions
    queue.apply_manifest(manifest_of(JOBS))
    w, _ = queue.register_worker(make_cap("cpu-a"))
    alone = queue.claim_many(w.id, 1)[0]
    queue.heartbeat(alone.job.id, w.id, alone.epoch)
    queue.complete_plain(alone.job.id, w.id, alone.epoch, {}, None)
    queue.set_worker_slots(w.id, 3)
    got = queue.claim_many(w.id, 3)
    queue.heartbeat_each(w.id, [(c.job.id, c.epoch) for c in got])
    clean = queue.complete_plain_many(w.id, [(c.job.id, c.epoch, {}) for c in got[::2]], {})
    assert not any(isinstance(r, Exception) for r in clean)
    # refused: the batch reruns item by item
    items = [(got[1].job.id, got[1].epoch + 1, {}), (got[1].job.id, got[1].epoch, {})]
    out = queue.complete_plain_many(w.id, items, {})
    assert isinstance(out[0], StaleEpoch) and not isinstance(out[1], Exception)

    def story(job_id: str) -> list[tuple[str, str | None, str | None, int | None]]:
        return [(e.kind, e.from_state, e.to_state, e.epoch) for e in queue.events(job_id)]

    expected = story(alone.job.id)
    assert [k for k, *_ in expected][-3:] == ["claimed", "running", "completed"]
    for c in got:
        assert story(c.job.id) == expected
        assert queue.get_job(c.job.id).state == "completed"
    assert {r.id: r.current_job for r in queue.list_workers()}[w.id] is None


def test_a_claim_pages_past_many_rows_its_host_denies_to_the_one_it_may_take(
    queue: JobQueue,
) -> None:
    """On PostgreSQL the claim's scan reads pending rows in pages (``claims._pending``); a
    claimant whose host denies the first 60 rows in claim order still gets the job after
    them, and the jobs it skipped stay pending for the others."""
    blocked = "\n".join(f'[[jobs]]\nname = "blocked-{i:02d}"\npriority = 5' for i in range(60))
    queue.apply_manifest(
        manifest_of(
            blocked
            + '\n[[jobs]]\nname = "open"\npriority = 1'
            + '\n[hosts.cpu-a]\ndeny_jobs = ["blocked-*"]'
        )
    )
    worker, _ = queue.register_worker(make_cap("cpu-a"))
    claim = queue.claim(worker.id)
    assert claim is not None and claim.job.name == "open"
    other, _ = queue.register_worker(make_cap("cpu-b"))
    names = [c.job.name for c in queue.claim_many(other.id, 1)]
    assert names == ["blocked-00"]  # claim order kept across the pages
    assert queue.counts()["pending"] == 59


def test_insert_events_past_one_statements_worth_keeps_every_event_in_order(
    queue: JobQueue,
) -> None:
    """A group commit can gather thousands of events (32 batch claims of 64 jobs): they go
    in as several multi-row INSERTs, every one kept, in order."""
    from trainfleet.queue.sqlite_schema import MAX_EVENTS_PER_INSERT, insert_events

    queue.apply_manifest(manifest_of(JOBS))
    job = queue.get_job("j0")
    n = 2 * MAX_EVENTS_PER_INSERT + 3
    rows = [(1.0 + i, job.id, "note", None, None, None, None, f"n{i}") for i in range(n)]
    db = queue.db  # type: ignore[attr-defined]
    with db.tx() as conn:
        insert_events(conn, rows)
    notes = [e.detail for e in queue.events(job.id) if e.kind == "note"]
    assert notes == [f"n{i}" for i in range(n)]

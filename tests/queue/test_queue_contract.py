"""The queue contract, written once and run against every backend (see ``make_queue``)."""

from __future__ import annotations

import threading

import pytest

from fleetkit import make_cap, manifest_of
from trainfleet.errors import BadRequest, Conflict, NotFound, StaleEpoch, Unauthorized
from trainfleet.queue import JobQueue

SWEEP = """
[defaults]
hyper = { steps = 5 }
[[jobs]]
name = "low"
priority = 0
[[jobs]]
name = "high"
priority = 10
[[jobs]]
name = "mid-1"
priority = 5
[[jobs]]
name = "mid-2"
priority = 5
"""


def register(queue: JobQueue, host: str = "cpu-a", **kw) -> str:
    worker, token = queue.register_worker(make_cap(host, **kw))
    assert queue.authenticate_worker(token) == worker.id
    return worker.id


def run_to_completion(queue: JobQueue, worker: str) -> str:
    claim = queue.claim(worker)
    assert claim is not None
    queue.heartbeat(claim.job.id, worker, claim.epoch)
    queue.complete(claim.job.id, worker, claim.epoch, {"metrics": {"loss": 1.0}})
    return claim.job.name


def test_claim_order_is_priority_then_fifo(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(SWEEP))
    w = register(queue)
    order = [run_to_completion(queue, w) for _ in range(4)]
    assert order == ["high", "mid-1", "mid-2", "low"]
    assert queue.claim(w) is None
    assert queue.counts() == {"completed": 4}


def test_concurrent_claims_never_share_a_job(make_queue) -> None:
    queue = make_queue()
    jobs = "\n".join(f'[[jobs]]\nname = "j{i}"\nhyper = {{ steps = 5 }}' for i in range(40))
    queue.apply_manifest(manifest_of(jobs))
    workers = [register(queue, f"h{i}") for i in range(8)]
    claimed: list[str] = []
    lock = threading.Lock()

    def drain(w: str) -> None:
        while (c := queue.claim(w)) is not None:
            with lock:
                claimed.append(c.job.id)
            queue.complete(c.job.id, w, c.epoch, {})

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(claimed) == 40
    assert len(set(claimed)) == 40


def test_constraints_are_checked_inside_the_claim(queue: JobQueue) -> None:
    queue.apply_manifest(
        manifest_of(
            """
[[jobs]]
name = "needs-gpu"
require_cuda = true
min_vram_gib = 24
[[jobs]]
name = "needs-ram"
min_ram_gib = 64
[[jobs]]
name = "needs-cores"
min_cores = 8
"""
        )
    )
    small = register(queue, "small", cores=4, ram_gib=16)
    assert queue.claim(small) is None
    small_gpu = register(queue, "small-gpu", cuda=True, vram_gib=12, cores=16, ram_gib=128)
    claim = queue.claim(small_gpu)
    assert claim is not None and claim.job.name in {"needs-ram", "needs-cores"}
    big_gpu = register(queue, "big-gpu", cuda=True, vram_gib=80, cores=16, ram_gib=128)
    names = set()
    while (c := queue.claim(big_gpu)) is not None:
        names.add(c.job.name)
        queue.complete(c.job.id, big_gpu, c.epoch, {})
    assert "needs-gpu" in names


def test_host_policy_allow_deny_and_declared_gpu_corrected(queue: JobQueue) -> None:
    queue.apply_manifest(
        manifest_of(
            """
[hosts.gpu-box]
cuda = true
vram_gib = 24
[hosts.cpu-a]
allow_jobs = ["small-*"]
deny_jobs = ["small-secret"]
[[jobs]]
name = "small-secret"
[[jobs]]
name = "big"
[[jobs]]
name = "gpu-only"
require_cuda = true
"""
        )
    )
    a = register(queue, "cpu-a")
    assert queue.claim(a) is None  # allow list admits small-*, deny wins for small-secret
    # gpu-box declares a GPU, but the worker detected none: it is CPU-only.
    box = register(queue, "gpu-box")
    worker = next(w for w in queue.list_workers() if w.id == box)
    assert worker.effective.cuda is False
    assert any("no CUDA device was detected" in n for n in worker.notes)
    claimed = []
    while (c := queue.claim(box)) is not None:
        claimed.append(c.job.name)
        queue.complete(c.job.id, box, c.epoch, {})
    assert sorted(claimed) == ["big", "small-secret"]
    assert queue.get_job("gpu-only").state == "pending"


def test_prefer_cuda_waits_for_a_cuda_host_then_falls_back(queue: JobQueue, clock) -> None:
    queue.apply_manifest(
        manifest_of(
            """
[defaults]
prefer_cuda_wait_s = 30
[[jobs]]
name = "fast-on-gpu"
prefer_cuda = true
"""
        )
    )
    cpu = register(queue, "cpu-a")
    assert queue.claim(cpu) is None
    assert "prefers CUDA" in queue.explain("fast-on-gpu")["message"]
    clock.advance(31)
    claim = queue.claim(cpu)
    assert claim is not None and claim.job.name == "fast-on-gpu"


def test_prefer_cuda_goes_to_a_cuda_host_at_once(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "p"\nprefer_cuda = true'))
    gpu = register(queue, "gpu", cuda=True, vram_gib=16)
    claim = queue.claim(gpu)
    assert claim is not None


def test_lower_priority_host_yields_to_idle_higher_priority_host(queue: JobQueue, clock) -> None:
    queue.apply_manifest(
        manifest_of(
            """
[hosts.big]
priority = 10
[hosts.small]
[[jobs]]
name = "j"
"""
        )
    )
    big = register(queue, "big")
    small = register(queue, "small")
    assert queue.claim(small) is None
    assert "yields to idle higher-priority host big" in queue.explain("j")["message"]
    # Once the big host has not been seen for the idle window, nobody waits for it.
    clock.advance(6)
    claim = queue.claim(small)
    assert claim is not None
    assert big != small


def test_epoch_fencing_refuses_stale_writes(queue: JobQueue, clock) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"'))
    a = register(queue, "a")
    b = register(queue, "b")
    first = queue.claim(a)
    assert first is not None
    clock.advance(11)  # a's heartbeats stop: the job is requeued
    second = queue.claim(b)
    assert second is not None and second.epoch == first.epoch + 1
    for call in (
        lambda: queue.heartbeat(first.job.id, a, first.epoch),
        lambda: queue.append_log(first.job.id, a, first.epoch, ["late"]),
        lambda: queue.record_artifact(first.job.id, a, first.epoch, "0" * 64, 1, "out"),
        lambda: queue.complete(first.job.id, a, first.epoch, {}),
        lambda: queue.fail(first.job.id, a, first.epoch, "boom"),
    ):
        with pytest.raises(StaleEpoch):
            call()
    queue.complete(second.job.id, b, second.epoch, {"metrics": {"x": 1}})
    job = queue.get_job("j")
    assert job.state == "completed" and job.worker_id == b and job.result == {"metrics": {"x": 1}}


def test_missed_heartbeats_requeue_then_fail_after_max_failures(queue: JobQueue, clock) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 2'))
    w = register(queue)
    c1 = queue.claim(w)
    assert c1 is not None
    clock.advance(5)
    queue.heartbeat(c1.job.id, w, c1.epoch)
    clock.advance(9)
    assert queue.reap() == []  # 9 s since the last heartbeat: inside the 10 s bound
    clock.advance(2)
    reaped = queue.reap()
    assert [j.state for j in reaped] == ["pending"]
    c2 = queue.claim(w)
    assert c2 is not None and c2.attempt == 2
    clock.advance(11)
    assert [j.state for j in queue.reap()] == ["failed"]
    job = queue.get_job("j")
    assert job.num_failures == 2 and "no heartbeat" in (job.error or "")
    kinds = [e.kind for e in queue.events(job.id)]
    assert kinds == ["added", "claimed", "running", "lost", "claimed", "lost"]


def test_attempt_timeout_is_enforced_by_the_coordinator(queue: JobQueue, clock) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\ntimeout_s = 20\nmax_failures = 1'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    for _ in range(4):  # heartbeats keep coming, but the attempt overruns its timeout
        clock.advance(9)
        queue.heartbeat(c.job.id, w, c.epoch)
    assert [j.state for j in queue.reap()] == ["failed"]
    assert "timed out" in (queue.get_job("j").error or "")


def test_fail_retries_until_max_failures_and_release_does_not_count(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 2'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    assert queue.fail(c.job.id, w, c.epoch, "shutting down", release=True).state == "pending"
    c = queue.claim(w)
    assert c is not None
    assert queue.fail(c.job.id, w, c.epoch, "exit 1").state == "pending"
    c = queue.claim(w)
    assert c is not None
    job = queue.fail(c.job.id, w, c.epoch, "exit 1")
    assert job.state == "failed" and job.num_failures == 2 and job.attempt == 3


def test_non_retryable_failure_fails_at_once(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 5'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    assert queue.fail(c.job.id, w, c.epoch, "bad config", retryable=False).state == "failed"


def test_cancel_is_seen_at_heartbeat_and_completion_refused(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    assert queue.heartbeat(c.job.id, w, c.epoch).cancel is False
    queue.cancel("j")
    assert queue.heartbeat(c.job.id, w, c.epoch).cancel is True
    with pytest.raises(Conflict, match="cancelled"):
        queue.complete(c.job.id, w, c.epoch, {})
    assert queue.get_job("j").state == "cancelled"
    with pytest.raises(Conflict):
        queue.cancel("j")
    assert queue.claim(w) is None  # the worker is free again and nothing is pending


def test_requeue_fences_off_the_running_worker(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    queue.requeue("j")
    with pytest.raises(StaleEpoch):
        queue.complete(c.job.id, w, c.epoch, {})
    c2 = queue.claim(w)
    assert c2 is not None and c2.epoch > c.epoch
    queue.complete(c2.job.id, w, c2.epoch, {})
    assert queue.requeue("j").state == "pending"  # a finished job may be run again


def test_reload_is_idempotent_and_changes_nothing_that_ran(queue: JobQueue) -> None:
    m1 = manifest_of(SWEEP)
    plan = queue.apply_manifest(m1)
    assert len(plan.added) == 4 and plan.applied
    w = register(queue)
    run_to_completion(queue, w)  # "high" ran
    again = queue.apply_manifest(m1)
    assert again.added == [] and again.changed == [] and again.removed == []
    assert len(again.kept) == 4
    ran = queue.get_job("high")
    assert ran.state == "completed" and ran.result == {"metrics": {"loss": 1.0}}

    m2 = manifest_of(
        SWEEP.replace('name = "low"\npriority = 0', 'name = "low"\npriority = 99').replace(
            '[[jobs]]\nname = "mid-2"\npriority = 5', '[[jobs]]\nname = "new"'
        )
    )
    preview = queue.apply_manifest(m2, dry_run=True)
    assert not preview.applied
    assert [e.name for e in preview.added] == ["new"]
    assert [e.name for e in preview.changed] == ["low"]
    assert preview.changed[0].changes == {"priority": [0, 99]}
    assert [e.name for e in preview.removed] == ["mid-2"]
    assert queue.get_job("low").priority == 0  # the dry run changed nothing
    with pytest.raises(NotFound):
        queue.get_job("new")

    queue.apply_manifest(m2)
    assert queue.get_job("low").priority == 99
    removed = queue.get_job("mid-2")
    assert removed.state == "pending" and not removed.in_manifest  # stays, not claimable
    assert queue.get_job("high").state == "completed"


def test_changing_a_hyperparameter_makes_a_new_job(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nhyper = { lr = 0.1 }'))
    plan = queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nhyper = { lr = 0.2 }'))
    assert len(plan.added) == 1 and len(plan.removed) == 1


def test_artifacts_are_bound_to_the_attempt(queue: JobQueue) -> None:
    plan = queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"'))
    w = register(queue, "cpu-a")
    c = queue.claim(w)
    assert c is not None
    rec = queue.record_artifact(c.job.id, w, c.epoch, "a" * 64, 123, "outputs.tar.zst")
    assert (rec.attempt, rec.epoch, rec.worker_id) == (1, c.epoch, w)
    assert rec.manifest_hash == plan.manifest_hash
    assert rec.capability.host == "cpu-a"
    assert queue.artifacts(c.job.id) == [rec]


def test_logs_are_fenced_and_ordered(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    queue.append_log(c.job.id, w, c.epoch, ["one", "two"])
    queue.append_log(c.job.id, w, c.epoch, ["three"])
    lines = queue.logs(c.job.id)
    assert [x.line for x in lines] == ["one", "two", "three"]
    assert [x.line for x in queue.logs(c.job.id, after_seq=lines[1].seq)] == ["three"]


def test_explain_names_missing_requirements_and_offline_hosts(queue: JobQueue) -> None:
    queue.apply_manifest(
        manifest_of(
            """
[hosts.cpu-a]
[hosts.gpu-box]
cuda = true
vram_gib = 48
deny_jobs = ["big-*"]
[[jobs]]
name = "big-gpu"
require_cuda = true
min_vram_gib = 24
"""
        )
    )
    register(queue, "cpu-a")
    message = queue.explain("big-gpu")["message"]
    assert "needs CUDA >= 24 GiB" in message
    assert "eligible hosts: none online" in message
    assert "cpu-a" in message and "needs CUDA" in message
    assert "gpu-box (offline): denied by deny_jobs pattern 'big-*'" in message


def test_get_job_by_name_prefix_and_errors(queue: JobQueue) -> None:
    plan = queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"'))
    jid = plan.added[0].id
    assert queue.get_job(jid).name == "j"
    assert queue.get_job(jid[:8]).id == jid
    with pytest.raises(NotFound):
        queue.get_job("nope")


def test_unknown_and_deregistered_credentials_are_refused(queue: JobQueue) -> None:
    with pytest.raises(Unauthorized):
        queue.authenticate_worker("not-a-token")
    worker, token = queue.register_worker(make_cap("a"))
    queue.deregister_worker(worker.id)
    with pytest.raises(Unauthorized):
        queue.authenticate_worker(token)


def test_a_worker_cannot_hold_two_jobs(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "a"\n[[jobs]]\nname = "b"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    queue.heartbeat(c.job.id, w, c.epoch)  # running: asking again is no lost reply
    with pytest.raises(Conflict, match="still holds"):
        queue.claim(w)


def test_a_coordinator_restart_renews_leases_instead_of_blaming_workers(
    queue: JobQueue, clock
) -> None:
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None
    clock.advance(60)  # the coordinator was down for a minute: no heartbeat could land
    assert queue.renew_leases() == 1
    assert queue.reap() == []
    queue.heartbeat(c.job.id, w, c.epoch)
    assert queue.complete(c.job.id, w, c.epoch, {}).attempt == 1


# --- reload semantics: an edited job's old version never runs ahead of the new one ---------

LR1 = '[[jobs]]\nname = "j"\npriority = 5\nhyper = { lr = 0.1 }\n[[jobs]]\nname = "other"\n'
LR2 = '[[jobs]]\nname = "j"\nhyper = { lr = 0.2 }\n[[jobs]]\nname = "other"\n'


def test_an_edited_job_replaces_its_old_version_in_the_claim_order(queue: JobQueue) -> None:
    old_id = queue.apply_manifest(manifest_of(LR1)).added[0].id
    plan = queue.apply_manifest(manifest_of(LR2))
    new_id = plan.added[0].id
    assert new_id != old_id and [e.id for e in plan.removed] == [old_id]
    w = register(queue)
    # The old version (priority 5, pending) used to be claimed first; now it is not claimable.
    claimed = []
    while (c := queue.claim(w)) is not None:
        claimed.append(c.job.id)
        queue.complete(c.job.id, w, c.epoch, {})
    assert old_id not in claimed and new_id in claimed and len(claimed) == 2
    old = queue.get_job(old_id)
    assert old.state == "pending" and not old.in_manifest and not old.pinned  # still visible
    assert "not claimable" in queue.explain(old_id)["message"]
    removed = [e for e in queue.events(old_id) if e.kind == "removed"]
    assert len(removed) == 1 and "not claimable unless requeued" in removed[0].detail


def test_requeue_of_a_removed_job_pins_it_and_makes_it_claimable(queue: JobQueue) -> None:
    old_id = queue.apply_manifest(manifest_of(LR1)).added[0].id
    queue.apply_manifest(manifest_of(LR2))
    w = register(queue)
    for _ in range(2):
        c = queue.claim(w)
        assert c is not None and c.job.id != old_id
        queue.complete(c.job.id, w, c.epoch, {})
    assert queue.claim(w) is None
    pinned = queue.requeue(old_id)
    assert pinned.state == "pending" and pinned.pinned and not pinned.in_manifest
    assert "pinned" in queue.events(old_id)[-1].detail
    with pytest.raises(Conflict, match="already pending"):
        queue.requeue(old_id)  # a second requeue has nothing left to do
    # A later reload that still leaves it out does not unpin it...
    queue.apply_manifest(manifest_of(LR2))
    assert queue.get_job(old_id).pinned
    c = queue.claim(w)
    assert c is not None and c.job.id == old_id
    queue.complete(c.job.id, w, c.epoch, {})
    # ...and one that adds it back clears the pin: it is an ordinary job again.
    back = queue.apply_manifest(manifest_of(LR1))
    assert [e.id for e in back.changed if e.id == old_id] == [old_id]
    again = queue.get_job(old_id)
    assert again.in_manifest and not again.pinned


def test_a_removed_job_that_fails_after_removal_is_not_claimed_again(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(LR1))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None and c.job.name == "j"
    queue.apply_manifest(manifest_of(LR2))  # removed while running: the attempt carries on
    assert queue.heartbeat(c.job.id, w, c.epoch).state == "running"
    assert queue.fail(c.job.id, w, c.epoch, "exit 1").state == "pending"
    nxt = queue.claim(w)
    assert nxt is not None and nxt.job.id != c.job.id


def test_a_name_resolves_to_the_job_in_the_current_manifest(queue: JobQueue) -> None:
    old_id = queue.apply_manifest(manifest_of(LR1)).added[0].id
    new_id = queue.apply_manifest(manifest_of(LR2)).added[0].id
    assert queue.get_job("j").id == new_id  # was: BadRequest "'j' is ambiguous"
    assert [r.id for r in queue.same_name(new_id)] == [old_id]
    assert [(r.id, r.in_manifest) for r in queue.same_name(old_id)] == [(new_id, True)]
    assert queue.same_name(queue.get_job("other").id) == []
    # Operator commands by name act on the current job too.
    assert queue.cancel("j").id == new_id
    assert queue.get_job(old_id).state == "pending"


def test_a_name_no_current_job_has_is_still_ambiguous(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(LR1))
    queue.apply_manifest(manifest_of(LR2))
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "other"\n'))  # both "j" removed
    with pytest.raises(BadRequest, match="ambiguous"):
        queue.get_job("j")


def test_max_failures_counts_failures_not_claims(queue: JobQueue, clock) -> None:
    # A hand-back counts as an attempt (a claim) but not as a failure; the limit reads the
    # failures, under the name that says so.
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\nmax_failures = 1\n'))
    w = register(queue)
    for _ in range(3):
        c = queue.claim(w)
        assert c is not None
        queue.fail(c.job.id, w, c.epoch, "shutting down", release=True)
    c = queue.claim(w)
    assert c is not None
    job = queue.fail(c.job.id, w, c.epoch, "exit 1")
    assert (job.state, job.attempt, job.num_failures) == ("failed", 4, 1)
    assert "1/1 failures" in queue.events(job.id)[-1].detail


def test_reload_plan_carries_the_manifest_warnings(queue: JobQueue) -> None:
    plan = queue.apply_manifest(
        manifest_of('[hosts.h]\nallow_jobs = ["nope-*"]\n[[jobs]]\nname = "j"\n'), dry_run=True
    )
    assert plan.warnings == ["hosts.h.allow_jobs: pattern 'nope-*' matches no job"]


def test_heartbeats_mark_the_worker_seen_once_a_second_and_revocation_still_fences(
    queue: JobQueue, clock
) -> None:
    """A heartbeat writes the worker's last_seen at most once every ``SEEN_EVERY_S``; a beat
    skipped that write is still fenced: a revoked worker's next beat is refused."""
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "j"\n[[jobs]]\nname = "k"'))
    w = register(queue)
    c = queue.claim(w)
    assert c is not None

    def last_seen() -> float:
        with queue.db.read() as conn:  # type: ignore[attr-defined]
            row = conn.execute("SELECT last_seen FROM workers WHERE id = ?", (w,)).fetchone()
            return float(row[0])

    clock.advance(5)
    queue.heartbeat(c.job.id, w, c.epoch)
    first = last_seen()
    assert first == clock()
    clock.advance(0.5)
    queue.heartbeat(c.job.id, w, c.epoch)
    assert last_seen() == first  # within the second: not written again
    clock.advance(0.6)
    queue.heartbeat(c.job.id, w, c.epoch)
    assert last_seen() == clock()  # a second later: written
    assert [j.name for j in queue.revoke_worker(w)] == ["j"]  # requeued
    clock.advance(0.1)
    with pytest.raises((StaleEpoch, Conflict, Unauthorized)):
        queue.heartbeat(c.job.id, w, c.epoch)

"""Job dependencies (``after``) and submitted jobs on every backend: the dependency step
releases and fails waiting jobs (cascading in one step), operator actions on waiting jobs,
parents resolved by name across reloads, and the refusals of submit and reload."""

from __future__ import annotations

import pytest

from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.errors import BadRequest, Conflict
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.spec import JobSpec, Manifest
from trainfleet.queue import JobQueue, deps

CHAIN = """
[[jobs]]
name = "a"
kind = "command"
command = ["true"]
[[jobs]]
name = "b"
kind = "command"
command = ["true"]
after = ["a"]
[[jobs]]
name = "c"
kind = "command"
command = ["true"]
after = ["b"]
"""


def reloaded(text: str) -> Manifest:
    """A manifest as the coordinator's reload parses it: ``after`` may name submitted jobs."""
    return parse_manifest(text, "test.toml", external_after=True)


def command(name: str, *after: str, arg: str = "x") -> JobSpec:
    return JobSpec(name=name, kind="command", command=["echo", arg], after=list(after))


def worker(queue: JobQueue, host: str = "cpu-a") -> str:
    return queue.register_worker(make_cap(host))[0].id


def finish(queue: JobQueue, wid: str, name: str, *, ok: bool = True) -> None:
    """Claim the next job (it must be ``name``) and complete or fail it for good."""
    claim = queue.claim(wid)
    assert claim is not None and claim.job.name == name
    if ok:
        queue.complete(claim.job.id, wid, claim.epoch, {})
    else:
        queue.fail(claim.job.id, wid, claim.epoch, "boom", retryable=False)


def said(queue: JobQueue, ref: str) -> str:
    """The first line of ``explain``'s message (what it is waiting for, or why it ended)."""
    return str(queue.explain(ref)["message"]).splitlines()[0]


def states(queue: JobQueue) -> dict[str, str]:
    return {j.name: j.state for j in queue.list_jobs()}


def test_a_chain_is_released_one_parent_at_a_time(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    assert states(queue) == {"a": "pending", "b": "waiting", "c": "waiting"}
    assert queue.counts() == {"pending": 1, "waiting": 2}
    assert [j.name for j in queue.list_jobs(state="waiting")] == ["b", "c"]
    wid = worker(queue)
    finish(queue, wid, "a")
    assert queue.claim(wid) is None  # b still waits: claims never see a waiting job
    assert said(queue, "b") == "waiting: every parent completed; released soon"
    assert queue.resolve_dependencies() == 1
    assert states(queue)["b"] == "pending" and states(queue)["c"] == "waiting"
    released = [e for e in queue.events(queue.get_job("b").id) if e.kind == "released"]
    assert [(e.from_state, e.to_state, e.detail) for e in released] == [
        ("waiting", "pending", "a completed")
    ]
    assert queue.resolve_dependencies() == 0  # nothing moves twice
    finish(queue, wid, "b")
    assert queue.resolve_dependencies() == 1
    finish(queue, wid, "c")
    assert queue.counts() == {"completed": 3}


def test_explain_names_each_parent_not_completed(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    wid = worker(queue)
    claim = queue.claim(wid)
    assert claim is not None
    queue.heartbeat(claim.job.id, wid, claim.epoch)
    assert said(queue, "b") == "waiting for a (running)"
    assert said(queue, "c") == "waiting for b (waiting)"
    queue.add_job(command("d", "a", "c"))
    assert said(queue, "d") == "waiting for a (running), c (waiting)"


def test_a_failed_parent_fails_the_whole_chain_in_one_step(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    wid = worker(queue)
    finish(queue, wid, "a", ok=False)
    assert queue.resolve_dependencies() == 2
    b, c = queue.get_job("b"), queue.get_job("c")
    assert (b.state, b.error) == ("failed", "parent a failed: boom")
    assert (c.state, c.error) == ("failed", "parent b failed: parent a failed: boom")
    assert c.finished_at is not None
    assert [e.kind for e in queue.events(c.id)][-1] == "failed"
    assert said(queue, "c").endswith("parent b failed: parent a failed: boom")


def test_a_cancelled_parent_fails_its_child(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    queue.cancel("a")
    assert queue.resolve_dependencies() == 2
    assert queue.get_job("b").error == "parent a cancelled: cancelled by operator"


def test_cancel_of_a_waiting_job_and_requeue_rules(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    with pytest.raises(Conflict, match=r"job b is waiting for a \(pending\); it runs when its"):
        queue.requeue("b")
    cancelled = queue.cancel("c")
    assert cancelled.state == "cancelled"
    assert queue.resolve_dependencies() == 0  # c's cancel moves no parent of anyone waiting
    wid = worker(queue)
    finish(queue, wid, "a", ok=False)
    queue.resolve_dependencies()
    assert queue.get_job("b").state == "failed"
    # Requeued, a child waits for its parents again; a job without `after` is pending.
    assert queue.requeue("b").state == "waiting"
    assert queue.requeue("a").state == "pending"
    finish(queue, wid, "a")
    assert queue.resolve_dependencies() == 1
    assert queue.get_job("b").state == "pending"


def test_a_parent_removed_by_a_reload_fails_its_child(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    queue.add_job(command("s", "a"))
    # "a" leaves the manifest; b and c stay. Submitted s names a job that no longer exists.
    queue.apply_manifest(manifest_of(WITHOUT_A))
    assert queue.resolve_dependencies() == 2  # s fails; b, whose `after` is gone, is released
    assert queue.get_job("s").error == "parent a does not exist"
    assert queue.get_job("b").state == "pending"


WITHOUT_A = """
[[jobs]]
name = "b"
kind = "command"
command = ["true"]
[[jobs]]
name = "c"
kind = "command"
command = ["true"]
after = ["b"]
"""


def test_a_removed_waiting_job_is_left_waiting(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    queue.apply_manifest(manifest_of('[[jobs]]\nname = "a"\nkind = "command"\ncommand = ["true"]'))
    wid = worker(queue)
    finish(queue, wid, "a")
    assert queue.resolve_dependencies() == 0
    assert states(queue) == {"a": "completed", "b": "waiting", "c": "waiting"}
    assert "removed from the manifest" in said(queue, "b")


def test_an_edited_parent_is_resolved_to_its_new_version(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    edited = CHAIN.replace('command = ["true"]\n[[jobs]]\nname = "b"', 'command = ["false"]\n'
                           '[[jobs]]\nname = "b"', 1)  # fmt: skip
    plan = queue.apply_manifest(manifest_of(edited))
    assert [e.name for e in plan.added] == ["a"] and [e.name for e in plan.removed] == ["a"]
    wid = worker(queue)
    finish(queue, wid, "a")  # the new "a"; the old one is not claimable
    assert queue.resolve_dependencies() == 1
    assert states(queue)["b"] == "pending"


def test_submitted_jobs_wait_and_survive_reloads(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    job = queue.add_job(command("s", "a"))
    assert (job.state, job.in_manifest, job.pinned) == ("waiting", False, True)
    assert [e.detail for e in queue.events(job.id)] == ["submitted by operator"]
    plan = queue.apply_manifest(manifest_of(CHAIN))
    assert "s" not in [e.name for e in plan.removed]
    assert queue.get_job("s").state == "waiting"
    # A manifest may name the submitted job in its own `after`.
    with_t = CHAIN + '[[jobs]]\nname = "t"\nkind = "command"\ncommand = ["true"]\nafter = ["s"]\n'
    queue.apply_manifest(reloaded(with_t))
    wid = worker(queue)
    finish(queue, wid, "a")
    assert queue.resolve_dependencies() == 2  # b and s
    finish(queue, wid, "b")
    finish(queue, wid, "s")
    assert queue.resolve_dependencies() == 2  # c and t
    assert states(queue)["t"] == "pending"


def test_a_submitted_job_with_no_parents_is_claimable_at_once(queue: JobQueue) -> None:
    job = queue.add_job(command("solo"))
    assert job.state == "pending"
    wid = worker(queue)
    finish(queue, wid, "solo")


def test_submit_refusals(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    with pytest.raises(Conflict, match="the name 'a' is held by a manifest job"):
        queue.add_job(command("a"))
    queue.add_job(command("s", "a"))
    with pytest.raises(Conflict, match="the name 's' is held by an unfinished job"):
        queue.add_job(command("s", "a", arg="other"))
    with pytest.raises(Conflict, match=r"the queue already holds this job: s \("):
        queue.add_job(command("s", "a"))
    with pytest.raises(BadRequest, match="after: no job named 'nope'"):
        queue.add_job(command("u", "nope"))
    # A finished submitted job's name may be taken again (the newest is its parent).
    queue.cancel("s")
    assert queue.add_job(command("s", "a", arg="v2")).state == "waiting"
    assert len(queue.list_jobs()) == 5


def test_reload_refusals_through_submitted_jobs(queue: JobQueue) -> None:
    queue.apply_manifest(manifest_of(CHAIN))
    queue.add_job(command("s", "c"))
    # c waits for s, which waits for c: refused, and nothing is written.
    cyclic = CHAIN.replace('after = ["b"]', 'after = ["b", "s"]')
    with pytest.raises(BadRequest) as err:
        queue.apply_manifest(reloaded(cyclic))
    assert any("cycle c -> s -> c" in p for p in err.value.details["problems"])
    assert any("through submitted job(s) s" in p for p in err.value.details["problems"])
    assert queue.get_job("c").spec.after == ["b"]
    unknown = CHAIN.replace('after = ["b"]', 'after = ["zz"]')
    with pytest.raises(BadRequest) as err:
        queue.apply_manifest(reloaded(unknown))
    assert err.value.details["problems"] == [
        "jobs ('c').after: no job named 'zz' in the manifest or submitted"
    ]
    clash = CHAIN + '[[jobs]]\nname = "s"\nkind = "command"\ncommand = ["other"]\n'
    with pytest.raises(BadRequest, match="dependencies"):
        queue.apply_manifest(manifest_of(clash))


def test_submit_and_requeue_cannot_close_a_cycle(queue: JobQueue) -> None:
    queue.add_job(command("p"))
    queue.add_job(command("q", "p"))
    queue.cancel("p")  # q still waits (no step yet) for the name "p"
    with pytest.raises(BadRequest, match=r"after: dependency cycle p -> q -> p$"):
        queue.add_job(command("p", "q", arg="v2"))
    assert queue.add_job(command("r", "q")).state == "waiting"  # no cycle: accepted
    # Once q failed, a new p may wait for it (and fails), but q cannot then wait for p.
    assert queue.resolve_dependencies() == 2  # q, then r
    queue.add_job(command("p", "q", arg="v2"))
    with pytest.raises(BadRequest, match="cycle q -> p -> q"):
        queue.requeue("q")
    assert queue.get_job("q").state == "failed"


def test_the_dependency_step_uses_the_queue_clock(make_queue, clock: FakeClock) -> None:
    queue = make_queue()
    queue.apply_manifest(manifest_of(CHAIN))
    wid = worker(queue)
    finish(queue, wid, "a")
    clock.advance(42.0)
    queue.resolve_dependencies()
    b = queue.get_job("b")
    assert b.pending_since == clock()


def chain_toml(n: int, *, reverse: bool) -> str:
    """``n`` command jobs, each after the one before; ``reverse``: the file lists the
    children first (so a step that walks the file in order meets each before its parent)."""
    jobs = [
        f'[[jobs]]\nname = "j{i}"\nkind = "command"\ncommand = ["true"]\n'
        + (f'after = ["j{i - 1}"]\n' if i else "")
        for i in range(n)
    ]
    return "".join(reversed(jobs) if reverse else jobs)


def test_a_deep_chain_fails_in_one_pass_over_the_waiting_jobs(
    queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The leader runs the step every 0.5 s inside the write lock: a failure cascading down
    # a chain must cost one read of the waiting jobs, not one read per level (O(n^2)).
    queue.apply_manifest(reloaded(chain_toml(300, reverse=True)))
    queue.cancel("j0")
    reads = []
    original = deps.waiting_rows
    monkeypatch.setattr(deps, "waiting_rows", lambda conn: reads.append(1) or original(conn))
    assert queue.resolve_dependencies() == 299
    assert len(reads) <= 2  # the look without the lock, then the one inside it
    last = queue.get_job("j299")
    assert last.state == "failed" and last.error is not None
    assert last.error.startswith("parent j298 failed: parent j297 failed: parent j296 failed:")
    # each child quotes its parent's reason, bounded: not a reason growing with the depth
    assert len(last.error) <= deps.MAX_REASON_CHARS + 40


def test_the_step_looks_at_waiting_jobs_only_when_something_could_move_one(
    queue: JobQueue, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    looks: list[int] = []
    plan = deps.plan_moves
    monkeypatch.setattr(deps, "plan_moves", lambda conn: looks.append(1) or plan(conn))

    def step() -> tuple[int, bool]:
        """(jobs moved, whether the step read the waiting jobs)"""
        before = len(looks)
        return queue.resolve_dependencies(), len(looks) > before

    queue.apply_manifest(manifest_of(CHAIN))
    assert step() == (0, True)  # the first step looks
    assert step() == (0, False)  # nothing happened since
    wid = worker(queue)
    claim = queue.claim(wid)
    assert claim is not None and claim.job.name == "a"
    queue.heartbeat(claim.job.id, wid, claim.epoch)  # now running
    assert step() == (0, False)  # a claim and a start cannot move a waiting job
    queue.complete(claim.job.id, wid, claim.epoch, {})
    assert step() == (1, True)  # a job ended: b released
    assert step() == (0, False)
    clock.advance(deps.FULL_LOOK_S)  # the backstop: a look however quiet the log
    assert step() == (0, True)
    queue.cancel("b")  # an operator's action is an event too: c fails with its parent
    assert step() == (1, True)
    assert states(queue)["c"] == "failed"

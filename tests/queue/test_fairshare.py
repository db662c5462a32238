"""Fair share on both backends: a submitter's use is charged at each attempt's end and by the
leader's tick, its level is kept in its pending jobs, and the claim takes priority first,
then the lowest level, then manifest order. Time passes only when a test moves the clock."""

from __future__ import annotations

import math
from typing import Any

import pytest

import pipelinekit
from fleetkit import FakeClock, make_cap, manifest_of
from trainfleet.errors import StaleEpoch
from trainfleet.queue import Claim, JobQueue
from trainfleet.queue import fairshare as fs

H = 168.0


def jobs_toml(*jobs: tuple[str, str, int], head: str = "") -> str:
    """``[[jobs]]`` entries of ``(name, submitter, priority)``, after ``head``."""
    return head + "".join(
        f'[[jobs]]\nname = "{n}"\nsubmitter = "{s}"\npriority = {p}\nhyper = {{ steps = 1 }}\n'
        for n, s, p in jobs
    )


def load(queue: JobQueue, *jobs: tuple[str, str, int], head: str = "") -> None:
    queue.apply_manifest(manifest_of(jobs_toml(*jobs, head=head)))


def sql(queue: JobQueue, text: str, *args: Any) -> list[Any]:
    return queue._conn().execute(text, args).fetchall()  # type: ignore[attr-defined]


def fair(queue: JobQueue) -> dict[str, int]:
    return {r["name"]: r["fair"] for r in sql(queue, "SELECT name, fair FROM jobs")}


def worker(queue: JobQueue, host: str = "cpu-a") -> str:
    return queue.register_worker(make_cap(host))[0].id


def run_for(queue: JobQueue, clock: FakeClock, wid: str, seconds: float) -> str:
    """Claim the next job, run it ``seconds``, complete it; its name."""
    claim = queue.claim(wid)
    assert claim is not None
    clock.advance(seconds)
    queue.complete(claim.job.id, wid, claim.epoch, {})
    return claim.job.name


def alices_job_claimed(queue: JobQueue) -> tuple[str, Claim]:
    """Alice's one job a1, claimed by a worker on cpu-a: (that worker, the claim)."""
    load(queue, ("a1", "alice", 0))
    wid = worker(queue)
    claim = queue.claim(wid)
    assert claim is not None
    return wid, claim


def drain(queue: JobQueue, wid: str) -> list[str]:
    """Claim and complete every claimable job at once (no time passes): the claim order."""
    order = []
    while (claim := queue.claim(wid)) is not None:
        queue.complete(claim.job.id, wid, claim.epoch, {})
        order.append(claim.job.name)
    return order


def standing(queue: JobQueue, submitter: str) -> fs.Standing:
    return next(s for s in queue.fair_share().submitters if s.submitter == submitter)


def test_the_heavy_submitters_jobs_are_claimed_after_the_light_ones(
    queue: JobQueue, clock: FakeClock
) -> None:
    load(
        queue,
        *[(f"a{i}", "alice", 0) for i in (1, 2, 3)],
        *[(f"b{i}", "bob", 0) for i in (1, 2, 3)],
    )
    wid = worker(queue)
    assert run_for(queue, clock, wid, 3600) == "a1"  # alice's jobs came first in the file
    state = queue.fair_share_tick()
    assert state.levels == {"alice": 8, "bob": 0}  # u = 1, s = 1/2: F = 1/4
    assert fair(queue) == {"a1": 0, "a2": 8, "a3": 8, "b1": 0, "b2": 0, "b3": 0}
    assert drain(queue, wid) == ["b1", "b2", "b3", "a2", "a3"]


def test_a_higher_priority_job_goes_first_whatever_its_submitters_level(
    queue: JobQueue, clock: FakeClock
) -> None:
    load(queue, ("a1", "alice", 0), ("b1", "bob", 0), ("urgent", "alice", 5))
    wid = worker(queue)
    assert run_for(queue, clock, wid, 3600) == "urgent"
    assert run_for(queue, clock, wid, 3600) == "a1"  # alice's level is still 0: no tick yet
    assert queue.fair_share_tick().levels == {"alice": 8, "bob": 0}
    load(queue, ("a1", "alice", 0), ("b1", "bob", 0), ("urgent", "alice", 5), ("up", "alice", 1))
    queue.fair_share_tick()
    assert fair(queue)["up"] == 8
    assert drain(queue, wid) == ["up", "b1"]  # priority 1 beats bob's level 0 at priority 0


def test_an_attempt_is_charged_at_its_end_the_closed_form(
    queue: JobQueue, clock: FakeClock
) -> None:
    load(queue, ("a1", "alice", 0), ("b1", "bob", 0), ("c1", "carol", 0))
    wid = worker(queue)
    run_for(queue, clock, wid, 3600)  # completed after one hour
    expected = H / math.log(2) * (1 - 2 ** (-1 / H))
    assert standing(queue, "alice").usage_h == pytest.approx(expected, rel=1e-9)
    claim = queue.claim(wid)  # bob's, failed after half an hour: charged too
    assert claim is not None and claim.job.name == "b1"
    clock.advance(1800)
    assert queue.fail(claim.job.id, wid, claim.epoch, "boom", retryable=False).state == "failed"
    assert standing(queue, "bob").usage_h == pytest.approx(fs.interval_hours(0, 1800, H))
    # a lost attempt (no heartbeat) is charged when it is reaped, up to the reap
    claim = queue.claim(wid)
    assert claim is not None and claim.job.name == "c1"
    clock.advance(60)
    assert [j.name for j in queue.reap()] == ["c1"]
    assert standing(queue, "carol").usage_h == pytest.approx(fs.interval_hours(0, 60, H))
    # a week (one half-life) after it ended, alice's use counts half
    clock.advance(H * 3600 - 1860)
    assert standing(queue, "alice").usage_h == pytest.approx(expected / 2, rel=1e-9)


def test_a_tick_charges_running_attempts_and_the_end_only_the_rest(
    queue: JobQueue, clock: FakeClock
) -> None:
    load(queue, ("a1", "alice", 0), head="[fair_share]\nhalf_life_h = 2\n")
    wid = worker(queue)
    claim = queue.claim(wid)
    assert claim is not None
    clock.advance(1800)
    state = queue.fair_share_tick()
    assert state.charged_h == pytest.approx(fs.interval_hours(0, 1800, 2.0))
    (row,) = sql(queue, "SELECT charged_at FROM jobs WHERE name = 'a1'")
    assert row["charged_at"] == clock.now
    clock.advance(1800)
    assert queue.fair_share_tick().charged_h == pytest.approx(fs.interval_hours(0, 1800, 2.0))
    clock.advance(1800)
    queue.complete(claim.job.id, wid, claim.epoch, {})
    # charged in three pieces (tick, tick, end): exactly the charge of 1.5 h at its end
    assert standing(queue, "alice").usage_h == pytest.approx(
        fs.interval_hours(0, 5400, 2.0), rel=1e-9
    )
    (stored,) = sql(queue, "SELECT usage_h, at FROM fair_usage WHERE submitter = 'alice'")
    assert stored["at"] == clock.now
    # what a report shows of a running attempt counts its uncharged time too
    assert queue.fair_share().half_life_h == 2.0


def test_levels_are_rewritten_only_where_they_changed(queue: JobQueue, clock: FakeClock) -> None:
    jobs = [("a1", "alice", 0), ("a2", "alice", 0), ("b1", "bob", 0)]
    load(queue, *jobs)
    wid = worker(queue)
    run_for(queue, clock, wid, 3600)
    first = queue.fair_share_tick()
    assert (first.changed, first.rewritten) == (["alice"], 1)  # a2: a1 is completed
    again = queue.fair_share_tick()
    assert (again.changed, again.rewritten) == ([], 0)
    # a new job of alice's is inserted at level 0; the next tick sets just that row
    load(queue, *jobs, ("a3", "alice", 0))
    assert fair(queue)["a3"] == 0
    third = queue.fair_share_tick()
    assert (third.changed, third.rewritten) == ([], 1)
    assert fair(queue) == {"a1": 0, "a2": 8, "a3": 8, "b1": 0}
    # bob's use catches up with alice's: both levels change, both submitters' rows follow
    claim = queue.claim(wid)
    assert claim is not None and claim.job.name == "b1"
    clock.advance(3 * 3600)
    queue.complete(claim.job.id, wid, claim.epoch, {})
    fourth = queue.fair_share_tick()
    assert sorted(fourth.changed) == ["alice", "bob"]
    assert fourth.levels["alice"] < 8
    assert fair(queue)["a2"] == fair(queue)["a3"] == fourth.levels["alice"]


def test_an_attempt_failed_back_to_pending_takes_its_submitters_level(
    queue: JobQueue, clock: FakeClock
) -> None:
    load(queue, ("a1", "alice", 0), ("a2", "alice", 0), ("b1", "bob", 0))
    wid = worker(queue)
    run_for(queue, clock, wid, 3600)
    queue.fair_share_tick()
    claim = queue.claim(wid)  # b1 (bob is at level 0)
    assert claim is not None and claim.job.name == "b1"
    other = worker(queue, "cpu-b")
    second = queue.claim(other)
    assert second is not None and second.job.name == "a2"
    queue.fail(second.job.id, other, second.epoch, "boom")
    assert fair(queue)["a2"] == 8  # not the 0 it would compete with until the next tick


def test_the_claim_order_is_priority_then_level_then_manifest_order(
    queue: JobQueue, clock: FakeClock
) -> None:
    users = ["ann", "ben", "cat", "dan"]
    jobs = [(f"j{i:02d}", users[(i * 7) % 4], (i * 5) % 3) for i in range(24)]
    load(queue, *jobs)
    with queue.db.tx() as conn:  # type: ignore[attr-defined]
        for user, hours in zip(users[1:], (1.0, 3.0, 8.0), strict=True):
            fs.charge(conn, user, hours, clock.now, H)
    state = queue.fair_share_tick()
    assert len(set(state.levels.values())) == 4  # four distinct levels to order by
    expected = [
        r["name"]
        for r in sql(
            queue, "SELECT name FROM jobs WHERE state = 'pending' ORDER BY priority DESC, fair, seq"
        )
    ]
    assert drain(queue, worker(queue)) == expected
    spec = {n: (s, p) for n, s, p in jobs}
    keys = [(-spec[n][1], state.levels[spec[n][0]], n) for n in expected]
    assert keys == sorted(keys)  # priority first, then level, then the file's order
    assert expected != sorted(expected, key=lambda n: (-spec[n][1], n))  # levels reordered


def test_shares_weigh_the_levels(queue: JobQueue, clock: FakeClock) -> None:
    head = "[fair_share.shares]\nalice = 3\n"
    load(queue, ("a1", "alice", 0), ("b1", "bob", 0), ("a2", "alice", 0), head=head)
    wid = worker(queue)
    run_for(queue, clock, wid, 3600)  # a1
    run_for(queue, clock, wid, 3600)  # b1: the same use as alice's
    state = queue.fair_share_tick()
    alice, bob = standing(queue, "alice"), standing(queue, "bob")
    assert (alice.share, bob.share) == (0.75, 0.25)
    assert alice.usage == pytest.approx(0.5, abs=0.01)  # (her hour is an hour older)
    assert alice.factor == pytest.approx(2 ** (-alice.usage / 0.75))
    assert bob.factor == pytest.approx(2 ** (-bob.usage / 0.25))
    assert state.levels == {"alice": fs.level(alice.factor), "bob": fs.level(bob.factor)}
    assert state.levels["alice"] < state.levels["bob"]


def test_a_batch_of_completions_charges_each_submitter(queue: JobQueue, clock: FakeClock) -> None:
    load(queue, ("a1", "alice", 0), ("b1", "bob", 0), ("a2", "alice", 0))
    wid = worker(queue)
    queue.set_worker_slots(wid, 3)
    claims = queue.claim_many(wid, 3)
    assert len(claims) == 3
    clock.advance(3600)
    items: list[tuple[str, int, dict[str, Any]]] = [(c.job.id, c.epoch, {}) for c in claims]
    out = queue.complete_plain_many(wid, items, {})  # type: ignore[attr-defined]
    assert all(not isinstance(o, Exception) for o in out)
    one = fs.interval_hours(0, 3600, H)
    assert standing(queue, "alice").usage_h == pytest.approx(2 * one)
    assert standing(queue, "bob").usage_h == pytest.approx(one)


def test_explain_names_the_submitters_use_share_factor_and_level(
    queue: JobQueue, clock: FakeClock
) -> None:
    load(queue, ("a1", "alice", 0), ("a2", "alice", 0), ("b1", "bob", 0))
    wid = worker(queue)
    run_for(queue, clock, wid, 3 * 3600)
    queue.fair_share_tick()
    message = queue.explain("a2")["message"]
    assert (
        "fair share: submitter alice used 3.0 job-hours recently (100% of the fleet's use,"
        " share 50%): factor 0.25, level 8 of 10; at priority 0, jobs of levels below 8 go first"
    ) in message
    assert "submitter bob used 0.0 job-hours" in queue.explain("b1")["message"]
    assert fs._hours(0.00123) == "0.0012" and fs._hours(0.25) == "0.2"  # minutes are not 0.0
    assert "fair share" not in queue.explain("a1")["message"]  # completed: no place in line


def test_the_report_counts_jobs_and_forgets_negligible_use(
    queue: JobQueue, clock: FakeClock
) -> None:
    load(queue, ("a1", "alice", 0), ("a2", "alice", 0), head="[fair_share]\nhalf_life_h = 1\n")
    wid = worker(queue)
    claim = queue.claim(wid)
    assert claim is not None
    clock.advance(600)
    report = queue.fair_share()
    (alice,) = report.submitters
    assert (alice.pending, alice.waiting, alice.running) == (1, 0, 1)
    assert alice.usage_h == pytest.approx(fs.interval_hours(0, 600, 1.0))  # uncharged, counted
    queue.complete(claim.job.id, wid, claim.epoch, {})
    queue.cancel("a2")
    clock.advance(100 * 3600)  # 100 half-lives: nothing left worth keeping
    queue.fair_share_tick()
    assert queue.fair_share().submitters == []
    assert sql(queue, "SELECT submitter FROM fair_usage") == []


def test_a_clock_stepping_back_does_not_charge_a_running_attempt_twice(
    queue: JobQueue, clock: FakeClock
) -> None:
    wid, claim = alices_job_claimed(queue)
    clock.advance(3600)
    queue.fair_share_tick()  # charged up to t0 + 1 h
    clock.advance(-1800)  # the clock steps back half an hour...
    assert queue.fair_share_tick().charged_h == 0.0
    clock.advance(1800)  # ...and comes back: nothing new was used
    queue.complete(claim.job.id, wid, claim.epoch, {})
    assert standing(queue, "alice").usage_h == pytest.approx(fs.interval_hours(0, 3600, H))


@pytest.mark.parametrize("end", ["cancel", "requeue", "revoke"])
def test_an_attempt_ended_by_the_operator_is_charged_up_to_its_end(
    queue: JobQueue, clock: FakeClock, end: str
) -> None:
    wid, _ = alices_job_claimed(queue)
    clock.advance(600)
    queue.fair_share_tick()
    clock.advance(1200)  # not yet charged by a tick when the attempt ends
    if end == "cancel":
        queue.cancel("a1")
    elif end == "requeue":
        queue.requeue("a1")
    else:
        queue.revoke_worker(wid)
    assert standing(queue, "alice").usage_h == pytest.approx(fs.interval_hours(0, 1800, H))
    clock.advance(3600)  # no longer running: nothing more is charged
    queue.fair_share_tick()
    assert standing(queue, "alice").usage_h == pytest.approx(
        fs.decay(fs.interval_hours(0, 1800, H), 3600, H)
    )


def test_each_attempt_is_charged_once_whatever_ends_it(queue: JobQueue, clock: FakeClock) -> None:
    load(queue, ("a1", "alice", 0))
    wid, other = worker(queue), worker(queue, "cpu-b")
    first = queue.claim(wid)
    assert first is not None
    clock.advance(600)
    queue.fail(first.job.id, wid, first.epoch, "flaky")  # retried: 600 s charged
    second = queue.claim(other)
    assert second is not None and second.epoch > first.epoch
    clock.advance(300)
    queue.fair_share_tick()
    clock.advance(60)
    assert [j.name for j in queue.reap()] == ["a1"]  # lost after 360 s: charged up to the reap
    charged = standing(queue, "alice").usage_h
    # the written-off attempts come back late: fenced, and nothing more is charged
    with pytest.raises(StaleEpoch):
        queue.complete(first.job.id, wid, first.epoch, {})
    with pytest.raises(StaleEpoch):
        queue.fail(second.job.id, other, second.epoch, "late")
    queue.fair_share_tick()
    assert standing(queue, "alice").usage_h == charged
    expected = fs.decay(fs.interval_hours(0, 600, H), 360, H) + fs.interval_hours(0, 360, H)
    assert charged == pytest.approx(expected, rel=1e-9)


def test_a_pipeline_job_cancelled_with_its_pipeline_is_charged(
    queue: JobQueue, clock: FakeClock
) -> None:
    kit = pipelinekit.start(queue, clock)
    attempt = kit.claim("prod")  # the producer
    clock.advance(900)
    queue.fail_pipeline(kit.pipeline.id, "teacher gone")  # cancels its running job
    assert queue.get_job(attempt.job.id).state == "cancelled"
    used = standing(queue, attempt.job.spec.submitter).usage_h
    assert used == pytest.approx(fs.interval_hours(0, 900, H))

"""The market's storage on both backends: a competition's frontier and ledger, submissions
with their referee panels, pay once, duplicates, and a ledger that survives a restart."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fleetkit import FakeClock
from marketkit import BASELINE_SCORE, accepted, panel, pay, sha, submit, terms
from trainfleet.errors import BadRequest, Conflict, NotFound, StaleEpoch
from trainfleet.queue import JobQueue
from trainfleet.queue.sqlite import SQLiteQueue
from trainfleet.verify.market import FRONTIER_MOVED, payment
from trainfleet.verify.panel import Verdict, report_from_losses
from trainfleet.verify.spec import RefereeTask


@pytest.fixture
def market(queue: JobQueue) -> JobQueue:
    queue.create_competition(terms(), sha("baseline"), BASELINE_SCORE)
    return queue


def test_a_competition_starts_at_its_baseline_and_is_found_by_name_or_id(queue: JobQueue) -> None:
    made = queue.create_competition(terms(), sha("baseline"), BASELINE_SCORE)
    assert (made.frontier, made.frontier_score) == (sha("baseline"), BASELINE_SCORE)
    assert made.frontier_submission is None
    assert queue.get_competition(made.id) == made == queue.get_competition("tiny-lm")
    assert queue.list_competitions() == [made]
    with pytest.raises(Conflict, match="tiny-lm exists already"):
        queue.create_competition(terms(), sha("other"), BASELINE_SCORE)
    with pytest.raises(NotFound):
        queue.get_competition("no-such")
    with pytest.raises(BadRequest, match="not a finite loss"):
        queue.create_competition(terms("nan-lm"), sha("b"), math.nan)


def test_a_submission_queues_its_panel_as_claimable_referee_jobs(market: JobQueue) -> None:
    got = submit(market, "m1")
    assert got.state == "refereeing" and got.seq == 1 and got.paid == 0
    assert got.frontier == sha("baseline") and got.frontier_score == BASELINE_SCORE
    jobs = market.panel_jobs(got.id)
    assert [j.spec.kind for j in jobs] == ["referee"] * 3
    assert all(j.state == "pending" and j.pinned and not j.in_manifest for j in jobs)
    assert sorted(j.spec.task.index for j in jobs if isinstance(j.spec.task, RefereeTask)) == [
        0,
        1,
        2,
    ]
    assert market.refereeing_submissions() == [got]
    assert market.get_submission(got.id[:8]) == got  # a prefix finds it


def test_a_non_finite_claim_is_refused(market: JobQueue) -> None:
    with pytest.raises(BadRequest, match="not a finite loss"):
        submit(market, "m1", claim=math.inf)


def test_a_panel_built_against_an_old_frontier_is_refused(market: JobQueue) -> None:
    stale = market.get_competition("tiny-lm")
    pay(market, submit(market, "m1"), 0.5)  # the frontier moves
    tasks = panel(stale, "late", sha("m2"), "bob")
    with pytest.raises(Conflict, match="frontier moved"):
        market.submit(stale.id, sha("m2"), 10, "bob", 2.0, tasks, submission_id="late")
    assert market.list_submissions("tiny-lm")[-1].id != "late"


def test_an_accepted_improvement_is_paid_once_and_moves_the_frontier(market: JobQueue) -> None:
    submission = submit(market, "m1", producer="alice")
    decided = pay(market, submission, 0.25)
    assert decided.state == "accepted" and decided.paid == pytest.approx(25.0)
    assert decided.trusted_score == pytest.approx(2.75)
    competition = market.get_competition("tiny-lm")
    assert competition.frontier == sha("m1") and competition.frontier_submission == decided.id
    assert competition.frontier_score == pytest.approx(2.75)
    again = market.decide(submission.id, accepted(0.25, BASELINE_SCORE), 25.0)
    assert again == decided  # unchanged: deciding twice pays once
    entries = market.ledger("tiny-lm")
    assert [(e.submission_id, e.account, e.amount) for e in entries] == [
        (decided.id, "alice", pytest.approx(25.0))
    ]
    assert (entries[0].frontier_before, entries[0].frontier_after) == (3.0, pytest.approx(2.75))


def test_total_paid_is_rate_times_the_frontier_s_fall(market: JobQueue) -> None:
    """Payments telescope over a sequence of paid, unpaid and rejected submissions."""
    rate = market.get_competition("tiny-lm").spec.rate
    plan = [("a", 0.3), ("b", -0.1), ("c", 0.05), ("d", 0.0), ("e", 0.41), ("f", 0.002)]
    for i, (producer, improvement) in enumerate(plan):
        submission = submit(market, f"model{i}", producer=producer)
        if improvement < 0:
            frontier = submission.frontier_score
            verdict = Verdict("rejected", 1, 0, improvement, frontier - improvement, "no")
            market.decide(submission.id, verdict, 0.0)
        else:
            pay(market, submission, improvement)
    final = market.get_competition("tiny-lm").frontier_score
    total = sum(e.amount for e in market.ledger())
    assert total == pytest.approx(rate * (BASELINE_SCORE - final), rel=1e-12)
    assert final == pytest.approx(BASELINE_SCORE - (0.3 + 0.05 + 0.41 + 0.002))
    assert len(market.ledger()) == 4  # "d" (no improvement) and "b" were paid nothing
    balances = market.balances("tiny-lm")
    assert balances == {
        "a": pytest.approx(30.0),
        "c": pytest.approx(5.0),
        "e": pytest.approx(41.0),
        "f": pytest.approx(0.2),
    }
    assert market.balances() == balances


def test_an_accepted_claim_without_a_certified_quorum_is_not_paid(market: JobQueue) -> None:
    spec = market.get_competition("tiny-lm").spec
    submission = submit(market, "m1")
    verdict = accepted(0.2, BASELINE_SCORE, certified=1)  # quorum is 2
    assert payment(spec, BASELINE_SCORE, verdict) == 0.0
    decided = market.decide(submission.id, verdict, 0.0)
    assert decided.state == "accepted" and decided.paid == 0.0
    assert market.get_competition("tiny-lm").frontier == sha("baseline")
    assert market.ledger() == []


def test_a_submission_judged_against_a_moved_frontier_is_rejected_unpaid(
    market: JobQueue,
) -> None:
    first, second = submit(market, "m1", producer="alice"), submit(market, "m2", producer="bob")
    pay(market, first, 0.2)
    late = pay(market, second, 0.3)  # its referees compared it with the baseline
    assert late.state == "rejected" and late.paid == 0.0
    assert late.verdict.startswith(FRONTIER_MOVED)
    assert market.get_competition("tiny-lm").frontier == sha("m1")
    assert [e.account for e in market.ledger()] == ["alice"]
    again = submit(market, "m2", producer="bob")  # judged again, against the new frontier
    assert again.state == "refereeing" and again.frontier == sha("m1")


def test_a_frontier_move_retires_the_panels_judging_against_the_old_one_at_once(
    market: JobQueue,
) -> None:
    first, second = submit(market, "m1", producer="alice"), submit(market, "m2", producer="bob")
    assert {j.state for j in market.panel_jobs(second.id)} == {"pending"}
    pay(market, first, 0.2)
    retired = market.get_submission(second.id)
    assert retired.state == "rejected" and retired.paid == 0.0
    assert retired.verdict.startswith(FRONTIER_MOVED) and first.id[:12] in retired.verdict
    assert {j.state for j in market.panel_jobs(second.id)} == {"cancelled"}
    assert {j.state for j in market.panel_jobs(first.id)} == {"pending"}  # its own: untouched
    late = pay(market, second, 0.3)  # its referees report anyway: nothing changes
    assert late == retired and [e.account for e in market.ledger()] == ["alice"]


def test_a_resubmission_is_a_duplicate_with_no_referees(market: JobQueue) -> None:
    original = submit(market, "m1", producer="alice")
    pay(market, original, 0.1)  # now the frontier
    for model, producer, what in [
        ("m1", "mallory", f"submission {original.id[:12]} (#1)"),
        ("baseline", "mallory", "the baseline"),
    ]:
        dup = submit(market, model, producer=producer)
        assert dup.state == "duplicate" and dup.paid == 0.0
        assert dup.verdict == f"resubmission of {what}: pays nothing"
        assert market.panel_jobs(dup.id) == []
    assert len(market.ledger()) == 1
    pending = submit(market, "m2")  # one still being refereed is a duplicate too
    assert submit(market, "m2", producer="eve", claim=1.0).state == "duplicate"
    market.decide(pending.id, Verdict("rejected", 0, 0, 0.0, 2.9, "inflated claim"), 0.0)
    assert submit(market, "m2", claim=2.95).state == "refereeing"  # a rejected model may retry


def test_a_referee_report_is_recorded_once_per_slot(market: JobQueue) -> None:
    submission = submit(market, "m1")
    job = market.panel_jobs(submission.id)[0]

    def report(offset: float):  # a referee's losses, as the coordinator judges them
        candidate = [2.0 + offset + 0.01 * i for i in range(8)]
        frontier = [2.3 + 0.01 * i for i in range(8)]
        return report_from_losses(
            0, "w1", "h1", candidate, frontier, margin=0.0, confidence=0.95, resamples=200, seed=3
        )

    first = market.record_referee_report(job.id, job.epoch, report(0.0))
    again = market.record_referee_report(job.id, job.epoch, report(0.5))
    assert first == again and len(first.reports) == 1
    stored = first.reports[0]
    assert (stored.index, stored.host, stored.ok, stored.certified) == (0, "h1", True, True)
    assert stored.mean == pytest.approx(2.035)
    assert None not in (stored.lo, stored.mean, stored.hi)
    assert float(stored.lo or 0) < float(stored.mean or 0) < float(stored.hi or 0)
    with pytest.raises(StaleEpoch):
        market.record_referee_report(job.id, job.epoch + 1, report(0.0))
    broken = report_from_losses(1, "w2", "h2", [math.nan], [2.0], margin=0.0, confidence=0.95,
                                resamples=200, seed=1)  # fmt: skip
    other = market.panel_jobs(submission.id)[1]
    recorded = market.record_referee_report(other.id, other.epoch, broken)
    assert [(r.index, r.ok, r.improvement) for r in recorded.reports] == [
        (0, True, pytest.approx(0.3)),
        (1, False, None),  # NaN is stored as NULL on both engines
    ]


def test_the_ledger_survives_a_restart_and_pays_nothing_twice(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "queue.db"
    queue = SQLiteQueue(path, clock=clock)
    queue.create_competition(terms(), sha("baseline"), BASELINE_SCORE)
    paid = pay(queue, submit(queue, "m1", producer="alice"), 0.4)
    refereeing = submit(queue, "m2", producer="bob")
    before = (queue.ledger(), queue.balances(), queue.get_competition("tiny-lm"))
    queue.close()
    reopened = SQLiteQueue(path, clock=clock)
    try:
        assert (reopened.ledger(), reopened.balances(), reopened.get_competition("tiny-lm")) == (
            before
        )
        assert pay(reopened, paid, 0.4) == paid  # a restarted driver decides again: no pay
        assert reopened.refereeing_submissions() == [refereeing]
        assert reopened.balances() == {"alice": pytest.approx(40.0)}
    finally:
        reopened.close()

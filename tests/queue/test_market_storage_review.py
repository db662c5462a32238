"""Review of the market's storage (brief REVIEW10), on both backends: a host flooding a
competition with submissions, and restarts between a verdict and its payment."""

from __future__ import annotations

import pytest

from marketkit import BASELINE_SCORE, accepted, pay, sha, submit, terms
from trainfleet.errors import Conflict
from trainfleet.queue import JobQueue, sqlite_market
from trainfleet.queue.sqlite_market import MAX_REFEREEING
from trainfleet.verify.market import OPERATOR


@pytest.fixture
def market(queue: JobQueue) -> JobQueue:
    queue.create_competition(terms(), sha("baseline"), BASELINE_SCORE)
    return queue


def test_a_host_has_a_bounded_number_of_submissions_refereeing(market: JobQueue) -> None:
    """Every submission queues a panel of referee jobs, and any changed weight makes new
    bytes: one host could flood the fleet with panels."""
    subs = [submit(market, f"flood{i}", producer="mallory") for i in range(MAX_REFEREEING)]
    jobs = len(market.list_jobs())
    with pytest.raises(Conflict, match="still refereeing"):
        submit(market, "one-more", producer="mallory")
    assert len(market.list_jobs()) == jobs
    assert submit(market, "other", producer="alice").state == "refereeing"
    assert submit(market, "ops", producer=OPERATOR).state == "refereeing"  # not bounded
    market.decide(subs[0].id, accepted(0.0, BASELINE_SCORE, certified=0), 0.0)
    assert submit(market, "one-more", producer="mallory").state == "refereeing"


def test_long_lists_keep_the_newest_and_the_totals_stay_whole(
    market: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lists were cut at ``MAX_LISTED`` from the oldest: past it a competition's newest
    submissions and payments vanished from every listing (and the leaderboard's total,
    summed from that list, stopped growing)."""
    paid = [pay(market, submit(market, f"m{i}", producer="alice"), 0.1) for i in range(3)]
    monkeypatch.setattr(sqlite_market, "MAX_LISTED", 2)
    assert [s.id for s in market.list_submissions("tiny-lm")] == [p.id for p in paid[1:]]
    assert [e.submission_id for e in market.ledger("tiny-lm")] == [p.id for p in paid[1:]]
    assert [e.submission_id for e in market.ledger()] == [p.id for p in paid[1:]]
    assert market.balances("tiny-lm") == {"alice": pytest.approx(30.0)}

"""Review of the referee claim rules (brief REVIEW10), on both backends. ``queue/claims.py``
was being reworked by another helper meanwhile; the gap found here (the incumbent
refereeing challenges to its own frontier) is closed in ``claims.panel_blocker``."""

from __future__ import annotations

import pytest

from fleetkit import make_cap
from marketkit import BASELINE_SCORE, pay, sha, submit, terms
from trainfleet.queue import JobQueue
from trainfleet.verify.spec import RefereeTask


def worker(queue: JobQueue, host: str) -> str:
    hosts = {h.name for h in queue.list_hosts()}
    token = queue.enroll_host(host) if host not in hosts else queue.rotate_host(host)[0]
    record, _ = queue.register_enrolled(make_cap(host), token)
    return record.id


@pytest.fixture
def market(queue: JobQueue) -> JobQueue:
    queue.create_competition(terms(), sha("baseline"), BASELINE_SCORE)
    return queue


def test_the_incumbent_s_host_never_referees_a_challenge_to_its_own_frontier(
    market: JobQueue,
) -> None:
    pay(market, submit(market, "alice-model", producer="alice"), 0.3)  # alice holds the frontier
    challenge = submit(market, "bob-model", producer="bob")
    assert challenge.frontier == sha("alice-model")
    claim = market.claim(worker(market, "alice"))
    assert claim is None or not isinstance(claim.job.spec.task, RefereeTask)


def test_a_second_host_of_the_producer_s_owner_may_referee(market: JobQueue) -> None:
    """By design: hosts are the unit of identity, and nothing ties two hosts to one owner. A
    producer with several enrolled hosts (a sybil) can referee its own submission from the
    others; only the m-of-n panel holds it back (for the README's "Verification and market"
    section)."""
    submit(market, "m1", producer="alice")
    claim = market.claim(worker(market, "alice-2"))
    assert claim is not None and isinstance(claim.job.spec.task, RefereeTask)

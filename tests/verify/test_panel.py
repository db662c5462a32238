"""Panel judgement: reports from untrusted loss arrays, and the m-of-n verdict."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from trainfleet.verify.gate import GateResult, Interval
from trainfleet.verify.panel import (
    RefereeReport,
    failed_report,
    judge,
    report_from_losses,
)

GATE = {"margin": 0.0, "confidence": 0.95, "resamples": 1000, "seed": 0}


def _report(index: int, candidate: Any, frontier: Any, host: str = "", **kw: Any) -> RefereeReport:
    return report_from_losses(
        index, f"w{index}", host or f"host{index}", candidate, frontier, **{**GATE, **kw}
    )


def _made_up(index: int, lo: float, hi: float, improvement: float = 0.05) -> RefereeReport:
    """A report whose candidate interval is [lo, hi] (for the judge's arithmetic alone)."""
    gate = GateResult(improvement > 0, "made up", improvement, improvement / 2, 64)
    interval = Interval((lo + hi) / 2, lo, hi, 64)
    return RefereeReport(index, f"w{index}", f"host{index}", interval, gate, True, "made up")


def test_a_report_holds_the_candidate_interval_and_the_paired_gate() -> None:
    rng = np.random.default_rng(0)
    frontier = rng.normal(2.5, 0.4, 64)
    candidate = frontier - 0.05 + rng.normal(0, 0.02, 64)
    report = _report(0, candidate.tolist(), frontier.tolist(), windows=64)
    assert report.ok
    assert report.candidate.mean == pytest.approx(candidate.mean())
    assert report.candidate.lo < candidate.mean() < report.candidate.hi
    assert report.gate.certified
    assert report.gate.improvement == pytest.approx(0.05, abs=0.01)
    assert "candidate" in report.reason and "certified" in report.reason


@pytest.mark.parametrize(
    ("candidate", "frontier", "windows", "words"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], None, "not paired"),
        ([1.0, math.nan], [1.0, 2.0], None, "non-finite"),
        ([1.0, 2.0], [1.0, math.inf], None, "non-finite"),
        ([1.0, 2.0], [1.0, 2.0], 3, "not the 3 asked for"),
        ([1.0] * 5, [1.0] * 5, 4, "more than the 4 asked for"),
        ([1.0] * 4097, [1.0] * 4097, None, "more than the 4096"),
        ({"a": 1}, [1.0, 2.0], None, "not a list"),
        ("1.0,2.0", [1.0, 2.0], None, "not a list"),
        ([1.0, "2"], [1.0, 2.0], None, "not a number"),
        ([1.0, None], [1.0, 2.0], None, "non-finite loss"),
        ([True, 2.0], [1.0, 2.0], None, "not a number"),
        ([], [], None, "fewer than 2"),
    ],
)
def test_unusable_losses_give_a_report_that_vouches_for_nothing(
    candidate: Any, frontier: Any, windows: int | None, words: str
) -> None:
    report = _report(1, candidate, frontier, windows=windows)
    assert not report.ok
    assert not report.gate.certified
    assert words in report.reason
    assert not report.candidate.contains(1.0)


def test_a_genuine_split_vote_is_accepted_by_quorum_not_unanimity() -> None:
    """Two honest subsets bracket the claim; a third, harder subset does not."""
    reports = [_made_up(0, 2.28, 2.36), _made_up(1, 2.29, 2.34), _made_up(2, 2.35, 2.41)]
    two_of_three = judge(2.31, 2.40, reports, m=2, n=3)
    assert two_of_three.state == "accepted"
    assert two_of_three.claim_inside == 2
    assert "inside 2 of 3" in two_of_three.reason
    unanimous = judge(2.31, 2.40, reports, m=3, n=3)
    assert unanimous.state == "rejected"
    assert "inflated claim" in unanimous.reason


def test_the_trusted_score_is_the_frontier_minus_the_median_improvement() -> None:
    """A lone referee reporting a huge improvement cannot move the consensus."""
    reports = [
        _made_up(0, 2.3, 2.4, improvement=0.04),
        _made_up(1, 2.3, 2.4, improvement=0.05),
        _made_up(2, 2.3, 2.4, improvement=5.0),
    ]
    verdict = judge(2.35, 2.40, reports, m=2, n=3)
    assert verdict.state == "accepted"
    assert verdict.improvement == pytest.approx(0.05)
    assert verdict.trusted_score == pytest.approx(2.35)
    assert verdict.certified == 3


def test_too_few_usable_reports_reject_whatever_the_claim() -> None:
    good = _made_up(0, 2.3, 2.4)
    broken = [
        failed_report(1, "w1", "host1", "job failed 3 times"),
        failed_report(2, "w2", "host2", "nan"),
    ]
    verdict = judge(2.35, 2.40, [good, *broken], m=2, n=3)
    assert verdict.state == "rejected"
    assert "only 1 of 3" in verdict.reason
    assert judge(2.35, 2.40, [], m=1, n=3).state == "rejected"
    assert math.isnan(judge(2.35, 2.40, [], m=1, n=3).improvement)


def test_one_host_is_one_referee_and_one_slot_counts_once() -> None:
    same_host = [
        RefereeReport(i, f"w{i}", "laptop", r.candidate, r.gate, True, "")
        for i, r in enumerate([_made_up(0, 2.3, 2.4)] * 3)
    ]
    verdict = judge(2.35, 2.40, same_host, m=2, n=3)
    assert verdict.state == "rejected" and "only 1 of 3" in verdict.reason
    repeated = [_made_up(0, 2.3, 2.4)] * 3
    assert judge(2.35, 2.40, repeated, m=2, n=3).state == "rejected"
    out_of_panel = [_made_up(0, 2.3, 2.4), _made_up(7, 2.3, 2.4)]
    assert judge(2.35, 2.40, out_of_panel, m=2, n=3).state == "rejected"


@pytest.mark.parametrize("claim", [math.nan, math.inf, -math.inf])
def test_a_non_finite_claim_is_rejected(claim: float) -> None:
    reports = [_made_up(i, -1e308, 1e308) for i in range(3)]
    verdict = judge(claim, 2.40, reports, m=1, n=3)
    assert verdict.state == "rejected"
    assert verdict.claim_inside == 0


def test_a_free_rider_is_accepted_but_certifies_nothing() -> None:
    """Resubmitting the frontier with an honest claim: true, but no improvement to pay."""
    rng = np.random.default_rng(1)
    reports = []
    for i in range(3):
        frontier = rng.normal(2.4, 0.4, 64).tolist()
        reports.append(_report(i, list(frontier), frontier))
    claim = float(np.mean([r.candidate.mean for r in reports]))
    verdict = judge(claim, 2.40, reports, m=2, n=3)
    assert verdict.certified == 0
    assert verdict.improvement == 0.0
    assert verdict.trusted_score == 2.40


def test_a_quorum_outside_the_panel_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="quorum"):
        judge(2.0, 2.0, [], m=4, n=3)
    with pytest.raises(ValueError, match="quorum"):
        judge(2.0, 2.0, [], m=0, n=3)

"""Review of ``verify.panel`` (brief REVIEW10): loss arrays a lying or broken referee could
send, which must give a report that vouches for nothing, never an exception or a pass."""

from __future__ import annotations

from typing import Any

import pytest

from trainfleet.verify.panel import MAX_LOSS, judge, report_from_losses

GATE = {"margin": 0.0, "confidence": 0.95, "resamples": 1000, "seed": 0, "windows": 8}
HONEST = [2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 2.1, 1.9]


def _report(candidate: Any, frontier: Any, index: int = 0) -> Any:
    return report_from_losses(index, f"w{index}", f"host{index}", candidate, frontier, **GATE)


@pytest.mark.parametrize(
    ("candidate", "frontier", "why"),
    [
        ([10**400] * 8, HONEST, "too large for a float"),  # JSON integers are unbounded
        (HONEST, [10**400] * 8, "too large for a float"),
        ([-5.0] * 8, HONEST, "never negative"),  # "certified" a 7-nat improvement before
        (HONEST, [1e300] * 8, "outside"),  # the frontier made terrible: any candidate wins
        ([1.7e308] * 8, HONEST, "outside"),  # its mean overflowed to inf
    ],
)
def test_implausible_losses_vouch_for_nothing(candidate: Any, frontier: Any, why: str) -> None:
    report = _report(candidate, frontier)
    assert not report.ok and why in report.reason
    assert not report.gate.certified
    verdict = judge(2.0, 2.5, [report], m=1, n=1)
    assert verdict.state == "rejected" and verdict.certified == 0


def test_losses_at_the_bounds_are_still_measurements() -> None:
    assert _report([0.0] * 8, [MAX_LOSS] * 8).ok
    assert _report(HONEST, HONEST).ok

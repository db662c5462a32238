"""Panel judgement: n referees' loss arrays -> reports -> one verdict on a submission.

Each referee evaluated the candidate and the frontier on its own seeded subset of held-out
windows and returned the two per-window loss arrays. The coordinator (never the referee, and
never the submitter) turns them into a ``RefereeReport``: the candidate's mean loss with its
bootstrap interval, and the paired gate of candidate against frontier. Anything malformed
(wrong lengths, non-numbers, NaN from a diverged model) is a report with ``ok = False``: it
counts as a referee that could not vouch for the submission, never as a pass.

``judge`` applies the panel rule. A claim (the submitter's own held-out loss) is accepted only
if it lies inside the intervals of at least ``m`` referees; a claim that most referees'
intervals exclude is an inflated claim and is rejected. Acceptance via ``m`` rather than
unanimity tolerates the honest split vote (one subset that happened to be easy or hard). The
claim itself is never used as a score: the trusted score is the frontier's score minus the
panel's consensus improvement, the median of the usable referees' paired improvements (a
single lying or broken referee cannot move a median of three). Whether the submission is paid
is the market's rule (``verify.market``): accepted, ``certified >= m`` and improvement > 0.

One machine is one referee: reports are counted once per panel slot and once per host, so a
host running several workers cannot fill a quorum alone (claims already keep a panel's jobs on
distinct hosts; this is the same rule, applied again where the verdict is made).
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from trainfleet.verify.gate import GateResult, Interval, Refusal, mean_interval, paired_gate
from trainfleet.verify.spec import MAX_WINDOWS

MAX_LOSS = 1e6
"""The largest per-window loss (nats/token) a report may carry, and the largest claim: far
above any model's cross entropy (ln of the vocabulary for a uniform guess), far below
where a sum of ``MAX_WINDOWS`` of them stops being exact enough to judge."""

_NO_INTERVAL = Interval(mean=math.nan, lo=math.nan, hi=math.nan, n=0)


@dataclass(frozen=True)
class RefereeReport:
    """What one referee's evaluation says, as computed by the coordinator from its losses."""

    index: int
    worker_id: str
    host: str
    candidate: Interval
    """The candidate's mean loss on this referee's subset, with its two-sided interval."""
    gate: GateResult
    """The paired gate of candidate against frontier on the same windows."""
    ok: bool
    """False: the evaluation was malformed, non-finite or refused; it vouches for nothing."""
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The panel's decision on a submission's claim, and its trusted score."""

    state: Literal["accepted", "rejected"]
    claim_inside: int
    """Usable referees whose candidate interval contains the claim."""
    certified: int
    """Usable referees whose gate certified an improvement over the frontier."""
    improvement: float
    """Consensus improvement over the frontier: median of the usable referees' (nan if none)."""
    trusted_score: float
    """``frontier_score - improvement``: the panel's score for the candidate."""
    reason: str


def _loss_list(values: Any, what: str, windows: int | None) -> list[float]:
    """``values`` as floats if they are a list of at most ``MAX_WINDOWS`` real numbers (of
    exactly ``windows`` when given) in ``[0, MAX_LOSS]``; ``Refusal`` otherwise. Non-finite
    numbers pass here: the gate refuses them with its own reason. The range keeps a lying
    referee's numbers plausible (a negative loss, or a frontier loss of 1e300, would
    "certify" any improvement) and every sum finite."""
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise Refusal(f"{what} are not a list of numbers")
    limit = MAX_WINDOWS if windows is None else windows
    if len(values) > limit:
        raise Refusal(f"{what} hold {len(values)} values, more than the {limit} asked for")
    if windows is not None and len(values) != windows:
        raise Refusal(f"{what} hold {len(values)} values, not the {windows} asked for")
    for value in values:
        if value is None:
            raise Refusal(f"{what} hold null: a non-finite loss (a diverged model?)")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise Refusal(f"{what} hold a value that is not a number: {str(value)[:40]!r}")
    try:
        losses = [float(v) for v in values]
    except OverflowError:  # an integer beyond any float (JSON integers are unbounded)
        raise Refusal(f"{what} hold a number too large for a float") from None
    if any(math.isfinite(v) and not 0.0 <= v <= MAX_LOSS for v in losses):
        raise Refusal(
            f"{what} hold a value outside [0, {MAX_LOSS:g}]: a cross entropy is never negative,"
            " and a loss that large is no measurement"
        )
    return losses


def report_from_losses(
    index: int,
    worker_id: str,
    host: str,
    candidate_losses: Any,
    frontier_losses: Any,
    *,
    margin: float,
    confidence: float,
    resamples: int,
    seed: int,
    windows: int | None = None,
) -> RefereeReport:
    """One referee's report from the loss arrays it returned (untrusted: any JSON value).
    ``windows``, when given, is the subset size the task asked for: both arrays must have
    exactly that many losses. Fails closed: anything unusable gives ``ok = False``."""
    try:
        candidate = _loss_list(candidate_losses, "candidate losses", windows)
        frontier = _loss_list(frontier_losses, "frontier losses", windows)
        interval = mean_interval(candidate, confidence=confidence, resamples=resamples, seed=seed)
    except Refusal as refusal:
        reason = f"refused: {refusal}"
        gate = GateResult(False, reason, math.nan, math.nan, 0)
        return RefereeReport(index, worker_id, host, _NO_INTERVAL, gate, False, reason)
    gate = paired_gate(
        candidate,
        frontier,
        margin=margin,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )
    if math.isnan(gate.improvement):  # refused: mismatched or non-finite frontier losses
        return RefereeReport(index, worker_id, host, _NO_INTERVAL, gate, False, gate.reason)
    reason = (
        f"candidate {interval.mean:.4f} [{interval.lo:.4f}, {interval.hi:.4f}] over "
        f"{interval.n} windows; {gate.reason}"
    )
    return RefereeReport(index, worker_id, host, interval, gate, True, reason)


def failed_report(index: int, worker_id: str, host: str, reason: str) -> RefereeReport:
    """The report of a referee whose job failed or returned nothing usable."""
    gate = GateResult(False, f"refused: {reason}", math.nan, math.nan, 0)
    return RefereeReport(index, worker_id, host, _NO_INTERVAL, gate, False, reason)


def _counted(reports: Sequence[RefereeReport], n: int) -> list[RefereeReport]:
    """The usable reports that count: one per panel slot (0..n-1) and one per host."""
    slots: set[int] = set()
    hosts: set[str] = set()
    counted = []
    for report in sorted(reports, key=lambda r: r.index):
        if not report.ok or not 0 <= report.index < n:
            continue
        if report.index in slots or report.host in hosts:
            continue
        slots.add(report.index)
        hosts.add(report.host)
        counted.append(report)
    return counted


def _rejected(
    reason: str, inside: int, certified: int, improvement: float, frontier: float
) -> Verdict:
    return Verdict("rejected", inside, certified, improvement, frontier - improvement, reason)


def judge(
    claim: float, frontier_score: float, reports: Sequence[RefereeReport], *, m: int, n: int
) -> Verdict:
    """The panel's verdict on ``claim`` from ``reports`` of a panel of ``n`` needing ``m``."""
    if not 1 <= m <= n:
        raise ValueError(f"the quorum m={m} must lie between 1 and the panel size n={n}")
    usable = _counted(reports, n)
    inside = sum(1 for r in usable if r.candidate.contains(claim))
    certified = sum(1 for r in usable if r.gate.certified)
    improvement = statistics.median(r.gate.improvement for r in usable) if usable else math.nan
    if not math.isfinite(claim):
        return _rejected(
            f"claim {claim} is not a finite loss", inside, certified, improvement, frontier_score
        )
    if not math.isfinite(frontier_score):
        return _rejected(
            f"frontier score {frontier_score} is not finite",
            inside,
            certified,
            improvement,
            frontier_score,
        )
    if len(usable) < m:
        return _rejected(
            f"only {len(usable)} of {n} referees (on distinct hosts) returned a usable "
            f"evaluation, fewer than the quorum of {m}",
            inside,
            certified,
            improvement,
            frontier_score,
        )
    trusted = frontier_score - improvement
    summary = (
        f"claim {claim:.4f} inside {inside} of {len(usable)} referees' intervals; "
        f"{certified} of {len(usable)} certified an improvement; consensus improvement "
        f"{improvement:.4f} nats, trusted score {trusted:.4f}"
    )
    if inside < m:
        return _rejected(
            f"inflated claim: {summary} (needs {m})",
            inside,
            certified,
            improvement,
            frontier_score,
        )
    return Verdict("accepted", inside, certified, improvement, trusted, f"accepted: {summary}")

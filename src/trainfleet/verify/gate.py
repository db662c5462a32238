"""The held-out gate: does a candidate model beat a baseline on the same held-out windows?

A referee evaluates both models on one seeded subset of held-out windows and hands back one
loss per window for each. The windows differ in difficulty far more than the models do, so the
gate works on the paired differences ``d_i = baseline_i - candidate_i`` (nats; positive means
the candidate is better): the window's own difficulty cancels, and a small improvement is
visible on a few dozen windows where two unpaired means would drown it.

The uncertainty of the mean difference comes from a seeded percentile bootstrap (Efron &
Tibshirani 1993, ch. 13): ``resamples`` resamples of the ``n`` differences with replacement,
drawn as one ``resamples x n`` index matrix from ``numpy.random.Generator(PCG64(seed))``, so
the same inputs and seed give the same bound on every machine. An improvement is certified
only when the one-sided lower bound (the ``1 - confidence`` quantile of the resampled means)
exceeds ``margin``. Identical models give differences of exactly zero and a lower bound of
zero, so a resubmission of the frontier is never certified at ``margin >= 0``.

It fails closed: empty, mismatched or non-finite inputs (a diverged model's NaN loss) are a
refusal with a reason, never a pass. ``mean_interval`` raises ``Refusal``; ``paired_gate``
returns an uncertified ``GateResult`` carrying the reason and never raises.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 2
"""Fewer losses than this give a zero-width interval: no evidence of anything."""

_MAX_CELLS = 1 << 22
"""Resample in chunks of at most this many indices (32 MiB of int64) to bound memory."""


class Refusal(ValueError):
    """Losses the gate will not judge (empty, too few, non-finite, mismatched lengths)."""


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided bootstrap interval at some confidence, over ``n`` values."""

    mean: float
    lo: float
    hi: float
    n: int

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside the closed interval (never for a non-finite one)."""
        return math.isfinite(value) and self.lo <= value <= self.hi

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


@dataclass(frozen=True)
class GateResult:
    """The gate's decision on a candidate against a baseline, with the reason in words."""

    certified: bool
    reason: str
    improvement: float
    """Mean of ``baseline_i - candidate_i`` in nats (positive: better); nan if refused."""
    lower: float
    """One-sided lower bound of ``improvement`` at the confidence; nan if refused."""
    n: int


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _as_losses(values: Sequence[float], what: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "fiu":
            raise Refusal(f"{what} are not numbers (dtype {values.dtype})")
    elif isinstance(values, str | bytes) or not all(_is_number(v) for v in values):
        raise Refusal(f"{what} must be a list of numbers")
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise Refusal(f"{what} must be a flat list of numbers, not shape {array.shape}")
    if len(array) < MIN_SAMPLES:
        raise Refusal(f"{what} hold {len(array)} values, fewer than {MIN_SAMPLES}")
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise Refusal(f"{what} hold {bad} non-finite values (nan or inf) of {len(array)}")
    return array


def _check_settings(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise Refusal(f"confidence must lie strictly between 0 and 1, not {confidence}")
    if resamples < 1:
        raise Refusal(f"resamples must be at least 1, not {resamples}")


def bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The means of ``resamples`` seeded resamples (with replacement) of ``values``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(values)
    rows = max(1, _MAX_CELLS // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        means[start : start + count] = values[rng.integers(0, n, size=(count, n))].mean(axis=1)
    return means


def mean_interval(
    losses: Sequence[float], *, confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> Interval:
    """The mean of ``losses`` and its two-sided percentile bootstrap interval; ``Refusal``
    on empty, too short or non-finite input."""
    _check_settings(confidence, resamples)
    values = _as_losses(losses, "losses")
    means = bootstrap_means(values, resamples, seed)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean=float(values.mean()), lo=float(lo), hi=float(hi), n=len(values))


def _refused(reason: str, n: int) -> GateResult:
    return GateResult(
        certified=False, reason=f"refused: {reason}", improvement=math.nan, lower=math.nan, n=n
    )


def paired_gate(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    margin: float = 0.0,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> GateResult:
    """Certify that ``candidate`` beats ``baseline`` (per-window losses on the same windows)
    by more than ``margin`` nats: the one-sided bootstrap lower bound of the mean paired
    improvement must exceed it. Never raises: bad input is an uncertified, refused result."""
    try:
        _check_settings(confidence, resamples)
        if not math.isfinite(margin):
            raise Refusal(f"margin must be a finite number, not {margin}")
        cand = _as_losses(candidate, "candidate losses")
        base = _as_losses(baseline, "baseline losses")
    except Refusal as refusal:
        return _refused(str(refusal), 0)
    if len(cand) != len(base):
        return _refused(
            f"{len(cand)} candidate losses but {len(base)} baseline losses: not paired", 0
        )
    diffs = base - cand
    means = bootstrap_means(diffs, resamples, seed)
    lower = float(np.quantile(means, 1.0 - confidence))
    improvement = float(diffs.mean())
    n = len(diffs)
    certified = lower > margin
    verdict = (
        f"certified: lower {lower:.4g} > margin"
        if certified
        else (f"not certified: lower {lower:.4g} <= margin")
    )
    reason = f"{verdict} {margin:.4g} (improvement {improvement:.4g} nats, n={n})"
    return GateResult(certified, reason, improvement, lower, n)

"""Small statistics the cheat benchmark reports: Wilson intervals and Spearman's rank
correlation (numpy only; no scipy in the environment)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a binomial proportion; (0, 1) if no
    trials (Wilson 1927, the interval Agresti & Coull 1998 recommend over the Wald one)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # The interval contains p; say so exactly where rounding would put p a hair outside.
    return max(0.0, min(p, centre - spread)), min(1.0, max(p, centre + spread))


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="mergesort")
    ranked = np.empty(len(array), dtype=np.float64)
    i = 0
    while i < len(array):
        j = i
        while j + 1 < len(array) and array[order[j + 1]] == array[order[i]]:
            j += 1
        ranked[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranked


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the tie-averaged ranks; nan if either side
    is constant or shorter than 2."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs paired values, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])

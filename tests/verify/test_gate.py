"""The held-out gate: paired bootstrap certification that fails closed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainfleet.verify.gate import Refusal, bootstrap_means, mean_interval, paired_gate


def _losses(seed: int, n: int = 64, mean: float = 2.5, spread: float = 0.4) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, spread, n)


def test_a_clear_improvement_is_certified() -> None:
    baseline = _losses(1)
    # Per-window difficulty dominates (spread 0.4); the candidate is 0.05 better on each
    # window give or take 0.02: paired, that is unmistakable.
    candidate = baseline - 0.05 + np.random.default_rng(2).normal(0, 0.02, len(baseline))
    result = paired_gate(candidate.tolist(), baseline.tolist(), margin=0.01)
    assert result.certified
    assert result.reason.startswith("certified: lower")
    assert 0.04 < result.improvement < 0.06
    assert 0.01 < result.lower < result.improvement
    assert result.n == 64


def test_identical_models_are_never_certified() -> None:
    """The free-rider: resubmitting the frontier gives zero differences, a zero bound."""
    baseline = _losses(3).tolist()
    result = paired_gate(list(baseline), baseline)
    assert not result.certified
    assert result.improvement == 0.0
    assert result.lower == 0.0
    assert result.reason.startswith("not certified")


def test_a_worse_candidate_is_not_certified() -> None:
    baseline = _losses(4)
    result = paired_gate((baseline + 0.05).tolist(), baseline.tolist())
    assert not result.certified
    assert result.improvement == pytest.approx(-0.05)
    assert result.lower < 0


def test_noise_without_improvement_is_rarely_certified() -> None:
    """Equal models measured with noise: the 95% one-sided gate passes about 5% of them."""
    passed = 0
    for seed in range(200):
        baseline = _losses(seed)
        candidate = baseline + np.random.default_rng(10_000 + seed).normal(0, 0.05, 64)
        passed += paired_gate(candidate.tolist(), baseline.tolist(), seed=seed).certified
    assert passed <= 20  # 5% of 200 is 10; 20 is far outside binomial noise


def test_certification_is_monotone_in_margin() -> None:
    baseline = _losses(5)
    candidate = baseline - 0.03 + np.random.default_rng(6).normal(0, 0.03, 64)
    results = [
        paired_gate(candidate.tolist(), baseline.tolist(), margin=margin)
        for margin in np.linspace(0.0, 0.06, 25)
    ]
    lowers = {r.lower for r in results}
    assert len(lowers) == 1  # the bound does not depend on the margin...
    certified = [r.certified for r in results]
    assert certified[0] and not certified[-1]
    first_refusal = certified.index(False)  # ...so certification stops once and for all
    assert not any(certified[first_refusal:])


def test_the_lower_bound_shifts_with_the_improvement() -> None:
    baseline = _losses(7)
    candidate = baseline + np.random.default_rng(8).normal(0, 0.03, 64)
    base = paired_gate(candidate.tolist(), baseline.tolist())
    better = paired_gate((candidate - 0.1).tolist(), baseline.tolist())
    assert better.lower == pytest.approx(base.lower + 0.1)
    assert better.improvement == pytest.approx(base.improvement + 0.1)


@pytest.mark.parametrize(
    ("candidate", "baseline", "words"),
    [
        ([], [], "fewer than 2"),
        ([1.0], [1.0], "fewer than 2"),
        ([1.0, math.nan], [1.0, 2.0], "non-finite"),
        ([1.0, 2.0], [1.0, math.inf], "non-finite"),
        ([1.0, 2.0, 3.0], [1.0, 2.0], "not paired"),
        ([1.0, "2.0"], [1.0, 2.0], "list of numbers"),
        ([True, False], [1.0, 2.0], "list of numbers"),
        ("12", [1.0, 2.0], "list of numbers"),
        ([[1.0], [2.0]], [1.0, 2.0], "list of numbers"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    candidate: object, baseline: object, words: str
) -> None:
    result = paired_gate(candidate, baseline, margin=-100.0)  # type: ignore[arg-type]
    assert not result.certified
    assert result.reason.startswith("refused:")
    assert words in result.reason
    assert math.isnan(result.improvement) and math.isnan(result.lower)


def test_bad_settings_are_refused_not_raised() -> None:
    assert not paired_gate([1.0, 2.0], [2.0, 3.0], confidence=1.0).certified
    assert not paired_gate([1.0, 2.0], [2.0, 3.0], resamples=0).certified
    assert not paired_gate([1.0, 2.0], [2.0, 3.0], margin=math.nan).certified


@pytest.mark.parametrize("losses", [[], [2.0], [2.0, math.nan], [math.inf, 1.0], ["a", "b"]])
def test_mean_interval_raises_refusal(losses: list[float]) -> None:
    with pytest.raises(Refusal):
        mean_interval(losses)


def test_same_seed_same_result_other_seed_other_bounds() -> None:
    losses = _losses(9).tolist()
    assert mean_interval(losses, seed=3) == mean_interval(losses, seed=3)
    assert mean_interval(losses, seed=3) != mean_interval(losses, seed=4)
    candidate = (np.array(losses) - 0.01).tolist()
    assert paired_gate(candidate, losses, seed=5) == paired_gate(candidate, losses, seed=5)


def test_resampling_in_chunks_draws_the_same_means() -> None:
    """Chunking bounds memory; the draws must not depend on it beyond the chunk size."""
    values = _losses(10, n=8)
    whole = bootstrap_means(values, 50, seed=1)
    assert whole.shape == (50,)
    assert np.all((whole >= values.min()) & (whole <= values.max()))
    assert np.array_equal(whole, bootstrap_means(values, 50, seed=1))


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    trials, covered, lower_held = 400, 0, 0
    for seed in range(trials):
        # Data streams of their own ([seed, k]), independent of the bootstrap's PCG64(seed).
        losses = np.random.default_rng([seed, 1]).normal(2.0, 0.5, 100)
        interval = mean_interval(losses.tolist(), seed=seed)
        covered += interval.lo <= 2.0 <= interval.hi
        diffs = np.random.default_rng([seed, 2]).normal(0.01, 0.1, 100)
        gate = paired_gate((-diffs).tolist(), np.zeros(100).tolist(), seed=seed)
        lower_held += gate.lower <= 0.01
    # Binomial noise over 400 trials: a standard deviation of 1.1 points around 95%.
    assert 0.915 <= covered / trials <= 0.985
    assert 0.915 <= lower_held / trials <= 0.985


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=200),
    st.integers(min_value=0, max_value=2**32),
)
def test_the_interval_lies_within_the_data(losses: list[float], seed: int) -> None:
    interval = mean_interval(losses, resamples=200, seed=seed)
    assert min(losses) - 1e-6 <= interval.lo <= interval.hi <= max(losses) + 1e-6
    assert interval.n == len(losses)

"""The fair-share arithmetic (``queue.fairshare``), against Slurm's closed forms: decay by
half-life, the charge of an interval, normalized usage, shares, factor and level."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetkit import manifest_of
from trainfleet.errors import ManifestError
from trainfleet.queue import fairshare as fs

H = 168.0


def test_usage_halves_every_half_life_and_never_grows_on_a_backward_clock() -> None:
    assert fs.decay(8.0, H * 3600, H) == pytest.approx(4.0)
    assert fs.decay(8.0, 3 * H * 3600, H) == pytest.approx(1.0)
    assert fs.decay(8.0, 0.0, H) == 8.0
    assert fs.decay(8.0, -3600.0, H) == 8.0  # a clock step back is not negative time
    # closed form at an arbitrary point: U * 2^-(t/H)
    assert fs.decay(3.0, 5000.0, 2.0) == pytest.approx(3.0 * 2 ** (-(5000 / 3600) / 2.0))


def test_an_interval_is_charged_the_integral_of_its_decay() -> None:
    # one hour with no decay to speak of is one job-hour; with H = 1 h it is 1/(2 ln 2)
    assert fs.interval_hours(0.0, 3600.0, 1e9) == pytest.approx(1.0)
    assert fs.interval_hours(0.0, 3600.0, 1.0) == pytest.approx(1 / (2 * math.log(2)))
    assert fs.interval_hours(0.0, 3600.0, H) == pytest.approx(H / math.log(2) * (1 - 2 ** (-1 / H)))
    assert fs.interval_hours(10.0, 5.0, H) == 0.0  # an empty (or backward) interval
    assert fs.interval_hours(0.0, 1e-3, H) == pytest.approx(1e-3 / 3600, rel=1e-9)


@given(
    a=st.floats(0, 1e6),
    cut=st.floats(0, 1),
    length=st.floats(0, 1e6),
    half_life_h=st.floats(0.01, 1e4),
)
def test_charging_in_pieces_adds_up_to_charging_at_the_end(
    a: float, cut: float, length: float, half_life_h: float
) -> None:
    """A tick charges a running attempt up to now, the end charges the rest: the sum is the
    charge of the whole interval at its end, wherever the tick fell."""
    m, b = a + cut * length, a + length
    pieces = fs.decay(fs.interval_hours(a, m, half_life_h), b - m, half_life_h)
    pieces += fs.interval_hours(m, b, half_life_h)
    assert pieces == pytest.approx(fs.interval_hours(a, b, half_life_h), rel=1e-9, abs=1e-12)


def test_normalized_usage_and_shares() -> None:
    assert fs.normalized({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}
    assert fs.normalized({"a": 0.0, "b": 0.0}) == {"a": 0.0, "b": 0.0}  # nobody used anything
    assert fs.share_fractions(["a", "b"], {}) == {"a": 0.5, "b": 0.5}
    assert fs.share_fractions(["a", "b", "c"], {"a": 2.0, "z": 5.0}) == {
        "a": 0.5,
        "b": 0.25,
        "c": 0.25,
    }


def test_factor_and_level_follow_slurm() -> None:
    assert fs.factor(0.0, 0.5) == 1.0  # no use
    assert fs.factor(0.5, 0.5) == 0.5  # use exactly its share
    assert fs.factor(1.0, 0.5) == 0.25  # twice its share
    assert [fs.level(f) for f in (1.0, 0.5, 0.25, 0.0)] == [0, 5, 8, 10]
    assert fs.level(0.95) == 1 and fs.level(0.96) == 0  # 0.5 rounds up, below rounds down
    # a heavier weight lowers the level for the same use
    assert fs.level(fs.factor(0.5, 2 / 3)) < fs.level(fs.factor(0.5, 1 / 3))


def test_the_fair_share_table_is_validated_like_every_spec() -> None:
    m = manifest_of("[fair_share]\nhalf_life_h = 24\n[fair_share.shares]\nalice = 2\n")
    assert (m.fair_share.half_life_h, m.fair_share.interval_s) == (24.0, 5.0)
    assert m.fair_share.shares == {"alice": 2.0}
    assert manifest_of("").fair_share.half_life_h == 168.0
    for text, where in [
        ("[fair_share]\nhalf_lif_h = 2\n", "fair_share.half_lif_h"),
        ("[fair_share]\nhalf_life_h = 0\n", "fair_share.half_life_h"),
        ("[fair_share]\ninterval_s = -1\n", "fair_share.interval_s"),
        # a tick (a write transaction) every nanosecond would hold the write lock for good
        ("[fair_share]\ninterval_s = 1e-9\n", "fair_share.interval_s"),
        ("[fair_share]\nhalf_life_h = inf\n", "fair_share.half_life_h"),
        ("[fair_share.shares]\nalice = inf\n", "fair_share.shares.alice"),
        ("[fair_share]\nhalf_life_h = nan\n", "fair_share.half_life_h"),
        ("[fair_share.shares]\nalice = 0\n", "fair_share.shares.alice"),
        ("fair_share = 3\n", "fair_share"),
    ]:
        with pytest.raises(ManifestError, match=where.replace(".", r"\.")):
            manifest_of(text)


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 5e-324, "b": 1.0, "c": 1.0},  # a's share underflows to 0
        {"a": 1e308, "b": 1e308},  # the sum overflows to inf
        {"a": 1e308, "b": 5e-324},
    ],
)
def test_extreme_share_weights_give_finite_factors_and_levels(weights: dict[str, float]) -> None:
    shares = fs.share_fractions(weights, weights)
    assert all(0.0 <= s <= 1.0 for s in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0)
    for usage in (0.0, 0.5, 1.0):
        for share in shares.values():
            f = fs.factor(usage, share)
            assert 0.0 <= f <= 1.0 and 0 <= fs.level(f) <= fs.LEVELS
    assert fs.factor(0.0, 0.0) == 1.0  # no use: first in line, whatever the share
    assert fs.factor(0.5, 0.0) == 0.0  # use against no share: last

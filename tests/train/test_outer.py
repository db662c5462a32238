"""The outer step: screening, staleness damping, weighted averaging and outer Nesterov."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from trainfleet.manifest.runs import CompressionSpec
from trainfleet.train.outer import (
    Contribution,
    average,
    outer_step,
    screen,
    staleness_damping,
)
from trainfleet.train.pseudograd import decode, encode


def rand(seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": scale * torch.randn(8, 5, generator=g, dtype=torch.float64),
        "b": scale * torch.randn(5, generator=g, dtype=torch.float64),
    }


def test_screen_refuses_non_finite_with_reasons() -> None:
    nan, inf = rand(1), rand(2)
    nan["b"][0] = float("nan")
    inf["w"][2, 3] = float("inf")
    contribs = [Contribution(0, rand(0)), Contribution(1, nan), Contribution(2, inf)]
    accepted, refused = screen(contribs, outlier_factor=5.0)
    assert [c.replica for c in accepted] == [0]
    assert [(c.replica, r) for c, r in refused] == [
        (1, "non-finite values in b"),
        (2, "non-finite values in w"),
    ]


def test_screen_refuses_a_ten_times_outlier_among_four() -> None:
    contribs = [Contribution(i, rand(i)) for i in range(3)]
    contribs.append(Contribution(3, rand(3, scale=10.0), worker_id="bad"))
    accepted, refused = screen(contribs, outlier_factor=5.0)
    assert [c.replica for c in accepted] == [0, 1, 2]
    assert len(refused) == 1 and refused[0][0].worker_id == "bad"
    assert "> 5 x median norm" in refused[0][1]
    assert screen(contribs, outlier_factor=50.0)[1] == []


def test_screen_needs_three_finite_for_the_outlier_rule() -> None:
    contribs = [Contribution(0, rand(0)), Contribution(1, rand(1, scale=100.0))]
    accepted, refused = screen(contribs, outlier_factor=5.0)
    assert len(accepted) == 2 and refused == []


def test_with_fewer_than_three_the_rule_uses_earlier_rounds_median() -> None:
    from trainfleet.train.pseudograd import global_norm

    usual = global_norm(rand(0))
    contribs = [Contribution(0, rand(0)), Contribution(1, rand(1, scale=100.0), worker_id="bad")]
    accepted, refused = screen(contribs, outlier_factor=5.0, history_median=usual)
    assert [c.replica for c in accepted] == [0]
    assert refused[0][0].worker_id == "bad"
    assert "median norm of earlier rounds" in refused[0][1]
    # a lone replica is judged against history too; without history it is taken as is
    assert screen([contribs[1]], 5.0, history_median=usual)[1]
    assert screen([contribs[1]], 5.0)[1] == []


def test_staleness_damping() -> None:
    assert [staleness_damping(s) for s in (0, 1, 3)] == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError):
        staleness_damping(-1)


def test_average_weights_by_weight_times_damping() -> None:
    def const(v: float) -> dict[str, Tensor]:
        return {"w": torch.full((3,), v, dtype=torch.float64)}

    contribs = [
        Contribution(0, const(1.0)),
        Contribution(1, const(3.0), staleness=1),  # 0.5
        Contribution(2, const(7.0), weight=0.5, staleness=1),  # 0.25
    ]
    got = average(contribs)["w"]
    want = (1.0 * 1 + 3.0 * 0.5 + 7.0 * 0.25) / 1.75
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.full((3,), want, dtype=torch.float64), rtol=1e-15)
    with pytest.raises(ValueError):
        average([])
    with pytest.raises(ValueError):
        average([Contribution(0, const(1.0)), Contribution(1, {"x": torch.zeros(3)})])


def test_outer_step_lr1_mu0_is_w_minus_g() -> None:
    w = {k: v.float() for k, v in rand(0).items()}
    g = rand(1, scale=0.1)
    new_w, m = outer_step(w, g, None, lr=1.0, mu=0.0)
    assert m is None
    for k in w:
        assert new_w[k].dtype == torch.float32
        assert torch.equal(new_w[k], (w[k].double() - g[k]).float())


def test_one_replica_reproduces_its_end_weights_bit_for_bit() -> None:
    w = {k: v.float() for k, v in rand(0).items()}
    end = {k: v + 1e-3 * rand(5)[k].float() for k, v in w.items()}
    g = {k: w[k].double() - end[k].double() for k in w}
    new_w, _ = outer_step(w, g, None, lr=1.0, mu=0.0)
    assert all(torch.equal(new_w[k], end[k]) for k in w)
    # the same through the lossless codec and the average of one contribution
    dec = decode(encode(w, end, CompressionSpec(kind="none")).data, w)
    new_w, _ = outer_step(w, average([Contribution(0, dec.delta)]), None, lr=1.0, mu=0.0)
    assert all(torch.equal(new_w[k], end[k]) for k in w)


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_matches_torch_sgd(nesterov: bool) -> None:
    lr, mu = 0.7, 0.9
    start = {k: v.float() for k, v in rand(0).items()}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=mu, nesterov=nesterov)
    w, m = dict(start), None
    for step in range(3):
        delta = rand(10 + step, scale=0.1)
        for k, p in params.items():
            p.grad = delta[k].float()
        opt.step()
        w, m = outer_step(w, delta, m, lr=lr, mu=mu, nesterov=nesterov)
        assert m is not None and all(t.dtype == torch.float32 for t in m.values())
    for k, p in params.items():
        assert torch.allclose(w[k], p.detach(), atol=1e-6, rtol=0), k
        assert not torch.equal(w[k], start[k])


def test_outer_step_refuses_mismatched_names() -> None:
    w = {k: v.float() for k, v in rand(0).items()}
    with pytest.raises(ValueError):
        outer_step(w, {"w": rand(1)["w"]}, None, lr=0.7, mu=0.9)

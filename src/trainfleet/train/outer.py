"""The outer step of a DiLoCo round: screen, average and apply the replicas' pseudo-gradients.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105) averages the replicas' pseudo-gradients
(start weights minus end weights) and applies them with an outer Nesterov step; the paper's
defaults are outer lr 0.7 and momentum 0.9. Everything here is a pure function over dicts of
tensors and computes in float64; :func:`outer_step` rounds the weights (and the momentum) to
fp32 once, at the end. With lr 1 and no momentum it returns ``w - g`` exactly, so one
replica's end weights come back bit for bit when ``g = w - end`` (both fp32).

Robustness follows torchft's ``should_commit`` idea: a bad contribution is discarded and
recorded with a reason, and the round goes on with the rest. :func:`screen` refuses
non-finite pseudo-gradients, and, once at least three finite ones are in, any whose norm
exceeds ``outlier_factor`` times the median norm.

Staleness: a contribution computed from the weights of ``s`` rounds ago still applies, with
its weight damped by ``1 / (1 + s)`` (:func:`staleness_damping`).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from trainfleet.train.pseudograd import global_norm

log = logging.getLogger(__name__)

MIN_FOR_OUTLIERS = 3


@dataclass
class Contribution:
    """One replica's pseudo-gradient for one round, and how much it counts."""

    replica: int
    delta: dict[str, Tensor]
    staleness: int = 0
    weight: float = 1.0  # e.g. inner steps done / H
    worker_id: str = ""


def _non_finite(delta: dict[str, Tensor]) -> str | None:
    for name, t in delta.items():
        if not bool(torch.isfinite(t).all()):
            return name
    return None


def screen(
    contribs: list[Contribution], outlier_factor: float, history_median: float | None = None
) -> tuple[list[Contribution], list[tuple[Contribution, str]]]:
    """Split ``contribs`` into accepted (in order) and refused with a reason each.

    The norm rule compares with the median of the round's finite contributions when there
    are at least ``MIN_FOR_OUTLIERS`` of them; with fewer (a run of 1-2 replicas, or a round
    after refusals) it compares with ``history_median``, the median norm applied in earlier
    comparable rounds, when the caller has one."""
    refused: list[tuple[Contribution, str]] = []
    finite: list[tuple[Contribution, float]] = []
    for c in contribs:
        bad = _non_finite(c.delta)
        if bad is not None:
            refused.append((c, f"non-finite values in {bad}"))
        else:
            finite.append((c, global_norm(c.delta)))
    accepted: list[Contribution] = []
    median = statistics.median(n for _, n in finite) if finite else 0.0
    which = "median norm"
    if len(finite) < MIN_FOR_OUTLIERS:
        median, which = history_median or 0.0, "median norm of earlier rounds"
    for c, norm in finite:
        if median > 0 and norm > outlier_factor * median:
            refused.append((c, f"norm {norm:.4g} > {outlier_factor:g} x {which} {median:.4g}"))
        else:
            accepted.append(c)
    for c, reason in refused:
        log.warning("replica %d (worker %s) refused: %s", c.replica, c.worker_id, reason)
    return accepted, refused


def staleness_damping(s: int) -> float:
    """Weight factor of a contribution ``s`` rounds late: 1 / (1 + s)."""
    if s < 0:
        raise ValueError(f"staleness {s} < 0")
    return 1.0 / (1 + s)


def average(contribs: list[Contribution]) -> dict[str, Tensor]:
    """Float64 mean of the deltas weighted by ``weight * staleness_damping(staleness)``."""
    if not contribs:
        raise ValueError("no contributions to average")
    raw = [c.weight * staleness_damping(c.staleness) for c in contribs]
    total = sum(raw)
    if not total > 0:
        raise ValueError(f"contribution weights sum to {total}")
    names = set(contribs[0].delta)
    if any(set(c.delta) != names for c in contribs):
        raise ValueError("contributions name different tensors")
    out: dict[str, Tensor] = {}
    for name in contribs[0].delta:
        acc = contribs[0].delta[name].double() * (raw[0] / total)
        for c, w in zip(contribs[1:], raw[1:], strict=True):
            acc = acc + c.delta[name].double() * (w / total)
        out[name] = acc
    return out


def outer_step(
    weights: dict[str, Tensor],
    delta: dict[str, Tensor],
    momentum: dict[str, Tensor] | None,
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """New fp32 weights and momentum after one outer SGD step on pseudo-gradient ``delta``.

    torch.optim.SGD semantics (dampening 0) in float64: ``buf = mu * buf + g``; the update is
    ``g + mu * buf`` with Nesterov, else ``buf``; ``w = w - lr * update``. ``mu == 0`` keeps
    no buffer (momentum returned is None). A missing ``momentum`` starts from zeros.
    """
    if set(weights) != set(delta):
        raise ValueError("weights and delta name different tensors")
    if momentum is not None and mu != 0 and set(momentum) != set(weights):
        raise ValueError("momentum names different tensors than the weights")
    new_w: dict[str, Tensor] = {}
    new_m: dict[str, Tensor] | None = None if mu == 0 else {}
    for name, w in weights.items():
        g = delta[name].double()
        if new_m is None:
            update = g
        else:
            buf = g.clone() if momentum is None else mu * momentum[name].double() + g
            update = g + mu * buf if nesterov else buf
            new_m[name] = buf.float()
        new_w[name] = (w.double() - lr * update).float()
    return new_w, new_m

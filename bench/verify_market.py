"""Payment fidelity: does what the market pays track what each contribution is worth?

A simulated competition (king of the hill, design10.md section 3): personas submit in a
seeded interleaved order, each submission judged against the frontier of its time by n
referees (``verify_world.World.subset``: each referee its own seeded subset, evaluated now
with ``window_losses``), ``panel.judge``, ``market.payment``; a paid submission becomes the
frontier and the frontier score moves down by the consensus improvement
(``market.next_frontier``). Honest personas train the current frontier further (their
quality varies with steps and learning rate) and claim their true pool loss; cheats
interleave (inflated claim, free-rider, noisy copy of the frontier, sandbagger, diverged,
NaN).

True marginal value, on the secret set (files no referee and no contributor saw): a
submission's held-out improvement over the frontier it was judged against. That is its
leave-one-out value along the chain: leave it out and the chain loses exactly that step (to
first order: later submissions keep the improvement they made over their own frontier). A
submission that was not adopted is worth ``max(0, improvement)``: what paying it would have
added (an honest improvement turned away counts against the market). Also reported: the
exact leave-one-out of each adopted submission's weight delta on the final model, on the same
secret set.

DiLoCo rounds (point 6, where runs exist): from a common global model, replicas train on
different shards for different numbers of steps, some add noise to their pseudo-gradient.
Referees score each pseudo-gradient alone (paired improvement of ``global - delta_k`` over
``global``, median of n referees, as templar's Gauntlet scores by loss before and after); the
true value is the leave-one-out effect on the secret set of the round's averaged update:
``L(global - mean_{j != k} delta_j) - L(global - mean_j delta_j)``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.verify_cheats import CONFIDENCE, RESAMPLES, Setting, competition, trial_seed
from bench.verify_stats import spearman
from bench.verify_world import (
    Weights,
    World,
    average,
    file_bytes,
    minus,
    noisy,
    sha256,
    with_nan,
)
from trainfleet.verify.market import next_frontier, payment
from trainfleet.verify.panel import RefereeReport, judge, report_from_losses


@dataclass(frozen=True)
class Persona:
    name: str
    kind: str  # honest | inflated | free-rider | noisy copy | sandbagger | diverged | NaN
    steps: int = 0
    lr: float = 3e-3


def personas(quick: bool) -> list[Persona]:
    honest = [(20, 1e-3), (60, 3e-3), (150, 3e-3)] if quick else [
        (15, 1e-3), (30, 3e-3), (60, 1e-3), (80, 3e-3), (120, 3e-3), (160, 1e-3),
        (220, 3e-3), (300, 3e-3),
    ]  # fmt: skip
    return [Persona(f"honest-{s}-{lr:g}", "honest", s, lr) for s, lr in honest] + [
        Persona("inflated", "inflated", 30),
        Persona("free-rider", "free-rider"),
        Persona("noisy-copy", "noisy copy"),
        Persona("sandbagger", "sandbagger", 150),
        Persona("diverged", "diverged", 30, 1.0),
        Persona("nan", "NaN"),
    ]


@dataclass
class Submission:
    persona: Persona
    paid: float
    value: float
    state: str
    adopted: bool
    delta: Weights | None


def panel_reports(
    world: World, rule: str, setting: Setting, candidate: Weights, frontier: Weights, seed: int
) -> list[RefereeReport]:
    """n referees, each evaluating both models now on its own subset."""
    reports = []
    for index in range(setting.n):
        referee_seed = trial_seed(seed, index)
        chosen = world.subset(rule, setting.windows, referee_seed)
        reports.append(
            report_from_losses(
                index,
                f"referee-{index}",
                f"host-{index}",
                world.subset_losses(candidate, chosen).tolist(),
                world.subset_losses(frontier, chosen).tolist(),
                margin=setting.margin,
                confidence=CONFIDENCE,
                resamples=RESAMPLES,
                seed=referee_seed,
                windows=setting.windows,
            )
        )
    return reports


def simulate_market(
    world: World,
    setting: Setting,
    rule: str,
    baseline: Weights,
    half_width: float,
    rounds: int,
    seed: int,
    quick: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """One simulated competition; its paid-vs-value figures."""
    spec = competition(world, setting)
    rng = np.random.Generator(np.random.PCG64(seed))
    people = personas(quick)
    order = [people[int(j)] for _ in range(rounds) for j in rng.permutation(len(people))]
    frontier, score = baseline, world.pool_mean(baseline)
    baseline_score = score
    frontier_secret = baseline_secret = world.secret_mean(baseline)
    known = {sha256(file_bytes(frontier))}
    subs: list[Submission] = []
    for i, persona in enumerate(order):
        note = ""
        s = trial_seed(seed, i)
        if persona.kind == "honest":
            weights, _ = world.train(frontier, persona.steps, lr=persona.lr, seed=s)
            claim = world.pool_mean(weights)
        elif persona.kind == "inflated":
            weights, _ = world.train(frontier, persona.steps, lr=persona.lr, seed=s)
            claim = world.pool_mean(weights) - 3 * half_width
        elif persona.kind == "free-rider":
            weights, claim = frontier, score
        elif persona.kind == "noisy copy":
            weights, claim, note = noisy(frontier, 0.01, s), score, "copy"
        elif persona.kind == "sandbagger":
            full, _ = world.train(frontier, persona.steps, lr=persona.lr, seed=s)
            weights, _ = world.train(frontier, persona.steps // 5, lr=persona.lr, seed=s)
            claim = world.pool_mean(full)
        elif persona.kind == "diverged":
            weights, _ = world.train(frontier, persona.steps, lr=persona.lr, seed=s)
            claim = world.pool_mean(weights)
        else:
            weights, claim = with_nan(frontier), score - 0.05
        sha = sha256(file_bytes(weights, note))
        if sha in known:  # queue.submit's rule: a resubmitted file pays nothing, unrefereed
            subs.append(Submission(persona, 0.0, 0.0, "duplicate", False, None))
            continue
        known.add(sha)
        reports = panel_reports(world, rule, setting, weights, frontier, s)
        verdict = judge(claim, score, reports, m=setting.m, n=setting.n)
        paid = payment(spec, score, verdict)
        secret = world.secret_mean(weights) if persona.kind != "NaN" else math.inf
        value = frontier_secret - secret
        if paid > 0:
            subs.append(
                Submission(persona, paid, value, verdict.state, True, minus(weights, frontier))
            )
            frontier, frontier_secret = weights, secret
            score = next_frontier(score, verdict)
        else:
            subs.append(Submission(persona, 0.0, max(0.0, value), verdict.state, False, None))
    amounts = [x.paid for x in subs]
    values = [x.value for x in subs]
    by_persona: dict[str, list[float]] = {p.name: [0.0, 0.0] for p in people}
    for x in subs:
        by_persona[x.persona.name][0] += x.paid
        by_persona[x.persona.name][1] += x.value
    adopted = [x for x in subs if x.adopted]
    loo = [
        world.secret_mean(minus(frontier, x.delta)) - frontier_secret
        for x in adopted
        if x.delta is not None
    ]
    honest = [x for x in subs if x.persona.kind == "honest"]
    cheats = [x for x in subs if x.persona.kind != "honest"]
    say(
        f"market seed {seed}: {len(subs)} submissions, {len(adopted)} paid, spearman "
        f"{spearman(amounts, values):.3f}"
    )
    return {
        "submissions": len(subs),
        "paid_submissions": len(adopted),
        "spearman_submissions": spearman(amounts, values),
        "spearman_contributors": spearman(
            [v[0] for v in by_persona.values()], [v[1] for v in by_persona.values()]
        ),
        "spearman_loo_adopted": spearman([x.paid for x in adopted], loo),
        "total_paid": sum(amounts),
        "baseline_minus_final_score": baseline_score - score,
        "secret_improvement": baseline_secret - frontier_secret,
        "honest_paid_share": sum(x.paid > 0 for x in honest) / max(1, len(honest)),
        "honest_with_value_unpaid": sum(x.paid == 0 and x.value > 0 for x in honest),
        "cheats_paid": sum(x.paid > 0 for x in cheats),
        "cheats_paid_nats": sum(x.paid for x in cheats),
        "cheats_value_nats": sum(x.value for x in cheats if x.paid > 0),
    }


def diloco_rounds(
    world: World,
    rules: Sequence[str],
    start: Weights,
    rounds: int,
    replica_steps: Sequence[int],
    noise: dict[int, float],
    windows: Sequence[int],
    referees: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Score each round's pseudo-gradients alone by referees (under each subset rule and
    subset size); rank the scores against the leave-one-out values."""
    global_weights = start
    num = len(replica_steps)
    shards = world.train_shards
    arms = [(rule, w) for rule in rules for w in windows]
    per_round: dict[tuple[str, int], list[float]] = {arm: [] for arm in arms}
    for r in range(rounds):
        deltas = []
        for k, steps in enumerate(replica_steps):
            mine = shards[k::num] or shards
            local, _ = world.train(global_weights, steps, lr=3e-3, seed=1000 * r + k, shards=mine)
            delta = minus(global_weights, local)
            if k in noise:  # a careless or lazy replica: its update drowned in noise
                delta = noisy(delta, noise[k], seed=1000 * r + k)
            deltas.append(delta)
        full = minus(global_weights, average(deltas))
        full_secret = world.secret_mean(full)
        loo = [
            world.secret_mean(minus(global_weights, average(deltas[:k] + deltas[k + 1 :])))
            - full_secret
            for k in range(num)
        ]
        for rule, w in arms:
            setting = Setting(referees, 1, w)
            scores = []
            for k, delta in enumerate(deltas):
                seed = trial_seed("diloco", r, k, w)
                candidate = minus(global_weights, delta)
                reports = panel_reports(world, rule, setting, candidate, global_weights, seed)
                usable = [x.gate.improvement for x in reports if x.ok]
                scores.append(statistics.median(usable) if usable else 0.0)
            per_round[rule, w].append(spearman(scores, loo))
        say(
            f"diloco round {r}: spearman "
            + ", ".join(f"{rule} w{w} {per_round[rule, w][-1]:.3f}" for rule, w in arms)
        )
        global_weights = full
    out: dict[str, Any] = {}
    for (rule, w), values in per_round.items():
        finite = [x for x in values if math.isfinite(x)]
        out[f"{rule}_diloco_w{w}_spearman_mean"] = statistics.fmean(finite) if finite else math.nan
        out[f"{rule}_diloco_w{w}_spearman_min"] = min(finite) if finite else math.nan
        out[f"{rule}_diloco_w{w}_spearman_rounds"] = values
    return out

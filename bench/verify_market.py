"""Payment fidelity: does what the market pays track what each contribution is worth?

A simulated competition (king of the hill, design10.md section 3): personas submit in a
seeded interleaved order, each submission judged against the frontier of its time by n
referees (``verify_world.World.subset``: each referee its own seeded subset, both models
evaluated now with ``window_losses``), ``panel.judge``, ``market.payment``; a paid
submission becomes the frontier and the frontier score moves down by the consensus
improvement (``market.next_frontier``). Honest personas train the current frontier further (their
quality varies with steps and learning rate) and claim their true pool loss; cheats
interleave (inflated claim, free-rider, noisy copy of the frontier, sandbagger, diverged,
NaN).

True marginal value, on the secret set (files no referee and no contributor saw): a
submission's held-out improvement over the frontier it was judged against, if it was adopted;
nothing if not. That is its leave-one-out value along the chain: leave it out and the chain
loses exactly that step (to first order: later submissions keep the improvement they made over
their own frontier); a submission never adopted is in no model, so leaving it out changes
nothing. (An honest improvement turned away is the market's loss, not the contributor's
value: it shows in ``honest_improvements_unpaid`` and in the figure against a perfect market,
which pays every honest improvement.) The secret set is other files than the competition's:
its improvements are what generalises beyond the competition's data. The same figures against
the value on a large draw of the competition's own held-out pool (``World.truth_draw``, none
of the referees' windows: what the market is asked to pay for) are the ``*_pool`` ones. Also
reported: the exact leave-one-out of each adopted submission's weight delta on the final
model, on the secret set.

DiLoCo rounds (point 6, where runs exist): from a common global model, replicas train on
different shards for different numbers of steps, some add noise to their pseudo-gradient.
Referees score each pseudo-gradient alone (paired improvement of ``global - delta_k`` over
``global``, median of n referees, as templar's Gauntlet scores by loss before and after); the
true value is the leave-one-out effect on the secret set of the round's averaged update:
``L(global - mean_{j != k} delta_j) - L(global - mean_j delta_j)``. Two more figures split
the gap: the referees' alone scores against the same alone scores on the secret set (is the
measurement good?) and the secret alone scores against leave-one-out (is scoring alone the
right question?); and the alternative, referees measuring each leave-one-out directly (the
round's average with the pseudo-gradient against the average without it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.verify_cheats import (
    CONFIDENCE,
    RESAMPLES,
    Setting,
    competition,
    trial_seed,
)
from bench.verify_stats import spearman
from bench.verify_world import (
    Model,
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
    step: float  # secret-set improvement over the frontier it was judged against
    adopted: bool
    delta: Weights | None  # adopted: its weights minus that frontier's
    step_pool: float = 0.0  # the same improvement on the pool's truth draw

    @property
    def value(self) -> float:
        """Leave-one-out value along the chain: its step if adopted, else nothing."""
        return self.step if self.adopted else 0.0

    @property
    def value_pool(self) -> float:
        return self.step_pool if self.adopted else 0.0

    @property
    def ideal(self) -> float:
        """What a perfect market would pay: every honest improvement, no cheat."""
        if self.adopted:
            return self.step
        return max(0.0, self.step) if self.persona.kind == "honest" else 0.0


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


def contribution(
    world: World, persona: Persona, frontier: Weights, score: float, half_width: float, seed: int
) -> tuple[Weights, float, str]:
    """What ``persona`` submits against ``frontier``: weights, claim, and a note that makes
    the file's bytes differ (a copy's)."""
    kind = persona.kind
    if kind in ("honest", "inflated", "diverged"):
        weights, _ = world.train(frontier, persona.steps, lr=persona.lr, seed=seed)
        claim = world.heldout_score(weights)
        return weights, claim - (3 * half_width if kind == "inflated" else 0.0), ""
    if kind == "sandbagger":  # claims the loss of 5x the steps it trained
        full, _ = world.train(frontier, persona.steps, lr=persona.lr, seed=seed)
        weights, _ = world.train(frontier, persona.steps // 5, lr=persona.lr, seed=seed)
        return weights, world.heldout_score(full), ""
    if kind == "free-rider":
        return frontier, score, ""
    if kind == "noisy copy":
        return noisy(frontier, 0.01, seed), score, "copy"
    return with_nan(frontier), score - 0.05, ""


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
    frontier = world.measure(Model("baseline", baseline), universe=False)
    baseline_score = score = frontier.claim_loss
    baseline_secret = frontier.secret_loss
    known = {sha256(file_bytes(frontier.weights))}
    subs: list[Submission] = []
    for i, persona in enumerate(order):
        s = trial_seed(seed, i)
        weights, claim, note = contribution(world, persona, frontier.weights, score, half_width, s)
        sha = sha256(file_bytes(weights, note))
        if sha in known:  # queue.submit's rule: a resubmitted file pays nothing, unrefereed
            subs.append(Submission(persona, 0.0, 0.0, False, None))
            continue
        known.add(sha)
        # The referees evaluate both models now on their subsets; the claim is the persona's.
        model = world.measure(Model(persona.name, weights), universe=False, claim=False)
        reports = panel_reports(world, rule, setting, weights, frontier.weights, s)
        verdict = judge(claim, score, reports, m=setting.m, n=setting.n)
        paid = payment(spec, score, verdict)
        step = _finite(frontier.secret_loss - model.secret_loss)
        step_pool = _finite(frontier.pool_loss - model.pool_loss)
        if paid > 0:
            delta = minus(weights, frontier.weights)
            subs.append(Submission(persona, paid, step, True, delta, step_pool))
            frontier, score = model, next_frontier(score, verdict)
        else:
            subs.append(Submission(persona, 0.0, step, False, None, step_pool))
    amounts = [x.paid for x in subs]
    by_persona: dict[str, list[float]] = {p.name: [0.0, 0.0, 0.0] for p in people}
    for x in subs:
        by_persona[x.persona.name][0] += x.paid
        by_persona[x.persona.name][1] += x.value
        by_persona[x.persona.name][2] += x.value_pool
    adopted = [x for x in subs if x.adopted]
    final_secret = frontier.secret_loss
    loo = [
        world.secret_mean(minus(frontier.weights, x.delta)) - final_secret
        for x in adopted
        if x.delta is not None
    ]
    honest = [x for x in subs if x.persona.kind == "honest"]
    cheats = [x for x in subs if x.persona.kind != "honest"]
    rho = spearman(amounts, [x.value for x in subs])
    say(
        f"{rule} market seed {seed}: {len(subs)} submissions, {len(adopted)} paid, spearman "
        f"{rho:.3f} (ideal {spearman(amounts, [x.ideal for x in subs]):.3f})"
    )
    trace = [
        [x.persona.name, x.adopted, round(x.paid, 5), round(x.step, 5), round(x.step_pool, 5)]
        for x in subs
    ]
    return {
        "trace": trace,
        "submissions": len(subs),
        "paid_submissions": len(adopted),
        "spearman_submissions": rho,
        "spearman_submissions_ideal": spearman(amounts, [x.ideal for x in subs]),
        "spearman_contributors": spearman(
            [v[0] for v in by_persona.values()], [v[1] for v in by_persona.values()]
        ),
        "spearman_submissions_pool": spearman(amounts, [x.value_pool for x in subs]),
        "spearman_contributors_pool": spearman(
            [v[0] for v in by_persona.values()], [v[2] for v in by_persona.values()]
        ),
        "spearman_adopted": spearman([x.paid for x in adopted], [x.step for x in adopted]),
        "spearman_loo_final_adopted": spearman([x.paid for x in adopted], loo),
        "total_paid": sum(amounts),
        "baseline_minus_final_score": baseline_score - score,
        "secret_improvement": baseline_secret - final_secret,
        "honest_paid_share": sum(x.paid > 0 for x in honest) / max(1, len(honest)),
        "honest_improvements_unpaid": sum(x.paid == 0 and x.step > 0 for x in honest),
        "cheats_paid": sum(x.paid > 0 for x in cheats),
        "cheats_paid_nats": sum(x.paid for x in cheats),
        "cheats_paid_value_nats": sum(x.step for x in cheats if x.paid > 0),
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
    accuracy: dict[tuple[str, int], list[float]] = {arm: [] for arm in arms}
    referee_loo: dict[tuple[str, int], list[float]] = {arm: [] for arm in arms}
    proxy: list[float] = []  # alone on the secret set vs leave-one-out: the proxy's own gap
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
        before = world.secret_mean(global_weights)
        alone = [before - world.secret_mean(minus(global_weights, d)) for d in deltas]
        without = [minus(global_weights, average(deltas[:k] + deltas[k + 1 :])) for k in range(num)]
        loo = [world.secret_mean(weights) - full_secret for weights in without]
        proxy.append(spearman(alone, loo))
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
            accuracy[rule, w].append(spearman(scores, alone))
            # The alternative: referees measure each leave-one-out directly (the round's
            # average with it against the average without it).
            measured = []
            for k in range(num):
                seed = trial_seed("diloco-loo", r, k, w)
                reports = panel_reports(world, rule, setting, full, without[k], seed)
                usable = [x.gate.improvement for x in reports if x.ok]
                measured.append(statistics.median(usable) if usable else 0.0)
            referee_loo[rule, w].append(spearman(measured, loo))
        say(
            f"diloco round {r}: spearman "
            + ", ".join(f"{rule} w{w} {per_round[rule, w][-1]:.3f}" for rule, w in arms)
        )
        global_weights = full
    out: dict[str, Any] = {
        "diloco_alone_vs_loo_spearman_mean": _mean(proxy),
        "diloco_alone_vs_loo_spearman_rounds": proxy,
    }
    for (rule, w), values in per_round.items():
        out[f"{rule}_diloco_w{w}_spearman_mean"] = _mean(values)
        out[f"{rule}_diloco_w{w}_spearman_min"] = min(values)
        out[f"{rule}_diloco_w{w}_spearman_rounds"] = values
        out[f"{rule}_diloco_w{w}_score_vs_alone_spearman_mean"] = _mean(accuracy[rule, w])
        out[f"{rule}_diloco_w{w}_referee_loo_spearman_mean"] = _mean(referee_loo[rule, w])
    return out


def _finite(step: float) -> float:
    """A step as a number to rank: a NaN model's is the worst there is."""
    return step if math.isfinite(step) else -math.inf


def _mean(values: Sequence[float]) -> float:
    finite = [x for x in values if math.isfinite(x)]
    return statistics.fmean(finite) if finite else math.nan

"""The cheat benchmark's detection trials: how often a referee panel catches each kind of
cheat, and how often it wrongly turns away an honest improvement.

The competition is held at one frontier (a baseline trained a few steps). Each kind draws a
submission from a small pool of models trained once:

- honest: the frontier trained further (more steps, another data order, a fresh optimizer);
  its claim is its held-out score as a competition defines it (``World.heldout_score``:
  ``verify.referee.heldout_score``, 2048 pool windows of seed 0);
- inflated xK: an honest model whose claim is K x the referees' typical interval half-width
  below its honest claim (K = 1.7 is the near-boundary case);
- free-rider (same file): the frontier's own bytes: refused by sha256 before any referee runs
  (``queue.submit``'s rule, applied here to the file's bytes; the queue's tests cover the
  queue itself);
- free-rider (new bytes): the frontier's values in a file whose bytes differ (a metadata
  note): the sha check misses it, the referees see exactly zero improvement;
- noisy copy: the frontier plus gaussian noise, claiming the frontier's loss;
- sandbagger f: a fraction f of an honest model's steps, claiming the full model's loss;
- diverged: trained on at a learning rate of 1.0, claiming its own (true, bad) loss;
- NaN: a weight set to NaN, claiming an honest model's loss.

A trial draws the model and, for every referee slot 0..n_max-1, a seeded subset of windows
(the referees' universe, see ``verify_world``). Each referee's report is
``panel.report_from_losses`` of the two loss arrays; a panel (n, m) uses slots 0..n-1 and
``panel.judge``; payment is ``market.payment``. A cheat counts as detected when it is
rejected or paid nothing; an honest submission is falsely accused when it is rejected or paid
nothing although its true improvement (on the secret set) exceeds the margin.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.verify_stats import wilson
from bench.verify_world import Model, World, file_bytes, noisy, sha256, with_nan
from trainfleet.verify.market import CompetitionSpec, payment
from trainfleet.verify.panel import RefereeReport, judge, report_from_losses
from trainfleet.verify.referee import referee_eval
from trainfleet.verify.spec import RefereeTask

CONFIDENCE = 0.95
RESAMPLES = 1000
MARGIN = 0.0
RATE = 1.0  # credits per nat: payments read as nats


@dataclass(frozen=True)
class Setting:
    n: int
    m: int
    windows: int
    margin: float = 0.0

    @property
    def key(self) -> str:
        return f"margin{self.margin:g}_n{self.n}m{self.m}w{self.windows}"


@dataclass
class Tally:
    """Outcomes of one kind under one setting."""

    trials: int = 0
    caught: int = 0  # cheats: rejected or unpaid; honest: falsely accused
    rejected: int = 0
    unpaid: int = 0  # accepted but paid nothing
    paid_nats: float = 0.0  # paid in all (rate 1: nats of consensus improvement)
    value_nats: float = 0.0  # the true (secret-set) improvement of the submissions paid

    def add(self, caught: bool, rejected: bool, paid: float, value: float) -> None:
        self.trials += 1
        self.caught += caught
        self.rejected += rejected
        self.unpaid += (not rejected) and paid == 0.0
        if paid > 0:
            self.paid_nats += paid
            self.value_nats += value


@dataclass
class Pool:
    """The models a detection trial draws from, by kind, each with the claim it makes."""

    frontier: Model
    kinds: dict[str, list[tuple[Model, float]]] = field(default_factory=dict)
    honest_train_cpu_s: list[float] = field(default_factory=list)
    honest_steps: list[int] = field(default_factory=list)


def build_pool(
    world: World,
    frontier_steps: int,
    honest_steps: Sequence[int],
    sandbag_fractions: Sequence[float],
    sandbag_models: int,
    noise_levels: Sequence[float],
    say: Callable[[str], None],
) -> Pool:
    """Train the frontier and every model once, and measure each on the universe."""
    weights, cpu_s = world.train(world.init(), frontier_steps, lr=world.params.lr, seed=0)
    frontier = world.measure(Model("frontier", weights, cpu_s, frontier_steps))
    pool = Pool(frontier)
    say(f"frontier: {frontier_steps} steps, held-out loss {frontier.claim_loss:.4f}")
    honest: list[Model] = []
    for i, steps in enumerate(honest_steps):
        w, cpu_s = world.train(frontier.weights, steps, lr=world.params.lr, seed=100 + i)
        honest.append(world.measure(Model(f"honest+{steps}", w, cpu_s, steps)))
        pool.honest_train_cpu_s.append(cpu_s)
        pool.honest_steps.append(steps)
        say(
            f"honest +{steps} steps: loss {honest[-1].claim_loss:.4f} "
            f"(secret {frontier.secret_loss - honest[-1].secret_loss:+.4f} nats better)"
        )
    pool.kinds["honest"] = [(h, h.claim_loss) for h in honest]
    pool.kinds["free-rider (new bytes)"] = [(frontier, frontier.claim_loss)]
    pool.kinds["noisy copy"] = [
        (
            world.measure(Model(f"noisy{level}", noisy(frontier.weights, level, seed))),
            frontier.claim_loss,
        )
        for seed, level in enumerate(noise_levels)
    ]
    for f in sandbag_fractions:
        models = []
        shadowed = zip(honest_steps[:sandbag_models], honest[:sandbag_models], strict=True)
        for i, (steps, full) in enumerate(shadowed):
            part = max(1, round(f * steps))
            w, cpu_s = world.train(frontier.weights, part, lr=world.params.lr, seed=100 + i)
            models.append(
                (world.measure(Model(f"sandbag{f}+{part}", w, cpu_s, part)), full.claim_loss)
            )
        pool.kinds[f"sandbagger f={f:g}"] = models
    w, cpu_s = world.train(frontier.weights, 30, lr=1.0, seed=900)
    diverged = world.measure(Model("diverged", w, cpu_s, 30))
    say(f"diverged (lr 1.0): loss {diverged.claim_loss:.4f}")
    pool.kinds["diverged"] = [(diverged, diverged.claim_loss)]
    pool.kinds["NaN weights"] = [
        (world.measure(Model("nan", with_nan(frontier.weights))), honest[0].claim_loss)
    ]
    return pool


def trial_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def reports_for(
    world: World,
    rule: str,
    candidate: Model,
    frontier: Model,
    windows: int,
    n_max: int,
    seed: int,
) -> list[RefereeReport]:
    """n_max referees' reports on one submission, each on its own subset (``rule``)."""
    assert candidate.losses is not None and frontier.losses is not None
    reports = []
    for index in range(n_max):
        referee_seed = trial_seed(seed, index)
        chosen = world.subset(rule, windows, referee_seed)
        reports.append(
            report_from_losses(
                index,
                f"referee-{index}",
                f"host-{index}",
                candidate.losses[chosen].tolist(),
                frontier.losses[chosen].tolist(),
                margin=MARGIN,
                confidence=CONFIDENCE,
                resamples=RESAMPLES,
                seed=referee_seed,
                windows=windows,
            )
        )
    return reports


def competition(world: World, setting: Setting) -> CompetitionSpec:
    return CompetitionSpec(
        name="verify-bench",
        hyper=world.params.model_dump(),
        dataset=world.dataset,
        rate=RATE,
        margin=setting.margin,
        referees=setting.n,
        quorum=setting.m,
        windows=setting.windows,
        confidence=CONFIDENCE,
        resamples=RESAMPLES,
    )


@dataclass
class Judge:
    """Judges submissions under one setting and tallies the outcomes by kind."""

    setting: Setting
    spec: CompetitionSpec
    frontier: Model
    out: dict[str, Tally]

    def record(self, kind: str, model: Model, claim: float, reports: list[RefereeReport]) -> None:
        n, m, score = self.setting.n, self.setting.m, self.frontier.claim_loss
        verdict = judge(claim, score, reports[:n], m=m, n=n)
        paid = payment(self.spec, score, verdict)
        rejected = verdict.state == "rejected"
        value = self.frontier.secret_loss - model.secret_loss
        unpaid = rejected or paid == 0.0
        if kind == "honest":  # falsely accused: a real improvement beyond the margin, unpaid
            unpaid = unpaid and value > self.setting.margin
        self.out.setdefault(kind, Tally()).add(unpaid, rejected, paid, value)


def at_margin(reports: list[RefereeReport], margin: float) -> list[RefereeReport]:
    """The reports as if the gate had run at ``margin`` (certified iff lower > margin: the
    gate's rule; the bootstrap does not depend on the margin)."""
    if margin == MARGIN:
        return reports
    return [
        replace(r, gate=replace(r.gate, certified=bool(r.gate.lower > margin))) for r in reports
    ]


def detection(
    world: World,
    pool: Pool,
    settings: Sequence[Setting],
    honest_trials: int,
    cheat_trials: int,
    inflations: Sequence[float],
    rule: str,
    say: Callable[[str], None],
) -> tuple[dict[str, dict[str, Tally]], dict[int, float]]:
    """Tallies by setting key, then kind; and the typical half-width at each window count."""
    n_max = max(s.n for s in settings)
    frontier = pool.frontier
    tallies: dict[str, dict[str, Tally]] = {s.key: {} for s in settings}
    half_widths: dict[int, float] = {}
    duplicate = sha256(file_bytes(frontier.weights)) in {sha256(file_bytes(frontier.weights))}
    for w in sorted({s.windows for s in settings}):
        started = time.perf_counter()
        draws: dict[str, list[tuple[Model, float, list[RefereeReport]]]] = {}
        for kind, models in pool.kinds.items():
            count = honest_trials if kind == "honest" else cheat_trials
            rng = np.random.Generator(np.random.PCG64(trial_seed(kind, w)))
            draws[kind] = []
            for t in range(count):
                model, claim = models[int(rng.integers(len(models)))]
                seed = trial_seed(kind, w, t)
                reports = reports_for(world, rule, model, frontier, w, n_max, seed)
                draws[kind].append((model, claim, reports))
        half = statistics.median(
            r.candidate.half_width for _, _, reports in draws["honest"] for r in reports
        )
        half_widths[w] = half
        for setting in (s for s in settings if s.windows == w):
            out = tallies[setting.key]
            judged_by = Judge(setting, competition(world, setting), frontier, out)
            for kind, trials in draws.items():
                for model, claim, reports in trials:
                    judged = at_margin(reports, setting.margin)
                    judged_by.record(kind, model, claim, judged)
                    if kind == "honest":
                        for k in inflations:
                            judged_by.record(f"inflated x{k:g}", model, claim - k * half, judged)
            # A resubmission of the frontier's own file never reaches a referee.
            same = out.setdefault("free-rider (same file)", Tally())
            for _ in range(cheat_trials):
                same.add(duplicate, duplicate, 0.0, 0.0)
        say(
            f"{rule} windows {w}: {sum(len(d) for d in draws.values())} submissions x "
            f"{n_max} referees in {time.perf_counter() - started:.1f}s; half-width {half:.4f}"
        )
    return tallies, half_widths


def referee_cpu_s(world: World, pool: Pool, windows: int, repeats: int, work: Path) -> float:
    """Median CPU seconds of one real ``referee_eval`` (candidate + frontier on ``windows``
    windows, files read from disk, the held-out pool from the worker's cache)."""
    candidate, frontier = work / "candidate.safetensors", work / "frontier.safetensors"
    honest = pool.kinds["honest"][0][0]
    candidate.write_bytes(file_bytes(honest.weights))
    frontier.write_bytes(file_bytes(pool.frontier.weights))
    task = RefereeTask(
        submission_id="bench",
        competition_id="verify-bench",
        index=0,
        candidate=sha256(candidate.read_bytes()),
        frontier=sha256(frontier.read_bytes()),
        hyper=world.params.model_dump(),
        dataset=world.dataset,
        windows=windows,
        seed=windows,
        producer="bench",
    )
    referee_eval(task, candidate, frontier, world.settings)  # warm: imports, first plan read
    times = []
    for _ in range(repeats):
        started = time.process_time()
        referee_eval(task, candidate, frontier, world.settings)
        times.append(time.process_time() - started)
    return statistics.median(times)


def tally_metrics(prefix: str, tally: Tally) -> dict[str, Any]:
    lo, hi = wilson(tally.caught, tally.trials)
    return {
        f"{prefix}_trials": tally.trials,
        f"{prefix}_rate": tally.caught / tally.trials if tally.trials else float("nan"),
        f"{prefix}_lo": lo,
        f"{prefix}_hi": hi,
        f"{prefix}_rejected": tally.rejected,
        f"{prefix}_unpaid": tally.unpaid,
        f"{prefix}_paid_nats": tally.paid_nats,
        f"{prefix}_value_nats": tally.value_nats,
    }

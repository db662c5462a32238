"""The cheat benchmark (issue 10, points 5 and 6): how often a referee panel catches each kind
of cheat, how often it wrongly turns an honest improvement away, what the referees cost, and
whether the market's payments track what contributions are worth.

    python -m bench.verify            (full: about 10 minutes on 2 cores, 15 when shared)
    python -m bench.verify --quick    (seconds)

Everything runs in process on real tiny models (``verify_world``: a 1-layer byte GPT trained
by the recipe's own step on stdlib sources) and the real verification code: the referee's
``subset_windows`` and ``window_losses``, ``panel.report_from_losses`` and ``panel.judge``,
``market.payment``; no coordinator (the end-to-end tests cover that path).

1. Detection (``verify_cheats``): for each panel (n referees, quorum m) and subset size
   (windows per referee), the share of each cheat kind caught (rejected or paid nothing) and
   the share of honest improvements falsely accused (rejected or unpaid), each with its
   Wilson 95% interval, over seeded trials. Subset rule ``referee`` is what
   ``verify.referee.referee_eval`` does (windows uniform over the whole held-out pool); an
   honest claim is the model's ``heldout_score`` (2048 pool windows, seed 0), as a real
   submitter's is. ``shard-budget``, the rule before the fix (a seeded few held-out shards up
   to ``heldout_tokens``' budget), is kept as a historical arm on the settings the summary
   shows (its markets and DiLoCo rounds are not run again).
2. Referee compute: CPU seconds of one real ``referee_eval`` (read two model files, prepare
   the held-out data from the cache, evaluate both models) at each subset size, times n,
   over the CPU seconds an honest contributor spent training its submission.
   Goal (issue 10): >= 95% detection of every kind at <= 1% false accusation for <= 10% of
   the contributors' compute; the table says which settings meet it (point estimates; the
   JSON also has the stricter reading on the interval bounds).
3. Payment fidelity (``verify_market``): Spearman's rank correlation between what each
   submission (and each contributor) was paid in a simulated competition and its true
   marginal value on a secret held-out set (leave-one-out along the frontier's chain: its
   improvement over the frontier it was judged against if adopted, else nothing); goal >=
   0.9, over many simulated competitions (mean, spread, worst); also against the value on
   the competition's own held-out pool (a large draw no referee used), and against a perfect
   market (every honest improvement paid, no cheat). The same for DiLoCo rounds'
   pseudo-gradients scored alone by referees, against their leave-one-out value in the
   round's average.

Reading the detection figures: a caught cheat is one rejected or paid nothing. A sandbagger
or noisy copy that is not caught is paid the consensus improvement its own model makes, never
its claim: the JSON's ``*_paid_nats`` against ``*_value_nats`` (its true improvement on the
secret set) shows what the uncaught were paid against what they were worth.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, environment, write_result
from bench.verify_cheats import (
    Pool,
    Setting,
    build_pool,
    detection,
    referee_cpu_s,
    tally_metrics,
)
from bench.verify_market import diloco_rounds, simulate_market
from bench.verify_world import RULES, World

GOAL_DETECTION = 0.95
GOAL_FALSE_ACCUSATION = 0.01
GOAL_COMPUTE = 0.10
GOAL_SPEARMAN = 0.9
MARKET_SPREAD = ("spearman_contributors", "spearman_submissions", "spearman_contributors_pool")
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    quick: bool
    num_files: int  # stdlib files, split in two: competition (even) and secret (odd)
    universe: int  # the referees' universe: windows uniform over the held-out pool
    secret_windows: int
    truth_windows: int  # the pool's truth draw for the market's value_pool
    frontier_steps: int
    honest_steps: tuple[int, ...]
    sandbag_fractions: tuple[float, ...]
    noise_levels: tuple[float, ...]
    sandbag_models: int  # sandbaggers shadow the first few honest models
    inflations: tuple[float, ...]
    panels: tuple[tuple[int, int], ...]
    windows: tuple[int, ...]
    margins: tuple[float, ...]
    honest_trials: int
    cheat_trials: int
    cpu_repeats: int
    market_rounds: int
    # (n, m, windows, margin, competitions): today's CompetitionSpec defaults first
    market_settings: tuple[tuple[int, int, int, float, int], ...]
    diloco_rounds: int
    diloco_steps: tuple[int, ...]
    diloco_noise: tuple[tuple[int, float], ...]
    diloco_windows: tuple[int, ...]

    def settings(self) -> list[Setting]:
        return [
            Setting(n, m, w, margin)
            for margin in self.margins
            for n, m in self.panels
            for w in self.windows
        ]

    def settings_of(self, rule: str) -> list[Setting]:
        """Every setting for the referee's rule; the historical arm only on the settings the
        summary shows (panels of 3+, 64+ windows, the largest margin)."""
        if rule == "referee":
            return self.settings()
        return [s for s in self.settings() if summarised(s, self)]

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                quick=True,
                num_files=120,
                universe=2048,
                secret_windows=512,
                truth_windows=512,
                frontier_steps=30,
                honest_steps=(60, 120),
                sandbag_fractions=(0.2,),
                noise_levels=(0.01,),
                sandbag_models=2,
                inflations=(1.7, 3.0, 10.0),
                panels=((1, 1), (3, 2)),
                windows=(16, 64),
                margins=(0.0,),
                honest_trials=30,
                cheat_trials=15,
                cpu_repeats=1,
                market_rounds=1,
                market_settings=((3, 2, 64, 0.0, 1),),
                diloco_rounds=1,
                diloco_steps=(10, 20, 40, 10),
                diloco_noise=((3, 2.0),),
                diloco_windows=(64,),
            )
        return cls(
            quick=False,
            num_files=800,
            universe=8192,
            secret_windows=4096,
            truth_windows=4096,
            frontier_steps=100,
            honest_steps=(100, 150, 200, 300, 400, 500),
            sandbag_fractions=(0.1, 0.5),
            noise_levels=(0.003, 0.01, 0.03),
            sandbag_models=3,
            inflations=(1.7, 3.0, 10.0),
            panels=((1, 1), (3, 2), (5, 3), (7, 4)),
            windows=(16, 64, 128, 256),
            margins=(0.0, 0.01),
            honest_trials=400,
            cheat_trials=150,
            cpu_repeats=5,
            market_rounds=2,
            market_settings=((3, 2, 64, 0.0, 12), (3, 2, 128, 0.01, 8)),
            diloco_rounds=6,
            diloco_steps=(10, 20, 40, 80, 10, 20, 40, 80),
            diloco_noise=((3, 1.0), (6, 3.0)),
            diloco_windows=(64, 256),
        )


def summarised(setting: Setting, sizes: Sizes) -> bool:
    """Whether the README's summary table shows ``setting``."""
    return setting.margin == max(sizes.margins) and setting.n >= 3 and setting.windows >= 64


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def run(sizes: Sizes, rules: Sequence[str], work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics, and each simulated market's submissions ([contributor, paid?, paid nats,
    true improvement on the secret set])."""
    world = World(
        sizes.num_files, sizes.universe, sizes.secret_windows, work / "cache", sizes.truth_windows
    )
    say(
        f"world: {len(world.train_shards)} train shards, {len(world.shards)} held-out shards "
        f"({int(world.pool_starts.sum()):,} window starts), secret {len(world.secret):,} tokens"
    )
    pool = build_pool(
        world,
        sizes.frontier_steps,
        sizes.honest_steps,
        sizes.sandbag_fractions,
        sizes.sandbag_models,
        sizes.noise_levels,
        say,
    )
    metrics = pool_metrics(pool) | compute_metrics(world, pool, sizes, work)
    traces: dict[str, Any] = {}
    for rule in rules:
        half = detection_metrics(world, pool, sizes, rule, metrics)
        if rule != "referee":
            continue  # the historical arm: detection only
        for n, m, w, margin, competitions in sizes.market_settings:
            setting = Setting(n, m, w, margin)
            seeds = range(competitions)
            markets = [
                simulate_market(
                    world,
                    setting,
                    rule,
                    pool.frontier.weights,
                    half[w] if w in half else half[max(half)],
                    sizes.market_rounds,
                    seed,
                    sizes.quick,
                    say,
                )
                for seed in seeds
            ]
            tag = f"market_{rule}_{market_tag(setting)}"
            for seed, market in zip(seeds, markets, strict=True):
                traces[f"{tag}_seed{seed}"] = market.pop("trace")
            metrics.update(market_metrics(tag, markets))
    rounds = diloco_rounds(
        world,
        [r for r in rules if r == "referee"],
        pool.frontier.weights,
        sizes.diloco_rounds,
        sizes.diloco_steps,
        dict(sizes.diloco_noise),
        sizes.diloco_windows,
        3,
        say,
    )
    return metrics | rounds, traces


def market_metrics(tag: str, markets: list[dict[str, Any]]) -> dict[str, Any]:
    """The competitions' mean of every figure; for the rank correlations also the spread
    (sample standard deviation, standard error of the mean), worst, best and every value."""
    out: dict[str, Any] = {
        f"{tag}_{name}": statistics.fmean(x[name] for x in markets) for name in markets[0]
    }
    out[f"{tag}_competitions"] = len(markets)
    for name in MARKET_SPREAD:
        values = [x[name] for x in markets if math.isfinite(x[name])]
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        out[f"{tag}_{name}"] = statistics.fmean(values) if values else math.nan
        out[f"{tag}_{name}_sd"] = sd
        out[f"{tag}_{name}_se"] = sd / math.sqrt(len(values)) if len(values) > 1 else math.nan
        out[f"{tag}_{name}_median"] = statistics.median(values) if values else math.nan
        out[f"{tag}_{name}_min"] = min(values, default=math.nan)
        out[f"{tag}_{name}_max"] = max(values, default=math.nan)
        out[f"{tag}_{name}_values"] = [x[name] for x in markets]
    return out


def market_tag(setting: Setting) -> str:
    """``n3m2w64`` (margin 0), ``n3m2w128_margin0.01``."""
    margin = f"_margin{setting.margin:g}" if setting.margin else ""
    return f"n{setting.n}m{setting.m}w{setting.windows}{margin}"


def market_summary(metrics: dict[str, Any], sizes: Sizes, rule: str) -> list[str]:
    """One sentence per simulated market setting of ``rule``."""
    out = []
    for n, m, w, margin, competitions in sizes.market_settings:
        tag = f"market_{rule}_{market_tag(Setting(n, m, w, margin))}"
        if f"{tag}_submissions" not in metrics:
            continue
        out.append(
            f"market n={n}, m={m}, {w} windows, margin {margin:g} ({competitions} competitions of "
            f"{metrics[f'{tag}_submissions']:.0f} submissions): Spearman paid vs true value, "
            f"contributors {spread(metrics, f'{tag}_spearman_contributors')}, submissions "
            f"{spread(metrics, f'{tag}_spearman_submissions')}; against the value on the "
            f"competition's own pool, contributors "
            f"{spread(metrics, f'{tag}_spearman_contributors_pool')}; among the paid "
            f"{metrics[f'{tag}_spearman_adopted']:.3f}; against a perfect market "
            f"{metrics[f'{tag}_spearman_submissions_ideal']:.3f}; honest paid "
            f"{100 * metrics[f'{tag}_honest_paid_share']:.0f}%, cheats paid "
            f"{metrics[f'{tag}_cheats_paid']:.1f} per competition"
        )
    return out


def spread(metrics: dict[str, Any], name: str) -> str:
    """A rank correlation over the competitions: mean +- standard error, sd, worst."""
    return (
        f"{metrics[name]:.3f} +- {metrics[f'{name}_se']:.3f} (sd {metrics[f'{name}_sd']:.3f}, "
        f"worst {metrics[f'{name}_min']:.3f})"
    )


def pool_metrics(pool: Pool) -> dict[str, Any]:
    """What the contributions cost to train and are worth (secret-set improvement)."""
    metrics: dict[str, Any] = {
        "train_cpu_s_per_submission": statistics.fmean(pool.honest_train_cpu_s),
        "train_steps_per_submission": statistics.fmean(pool.honest_steps),
        "frontier_pool_loss": pool.frontier.claim_loss,
    }
    metrics["train_cpu_s_per_step"] = (
        metrics["train_cpu_s_per_submission"] / metrics["train_steps_per_submission"]
    )
    for kind, models in pool.kinds.items():
        values = [pool.frontier.secret_loss - m.secret_loss for m, _ in models]
        metrics[f"value_{slug(kind)}_mean"] = statistics.fmean(values)
        metrics[f"value_{slug(kind)}_min"] = min(values)
    return metrics


def compute_metrics(world: World, pool: Pool, sizes: Sizes, work: Path) -> dict[str, Any]:
    """Referee CPU per evaluation and per panel, against the contributions' training CPU."""
    train_cpu_s = statistics.fmean(pool.honest_train_cpu_s)
    per_step = train_cpu_s / statistics.fmean(pool.honest_steps)
    metrics: dict[str, Any] = {}
    for w in sizes.windows:
        cpu = metrics[f"referee_cpu_s_w{w}"] = referee_cpu_s(
            world, pool, w, sizes.cpu_repeats, work
        )
        for n, _ in sizes.panels:
            metrics[f"compute_fraction_n{n}w{w}"] = n * cpu / train_cpu_s
            # The smallest contribution (training steps) this panel costs <= 10% of.
            metrics[f"steps_for_goal_n{n}w{w}"] = math.ceil(n * cpu / (GOAL_COMPUTE * per_step))
    return metrics


def detection_metrics(
    world: World, pool: Pool, sizes: Sizes, rule: str, metrics: dict[str, Any]
) -> dict[int, float]:
    """Add the detection curve under ``rule`` to ``metrics``; the typical half-widths."""
    settings = sizes.settings_of(rule)
    tallies, half = detection(
        world, pool, settings, sizes.honest_trials, sizes.cheat_trials, sizes.inflations, rule, say
    )
    for w, h in half.items():
        metrics[f"half_width_{rule}_w{w}"] = h
    for key, kinds in tallies.items():
        for kind, tally in kinds.items():
            name = "false" if kind == "honest" else f"det_{slug(kind)}"
            metrics.update(tally_metrics(f"{rule}_{key}_{name}", tally))
    for setting in settings:
        metrics.update(goal(metrics, rule, setting))
    return half


def kinds_of(metrics: dict[str, Any], rule: str, key: str) -> list[str]:
    prefix = f"{rule}_{key}_det_"
    return sorted(
        k[len(prefix) : -len("_rate")]
        for k in metrics
        if k.startswith(prefix) and k.endswith("_rate")
    )


def goal(metrics: dict[str, Any], rule: str, setting: Setting) -> dict[str, Any]:
    """Whether ``setting`` meets the issue's goal, and what falls short (point estimates;
    ``goal_met_on_bounds`` asks the same of the Wilson bounds)."""
    p = f"{rule}_{setting.key}"
    kinds = kinds_of(metrics, rule, setting.key)
    cost = metrics[f"compute_fraction_n{setting.n}w{setting.windows}"]
    short = [SHORT.get(k, k) for k in kinds if metrics[f"{p}_det_{k}_rate"] < GOAL_DETECTION]
    if metrics[f"{p}_false_rate"] > GOAL_FALSE_ACCUSATION:
        short.append("false")
    if cost > GOAL_COMPUTE:
        short.append("cost")
    worst = min(kinds, key=lambda k: metrics[f"{p}_det_{k}_rate"])
    return {
        f"{p}_worst_kind": worst,
        f"{p}_worst_detection": metrics[f"{p}_det_{worst}_rate"],
        f"{p}_goal_short_of": " ".join(short),
        f"{p}_goal_met": not short,
        f"{p}_goal_met_on_bounds": min(metrics[f"{p}_det_{k}_lo"] for k in kinds) >= GOAL_DETECTION
        and metrics[f"{p}_false_hi"] <= GOAL_FALSE_ACCUSATION
        and cost <= GOAL_COMPUTE,
    }


SHORT = {
    "inflated_x1_7": "infl1.7",
    "inflated_x3": "infl3",
    "inflated_x10": "infl10",
    "free_rider_same_file": "fr-sha",
    "free_rider_new_bytes": "fr-bytes",
    "noisy_copy": "noisy",
    "sandbagger_f_0_1": "sand.1",
    "sandbagger_f_0_2": "sand.2",
    "sandbagger_f_0_5": "sand.5",
    "diverged": "diverg",
    "nan_weights": "NaN",
}


def pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.1f}"


def table(metrics: dict[str, Any], sizes: Sizes, rules: Sequence[str]) -> list[str]:
    """The detection curve, one row per (rule, margin, panel, windows), then the fidelity
    figures."""
    lines = []
    for rule in rules:
        settings = sizes.settings_of(rule)
        kinds = kinds_of(metrics, rule, settings[0].key)
        head = ["margin", "n,m", "win", "false% [95% CI]", "cost%"]
        head += [SHORT.get(k, k) for k in kinds]
        lines.append(f"subset rule: {rule}  (% of trials caught: rejected or paid nothing)")
        lines.append(" | ".join(f"{h:>7}" for h in head) + " | goal")
        for setting in settings:
            p = f"{rule}_{setting.key}"
            false = (
                f"{pct(metrics[f'{p}_false_rate'])} [{pct(metrics[f'{p}_false_lo'])},"
                f"{pct(metrics[f'{p}_false_hi'])}]"
            )
            cells = [
                f"{setting.margin:g}",
                f"{setting.n},{setting.m}",
                str(setting.windows),
                false,
                pct(metrics[f"compute_fraction_n{setting.n}w{setting.windows}"]),
            ]
            cells += [pct(metrics[f"{p}_det_{k}_rate"]) for k in kinds]
            verdict = "MET" if metrics[f"{p}_goal_met"] else f"no: {metrics[f'{p}_goal_short_of']}"
            lines.append(" | ".join(f"{c:>7}" for c in cells) + f" | {verdict}")
        lines.append(
            "  typical interval half-width (nats): "
            + ", ".join(
                f"w{w} {metrics[f'half_width_{rule}_w{w}']:.4f}"
                for w in sorted({s.windows for s in settings})
            )
        )
        if rule != "referee":
            continue
        lines += [f"  {line}" for line in market_summary(metrics, sizes, rule)]
        lines.append(
            "  diloco rounds: spearman referee score vs leave-one-out, "
            + ", ".join(
                f"w{w} mean {metrics[f'{rule}_diloco_w{w}_spearman_mean']:.3f} min "
                f"{metrics[f'{rule}_diloco_w{w}_spearman_min']:.3f} (vs the secret alone "
                f"score {metrics[f'{rule}_diloco_w{w}_score_vs_alone_spearman_mean']:.3f}); "
                f"referees measuring leave-one-out directly "
                f"{metrics[f'{rule}_diloco_w{w}_referee_loo_spearman_mean']:.3f}"
                for w in sizes.diloco_windows
            )
        )
    lines.append(
        "diloco: the secret alone score vs leave-one-out (the proxy's own gap): "
        f"{metrics['diloco_alone_vs_loo_spearman_mean']:.3f}"
    )
    lines.append(
        "referee CPU s per evaluation: "
        + ", ".join(f"w{w} {metrics[f'referee_cpu_s_w{w}']:.3f}" for w in sizes.windows)
        + f"; contributor training {metrics['train_cpu_s_per_submission']:.2f} CPU s "
        f"({metrics['train_steps_per_submission']:.0f} steps) per submission"
    )
    return lines


LONG = {
    "inflated_x1_7": "inflated 1.7x",
    "inflated_x3": "inflated 3x",
    "inflated_x10": "inflated 10x",
    "free_rider_same_file": "free-rider (same file)",
    "free_rider_new_bytes": "free-rider (new bytes)",
    "noisy_copy": "noisy copy",
    "sandbagger_f_0_1": "sandbagger 10%",
    "sandbagger_f_0_2": "sandbagger 20%",
    "sandbagger_f_0_5": "sandbagger 50%",
    "diverged": "diverged",
    "nan_weights": "NaN",
}


TITLES = {
    "referee": "subset rule `referee` (what referee_eval does: windows uniform over the whole "
    "held-out pool; claims are heldout_score)",
    "shard-budget": "subset rule `shard-budget` (the rule before the fix: the shards the "
    "referee's seed picks, up to heldout_tokens' budget)",
}


def markdown(result: dict[str, Any], sizes: Sizes, rules: Sequence[str]) -> str:
    """The README's table: the detection curve per subset rule, then payment fidelity."""
    metrics = result["metrics"]
    env = result["env"]
    out = [
        f"Cheat benchmark (`python -m bench.verify`; commit {env['commit']}, {env['cores']} "
        f"cores, torch {env['torch']}): a 1-layer byte GPT, contributions of "
        f"{metrics['train_steps_per_submission']:.0f} training steps on average "
        f"({metrics['train_cpu_s_per_submission']:.2f} CPU s); {sizes.honest_trials} honest "
        f"and {sizes.cheat_trials} trials per cheat kind per row. Cells: % caught (rejected or "
        "paid nothing); false accusation: % of honest improvements rejected or unpaid, with "
        "its Wilson 95% interval; cost: the panel's referee CPU as % of the contribution's "
        "training CPU. Goal: >= 95% caught of every kind, <= 1% false, <= 10% cost.",
        "",
        *summary_table(metrics, sizes, rules),
        "",
        "<details><summary>Every setting</summary>",
        "",
    ]
    for rule in rules:
        settings = sizes.settings_of(rule)
        kinds = kinds_of(metrics, rule, settings[0].key)
        title = TITLES[rule]
        out += [f"**{title}**", ""]
        head = ["margin", "n, m", "windows", "false accusation %", "cost %"]
        head += [LONG.get(k, k) for k in kinds] + ["goal"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for setting in settings:
            p = f"{rule}_{setting.key}"
            cells = [
                f"{setting.margin:g}",
                f"{setting.n}, {setting.m}",
                str(setting.windows),
                f"{pct(metrics[f'{p}_false_rate'])} [{pct(metrics[f'{p}_false_lo'])}, "
                f"{pct(metrics[f'{p}_false_hi'])}]",
                pct(metrics[f"compute_fraction_n{setting.n}w{setting.windows}"]),
            ]
            cells += [pct(metrics[f"{p}_det_{k}_rate"]) for k in kinds]
            short = metrics[f"{p}_goal_short_of"]
            cells.append("**met**" if metrics[f"{p}_goal_met"] else f"short: {short}")
            out.append("| " + " | ".join(cells) + " |")
        if rule != "referee":
            out.append("")
            continue
        m = metrics
        out += [
            "",
            f"Payment fidelity ({rule}; true value = leave-one-out on the secret set, goal "
            f">= {GOAL_SPEARMAN}): "
            + "; ".join(market_summary(m, sizes, rule))
            + ". DiLoCo rounds "
            f"({sizes.diloco_rounds} x {len(sizes.diloco_steps)} replicas): pseudo-gradients "
            "scored alone by 3 referees vs their leave-one-out value in the round's average "
            + ", ".join(
                f"{m[f'{rule}_diloco_w{w}_spearman_mean']:.3f} at {w} windows"
                for w in sizes.diloco_windows
            )
            + " (scoring alone, even measured exactly on the secret set: "
            f"{m['diloco_alone_vs_loo_spearman_mean']:.3f}); referees measuring each "
            "leave-one-out directly: "
            + ", ".join(
                f"{m[f'{rule}_diloco_w{w}_referee_loo_spearman_mean']:.3f} at {w} windows"
                for w in sizes.diloco_windows
            )
            + ".",
            "",
        ]
    return "\n".join([*out, "</details>", ""])


def summary_table(metrics: dict[str, Any], sizes: Sizes, rules: Sequence[str]) -> list[str]:
    """The settings worth reading (panels of 3 and 5, 64+ windows, the largest margin; the
    historical arm's panels of 3), one row each: false accusations, cost, the weakest catch
    rate apart from sandbaggers, and the sandbaggers' own."""
    margin = max(sizes.margins)
    head = ["subset rule", "n, m", "windows", "false accusation % [95% CI]", "cost %"]
    head += ["lowest % caught, sandbaggers aside", "sandbaggers caught %", "goal"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in rules:
        for setting in sizes.settings_of(rule):
            if not summarised(setting, sizes) or setting.n > (5 if rule == "referee" else 3):
                continue
            p = f"{rule}_{setting.key}"
            kinds = kinds_of(metrics, rule, setting.key)
            others = [k for k in kinds if not k.startswith("sandbagger")]
            low = min(others, key=lambda k: metrics[f"{p}_det_{k}_rate"])
            sandbaggers = ", ".join(
                f"{LONG.get(k, k).split()[-1]}: {pct(metrics[f'{p}_det_{k}_rate'])}"
                for k in kinds
                if k.startswith("sandbagger")
            )
            short = metrics[f"{p}_goal_short_of"]
            out.append(
                "| "
                + " | ".join(
                    [
                        f"`{rule}`",
                        f"{setting.n}, {setting.m}",
                        str(setting.windows),
                        f"{pct(metrics[f'{p}_false_rate'])} [{pct(metrics[f'{p}_false_lo'])},"
                        f" {pct(metrics[f'{p}_false_hi'])}]",
                        pct(metrics[f"compute_fraction_n{setting.n}w{setting.windows}"]),
                        f"{pct(metrics[f'{p}_det_{low}_rate'])} ({LONG.get(low, low)})",
                        sandbaggers,
                        "**met**" if not short else f"short: {short}",
                    ]
                )
                + " |"
            )
    return [f"Margin {margin:g} nats:", "", *out]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "verify.json", help="result JSON")
    parser.add_argument(
        "--rule",
        choices=(*RULES, "both"),
        default=None,
        help="referee subset rule(s); default: both (quick: referee only)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the README table here")
    args = parser.parse_args(argv)
    sizes = Sizes.pick(args.quick)
    chosen = args.rule or ("referee" if args.quick else "both")
    rules = RULES if chosen == "both" else (chosen,)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU seconds per evaluation and per step, one core each
    try:
        with tempfile.TemporaryDirectory() as tmp:
            metrics, traces = run(sizes, rules, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    result = {
        "benchmark": "verify",
        "params": {
            "quick": args.quick,
            "rules": list(rules),
            **asdict(sizes),
            "goal": (
                f"detection >= {GOAL_DETECTION:.0%} of every kind, false accusation <= "
                f"{GOAL_FALSE_ACCUSATION:.0%}, referee compute <= {GOAL_COMPUTE:.0%} of the "
                f"contributors' training; payment spearman >= {GOAL_SPEARMAN}"
            ),
        },
        "env": environment(numpy=np.__version__, torch_threads=1),
        "metrics": metrics,
        "market_traces": traces,
    }
    write_result(result, args.out)
    for line in table(metrics, sizes, rules):
        print(line)
    print(f"(written to {args.out})")
    if args.markdown:
        args.markdown.write_text(markdown(result, sizes, rules))
    return result


if __name__ == "__main__":
    main()

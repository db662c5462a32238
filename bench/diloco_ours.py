"""Our DiLoCo (Douillard et al. 2023, arXiv 2311.08105), run through the code a live run runs.

Each round, every replica is ``inner.run_replica`` on a ``ReplicaTask`` built the way the
coordinator builds it (``round_plan.inner_steps_of`` / ``global_step_of``: warm-up rounds take
one inner step), with its own state folder (AdamW state and error-feedback residual carried
between rounds) and the real encoded payload file it writes. The close is the coordinator's
(``RoundDriver.close``): ``pseudograd.decode`` against the round's start weights,
``outer.Contribution`` weighted by inner steps done / H, ``outer.screen``,
``outer.average``, ``outer.outer_step`` (warm-up rounds: lr 1, momentum 0, momentum buffer
untouched).

The replicas run one after another in this process. That is fair: a replica's inner loop
depends only on the global weights, its shard share, its seed and its own saved state, so
the math is exactly what four machines would compute; the wall time of a round is modelled as
the slowest replica's measured time plus the link, not measured as a sum.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save

from bench.diloco_arms import ArmResult, HeldOut, Point, Setup, Weights
from trainfleet.coordinator.round_plan import global_step_of, inner_steps_of
from trainfleet.data.prepare import CacheSettings
from trainfleet.manifest.runs import CompressionSpec, ReplicaTask, RunSpec
from trainfleet.train import outer, pseudograd
from trainfleet.train.inner import PSEUDOGRAD_FILE, run_replica


def run_spec(setup: Setup, arm: dict[str, Any]) -> RunSpec:
    p = setup.params
    h, warm = arm["inner_steps"], arm["warmup_rounds"]
    if (setup.steps - warm) % h:
        raise ValueError(f"inner steps {setup.steps} - warm-up {warm} not a multiple of H={h}")
    hyper = p.model_dump(exclude={"steps", "corpus", "corpus_bytes", "heldout_fraction"})
    return RunSpec(
        name="bench",
        hyper={**hyper, "lr": arm["inner_lr"]},
        dataset=setup.dataset,
        replicas=setup.replicas,
        inner_steps=h,
        outer_lr=arm["outer_lr"],
        outer_momentum=arm["momentum"],
        rounds=warm + (setup.steps - warm) // h,
        warmup_rounds=warm,
        compression=arm["codec"],
    )


def our_diloco(
    setup: Setup, weights: Weights, held: HeldOut, work: Path, arm: dict[str, Any]
) -> ArmResult:
    """``arm``: inner_steps, warmup_rounds, inner_lr, outer_lr, momentum, codec (a
    CompressionSpec), label."""
    spec = run_spec(setup, arm)
    assert spec.rounds is not None
    rounds = spec.rounds
    run_id = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()
    params = {**setup.params.model_dump(mode="json"), "lr": arm["inner_lr"]}
    settings = CacheSettings(setup.cache_dir)
    total = global_step_of(spec, rounds)
    samples_per_step = setup.replicas * setup.params.batch_size
    momentum: Weights | None = None
    points: list[Point] = []
    snapshots: list[Weights] = []
    sent = link = 0
    overhead_s = compute_s = replica_s = 0.0
    payloads: list[int] = []
    refused = 0
    for r in range(rounds):
        blob = save(weights)
        warm = r < spec.warmup_rounds
        h = inner_steps_of(spec, r)
        step = global_step_of(spec, r)
        round_max_overhead = 0.0
        contributions = []
        for k in range(setup.replicas):
            task = ReplicaTask(
                run=spec.name,
                run_id=run_id,
                round=r,
                replica=k,
                num_replicas=setup.replicas,
                weights=hashlib.sha256(blob).hexdigest(),
                weights_size=len(blob),
                inner_steps=h,
                global_step=step,
                total_steps=total,
                params=params,
                dataset=setup.dataset,
                compression=spec.compression,
                warmup=warm,
            )
            out = work / "out" / f"k{k}"
            began = time.perf_counter()
            metrics = run_replica(
                task,
                weights,
                work / "state" / f"k{k}",
                out,
                log=lambda _: None,
                num_threads=1,
                settings=settings,
            )
            elapsed = time.perf_counter() - began
            data = (out / PSEUDOGRAD_FILE).read_bytes()
            payloads.append(len(data))
            compute_s += metrics["compute_s"]
            replica_s += elapsed
            round_max_overhead = max(round_max_overhead, elapsed - metrics["compute_s"])
            began = time.perf_counter()
            delta = pseudograd.decode(data, weights).delta
            weight = max(1, metrics["inner_steps_done"]) / h
            contributions.append(outer.Contribution(k, delta, 0, weight))
            overhead_s += (time.perf_counter() - began) / setup.replicas  # decodes in parallel
        mean_payload = sum(payloads[-setup.replicas :]) / setup.replicas
        sent += round(mean_payload)
        link += round(mean_payload) + len(blob)  # upload the payload, download the weights
        began = time.perf_counter()
        kept, screened = outer.screen(contributions, spec.outlier_factor)
        refused += len(screened)
        if kept:
            lr, mu = (1.0, 0.0) if warm else (spec.outer_lr, spec.outer_momentum)
            new_w, new_m = outer.outer_step(
                weights, outer.average(kept), None if warm else momentum, lr, mu
            )
            weights = new_w
            if not warm:
                momentum = new_m
        overhead_s += time.perf_counter() - began + round_max_overhead
        done = step + h
        if done % setup.eval_every < h or r == rounds - 1:
            points.append(Point(done, done * samples_per_step, sent, link, overhead_s))
            snapshots.append(weights)
    held.score(points, snapshots)
    codec: CompressionSpec = spec.compression
    return ArmResult(
        name=arm["label"],
        family="diloco",
        settings={
            "inner_steps": spec.inner_steps,
            "warmup_rounds": spec.warmup_rounds,
            "rounds": rounds,
            "inner_lr": arm["inner_lr"],
            "outer_lr": spec.outer_lr,
            "momentum": spec.outer_momentum,
            "codec": codec.model_dump(),
        },
        points=points,
        compute_s=compute_s,
        replica_compute_s=compute_s / setup.replicas,
        extra={
            "replica_elapsed_s": replica_s,
            "payload_bytes_mean": sum(payloads) / len(payloads),
            "payload_bytes_max": max(payloads),
            "refused": refused,
        },
    )

"""The pure rules of a run's rounds: when one closes, what its tasks are, adaptive H.

No I/O here: ``coordinator.rounds`` (the driver) reads the state, asks these functions and
writes the outcome. The rules are stated in ``coordinator.rounds``'s docstring; the schedule
(DiLoCo, Douillard et al. 2023, arXiv 2311.08105): ``warmup_rounds`` synchronous rounds of one
inner step each, then rounds of H = ``inner_steps``; a task's ``global_step`` counts the inner
steps each replica took before its round, ``total_steps`` those of the whole run (the inner
learning-rate schedule runs over them).
"""

from __future__ import annotations

import math
import statistics

from trainfleet.manifest.runs import ReplicaTask, RunSpec
from trainfleet.manifest.spec import JobSpec
from trainfleet.queue.runs_base import ContributionRecord, RoundRecord, RunRecord
from trainfleet.queue.sqlite_runs import scheduling_fields


def close_reason(
    spec: RunSpec, rnd: RoundRecord, num_accepted: int, all_in: bool, now: float
) -> str | None:
    """Why round ``rnd`` closes now, or None (the rules (a), (b), (c) of the module doc)."""
    if all_in:
        return "every replica reported"
    if num_accepted < spec.quorum:
        return None
    quorum_at = rnd.quorum_at if rnd.quorum_at is not None else now
    if now >= quorum_at + spec.straggler_wait * (quorum_at - rnd.opened_at):
        return f"quorum ({num_accepted}/{spec.replicas}) and the straggler wait passed"
    if now >= rnd.opened_at + spec.round_timeout_s:
        return f"timeout with quorum ({num_accepted}/{spec.replicas})"
    return None


def inner_steps_of(spec: RunSpec, round: int) -> int:
    """H of a round: warm-up rounds take one inner step."""
    return 1 if round < spec.warmup_rounds else spec.inner_steps


def global_step_of(spec: RunSpec, round: int) -> int:
    """Inner steps each replica took before ``round``."""
    warm = min(round, spec.warmup_rounds)
    return warm + max(0, round - spec.warmup_rounds) * spec.inner_steps


def replica_tasks(
    run: RunRecord, round: int, weights: str, size: int, target_s: float | None
) -> list[JobSpec]:
    """The queue jobs of one round: one per replica slot."""
    from trainfleet.train.recipes import GPTParams

    spec = run.spec
    warm = round < spec.warmup_rounds
    params = GPTParams(**spec.hyper).model_dump(mode="json")
    total = global_step_of(spec, run.num_rounds)
    jobs = []
    for k in range(spec.replicas):
        task = ReplicaTask(
            run=spec.name,
            run_id=run.id,
            round=round,
            replica=k,
            num_replicas=spec.replicas,
            weights=weights,
            weights_size=size,
            inner_steps=inner_steps_of(spec, round),
            global_step=global_step_of(spec, round),
            total_steps=max(1, total),
            params=params,
            dataset=spec.dataset,
            compression=spec.compression,
            gang_size=spec.gang_size,
            warmup=warm,
            target_s=None if warm else target_s,
        )
        jobs.append(
            JobSpec(
                name=f"{spec.name}.r{round}.k{k}",
                kind="replica",
                model=spec.model,
                task=task,
                **scheduling_fields(spec),
            )
        )
    return jobs


def target_s(spec: RunSpec, round: int, applied: list[ContributionRecord]) -> float | None:
    """Adaptive H: the median time a replica of ``round`` would take for all H steps (none
    after a warm-up round: one step's time says little about H)."""
    if round < spec.warmup_rounds:
        return None
    h = inner_steps_of(spec, round)
    rates = [
        c.compute_s * h / c.inner_steps_done
        for c in applied
        if c.round == round and c.compute_s is not None and c.inner_steps_done > 0
    ]
    rates = [r for r in rates if 0 < r < math.inf]  # a worker's figure: never 0, inf or < 0
    return statistics.median(rates) if rates else None

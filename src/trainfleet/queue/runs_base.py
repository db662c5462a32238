"""Records of collaborative runs, and the part of the queue contract that stores them.

A run (``[[runs]]`` in the manifest, ``manifest.runs.RunSpec``) is trained by DiLoCo rounds
(Douillard et al. 2023, arXiv 2311.08105). The queue keeps three tables beside the jobs, in
the same database and the same transactions:

- ``runs``: one row per run identity (its id is the sha256 of ``RunSpec.identity()``), with
  its state (``active`` | ``completed`` | ``paused`` | ``superseded``), the open round, the
  current global weights and outer momentum (artifact digests);
- ``rounds``: one row per round: the weights it started from, when it opened, reached
  quorum and closed, and its figures (accepted, refused, late applied, dropped, held-out
  loss, bytes up and down, the weights it produced);
- ``contributions``: one row per completed replica attempt (job, epoch): the uploaded
  pseudo-gradient and what became of it (``accepted`` on arrival, then ``applied`` at a
  close, or ``refused`` / ``dropped`` with a reason).

Each round's replica tasks are ordinary queue jobs (``kind = "replica"``), claimed, fenced
and reaped like any job. The round state machine itself (when a round closes, the outer
step) lives in ``coordinator.rounds``; this module only names what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.manifest.runs import RunSpec
from trainfleet.manifest.spec import JobSpec

RunState = Literal["active", "completed", "paused", "superseded"]
RoundState = Literal["open", "closed"]
ContributionStatus = Literal["accepted", "refused", "applied", "dropped"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class RunRecord(_Record):
    id: str = Field(description="sha256 of the run's canonical identity")
    name: str
    state: RunState
    spec: RunSpec
    round: int = Field(description="the open round (num_rounds once completed)")
    num_rounds: int
    weights: str | None = Field(description="sha256 of the current global weights")
    weights_size: int
    momentum: str | None = Field(description="sha256 of the outer momentum buffer, if any")
    in_manifest: bool
    created_at: float
    updated_at: float


class RoundRecord(_Record):
    run_id: str
    round: int
    state: RoundState
    weights: str = Field(description="sha256 of the global weights the round started from")
    weights_size: int
    target_s: float | None = Field(description="adaptive H: the replicas' time target")
    opened_at: float
    quorum_at: float | None = Field(description="when min_quorum contributions were in")
    closed_at: float | None
    accepted: int = Field(description="this round's contributions applied at its close")
    refused: int = Field(description="this round's contributions refused (with reasons)")
    late_applied: int = Field(description="earlier rounds' late contributions applied here")
    dropped: int = Field(description="contributions dropped at this close (too stale)")
    heldout_loss: float | None
    bytes_up: int = Field(description="pseudo-gradient bytes uploaded for this round")
    bytes_down: int = Field(description="weight bytes served to this round's replicas")
    next_weights: str | None = Field(description="sha256 of the weights the close produced")
    wall_s: float | None = Field(description="closed_at - opened_at")
    detail: str


class ContributionRecord(_Record):
    run_id: str
    round: int = Field(description="the round the task belonged to")
    replica: int
    job_id: str
    epoch: int
    worker_id: str
    sha256: str | None = Field(description="the uploaded pseudo-gradient")
    size: int
    status: ContributionStatus
    reason: str
    norm: float | None
    inner_steps_done: int
    compute_s: float | None
    staleness: int = Field(description="open round minus the task's round, at arrival")
    applied_in_round: int | None = Field(description="the round whose close applied it")
    created_at: float


@dataclass(frozen=True)
class Verdict:
    """What the coordinator found in an uploaded pseudo-gradient, before recording it."""

    status: Literal["accepted", "refused"]
    reason: str = ""
    norm: float | None = None
    sha256: str | None = None
    size: int = 0
    inner_steps_done: int = 0
    compute_s: float | None = None


@dataclass(frozen=True)
class RoundStatus:
    """A run's open round, as the round driver needs it to decide whether to close."""

    run: RunRecord
    round: RoundRecord
    contributions: list[ContributionRecord]  # not yet applied, refused or dropped included
    task_states: dict[int, str]  # replica slot -> job state of this round's task


@dataclass(frozen=True)
class RoundOutcome:
    """Everything one close writes, in one transaction (``RunQueue.close_round``)."""

    run_id: str
    round: int
    applied: list[tuple[str, int]]  # (job_id, epoch) of contributions applied
    refused: list[tuple[str, int, str]]  # (job_id, epoch, reason) refused at the close
    dropped: list[tuple[str, int, str]]  # (job_id, epoch, reason)
    accepted: int
    late_applied: int
    heldout_loss: float | None
    next_weights: str
    next_weights_size: int
    momentum: str | None
    detail: str
    next_tasks: list[JobSpec] = field(default_factory=list)  # empty: the run is complete
    next_target_s: float | None = None

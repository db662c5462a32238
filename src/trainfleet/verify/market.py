"""Market rules: a competition's terms, and what one verdict pays (pure; no I/O).

A competition (king of the hill) names a model family (the gpt recipe's params), a held-out
dataset, a payout ``rate`` in credits per nat of held-out loss reduction, a ``margin`` the
improvement must clear, and a referee panel of ``referees`` (n) needing ``quorum`` (m). Its
*frontier* starts at the baseline model, scored by the coordinator itself on the whole
held-out pool.

The rule (``payment``): a submission is paid only when the panel accepted its claim
(``verify.panel.judge``), at least ``quorum`` referees certified an improvement over the
frontier (``verify.gate.paired_gate``: the bootstrap lower bound beats ``margin``) and the
consensus improvement is positive. It is paid ``rate x improvement`` and the frontier moves
down by exactly that improvement, to the panel's trusted score. Because every payment is
measured against the frontier it moves, payments telescope: the total paid equals
``rate x (baseline score - final frontier score)``. The submitter's own claim is checked,
never paid on.

Where the rules are enforced (``queue.sqlite_market``):

- **Pay once** is a database fact: the append-only ledger has ``UNIQUE(submission_id)``, and
  a submission's state, its ledger row and the frontier move commit in one transaction. A
  second decision on a decided submission changes nothing and pays nothing; a coordinator
  restart can neither lose an entry nor pay twice.
- **The frontier is bought once**: a payment is measured against the frontier the referees
  compared with. If another submission moved the frontier while this one was refereed, its
  improvement is over a model that is no longer the frontier, and paying it would pay twice
  for the same loss reduction. So the frontier move is guarded (it must still be the one the
  submission was judged against) and a submission that loses that race is decided
  ``rejected`` with ``FRONTIER_MOVED``: it may be submitted again, to be judged by a new
  panel against the new frontier. The payment that moves the frontier decides every such
  submission at once and cancels its referee jobs (no referee spends time on a verdict that
  can no longer count). (Re-queuing its referees automatically would work too,
  but costs a whole panel silently; the submitter decides.)
- **Resubmissions pay nothing**: a model whose bytes equal the baseline or a submission of
  the competition still refereeing or accepted (every frontier is one of these) is a
  ``duplicate``: no referee runs. A rejected model may be submitted again (a fresh panel on
  fresh subsets judges it; a model that is no better is still paid nothing).
- **Balances are derived** from the ledger (``SUM(amount)`` by account), never stored.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainfleet.data.spec import DatasetSpec
from trainfleet.manifest.names import Name
from trainfleet.train.recipes import GPTParams
from trainfleet.verify.panel import Verdict
from trainfleet.verify.spec import DEFAULT_WINDOWS, MAX_WINDOWS

MAX_REFEREES = 16
MAX_RATE = 1e12
SubmissionState = Literal["refereeing", "accepted", "rejected", "duplicate"]
SUBMISSION_STATES: tuple[SubmissionState, ...] = (
    "refereeing",
    "accepted",
    "rejected",
    "duplicate",
)
FRONTIER_MOVED = (
    "the frontier moved while it was refereed; submit again to be judged against the new frontier"
)
OPERATOR = "operator"
"""The producer (and ledger account) of a model the operator submits."""

Scalar = str | int | float | bool


class CompetitionSpec(BaseModel):
    """The terms of one competition (``[competition]`` in its TOML file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name = Field(description="unique competition name (letters, digits, . _ -)")
    hyper: dict[str, Scalar] = Field(
        description="the model family: the gpt recipe's params every submission must fit"
    )
    dataset: DatasetSpec = Field(description="the dataset whose held-out shards judge models")
    rate: float = Field(gt=0, le=MAX_RATE, description="credits paid per nat of loss reduction")
    margin: float = Field(
        # bench/verify: 0.01 nats stops paying noisy copies of the frontier
        0.01,
        ge=0,
        le=100,
        description="nats an improvement's lower bound must exceed",
    )
    referees: int = Field(3, ge=1, le=MAX_REFEREES, description="n: referees per submission")
    quorum: int = Field(2, ge=1, le=MAX_REFEREES, description="m: referees that must agree")
    windows: int = Field(
        DEFAULT_WINDOWS,
        ge=2,  # one window has no interval: every claim but its exact loss would be refused
        le=MAX_WINDOWS,
        description="held-out windows each referee evaluates (its seeded subset)",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="confidence of the intervals and of the gate"
    )
    resamples: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples")

    @field_validator("hyper")
    @classmethod
    def _fits_recipe(cls, hyper: dict[str, Any]) -> dict[str, Any]:
        GPTParams.model_validate(hyper)
        return hyper

    @field_validator("rate", "margin")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _quorum_within_panel(self) -> CompetitionSpec:
        if self.quorum > self.referees:
            raise ValueError(f"quorum {self.quorum} > referees {self.referees}")
        if self.dataset.router is not None:
            raise ValueError("dataset: a competition's held-out set is a dataset without a router")
        return self

    def params(self) -> GPTParams:
        """The model family's params."""
        return GPTParams.model_validate(self.hyper)


def is_paid(spec: CompetitionSpec, verdict: Verdict) -> bool:
    """Whether a verdict earns a payment: accepted, certified by at least ``quorum``
    referees, with a positive finite consensus improvement."""
    return (
        verdict.state == "accepted"
        and verdict.certified >= spec.quorum
        and math.isfinite(verdict.improvement)
        and verdict.improvement > 0
    )


def payment(spec: CompetitionSpec, frontier_score: float, verdict: Verdict) -> float:
    """Credits a verdict on a submission judged against ``frontier_score`` earns:
    ``rate x improvement`` when paid (``is_paid``), else 0.0. The frontier then moves to
    ``frontier_score - improvement`` (``next_frontier``)."""
    if not is_paid(spec, verdict) or not math.isfinite(frontier_score):
        return 0.0
    return spec.rate * verdict.improvement


def next_frontier(frontier_score: float, verdict: Verdict) -> float:
    """The frontier score after paying ``verdict``: down by its consensus improvement."""
    return frontier_score - verdict.improvement


__all__ = [
    "FRONTIER_MOVED",
    "MAX_REFEREES",
    "OPERATOR",
    "SUBMISSION_STATES",
    "CompetitionSpec",
    "SubmissionState",
    "is_paid",
    "next_frontier",
    "payment",
]

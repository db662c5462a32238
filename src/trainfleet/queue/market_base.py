"""Records of the training market, as the queue stores them (``queue.sqlite_market``).

Four tables beside the jobs, in the same database and the same transactions (schema
version 4, ``queue.migrations``):

- ``competitions``: a competition's terms (``verify.market.CompetitionSpec``), its baseline
  and the current frontier (the model to beat and its score);
- ``submissions``: each model submitted, the frontier it was judged against, its state
  (``refereeing`` | ``accepted`` | ``rejected`` | ``duplicate``), trusted score and pay;
- ``referee_reports``: one per panel slot of a submission, computed by the coordinator from
  the referee's loss arrays (``verify.panel.RefereeReport``);
- ``market_ledger``: append-only payments, at most one per submission (``UNIQUE``); balances
  are its sums by account.

A submission's referee jobs are ordinary queue jobs (``kind = "referee"``, ``jobs.panel`` =
the submission id), claimed, fenced and reaped like any other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.verify.market import CompetitionSpec, SubmissionState


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class CompetitionRecord(_Record):
    id: str = Field(description="sha256 of the competition's terms and baseline")
    name: str
    spec: CompetitionSpec
    baseline: str = Field(description="sha256 of the baseline model's safetensors file")
    baseline_score: float = Field(description="its held-out loss, measured by the coordinator")
    frontier: str = Field(description="sha256 of the model to beat")
    frontier_score: float = Field(description="its trusted held-out loss")
    frontier_submission: str | None = Field(
        description="the submission that made it the frontier (None: the baseline)"
    )
    created_at: float


class RefereeReportRecord(_Record):
    submission_id: str
    index: int = Field(description="the referee's panel slot")
    job_id: str
    worker_id: str
    host: str
    ok: bool = Field(description="False: the evaluation was unusable; it vouches for nothing")
    mean: float | None = Field(description="the candidate's mean loss on the referee's subset")
    lo: float | None
    hi: float | None
    improvement: float | None = Field(description="paired mean improvement over the frontier")
    lower: float | None = Field(description="its one-sided lower bound")
    certified: bool
    reason: str
    created_at: float


class SubmissionRecord(_Record):
    id: str
    seq: int = Field(description="its number within the competition, from 1")
    competition_id: str
    sha256: str = Field(description="the submitted model's safetensors file")
    size: int
    producer: str = Field(description="the host that submitted it ('operator' for the operator)")
    claim: float = Field(description="the held-out loss its producer claims (checked, never paid)")
    state: SubmissionState
    frontier: str = Field(description="sha256 of the frontier it was judged against")
    frontier_score: float
    trusted_score: float | None = Field(description="the panel's consensus score")
    improvement: float | None = Field(description="the panel's consensus improvement (nats)")
    paid: float
    verdict: str = Field(description="the decision in one sentence ('' while refereeing)")
    created_at: float
    decided_at: float | None
    reports: list[RefereeReportRecord] = Field(default_factory=list)


class LedgerEntry(_Record):
    seq: int
    competition_id: str
    submission_id: str
    account: str = Field(description="who was paid: the submission's producer")
    amount: float
    frontier_before: float
    frontier_after: float
    at: float


__all__ = ["CompetitionRecord", "LedgerEntry", "RefereeReportRecord", "SubmissionRecord"]

"""What one referee is asked to do: ``RefereeTask``, the task of a ``kind = "referee"`` job.

A referee re-measures a submitted model (the candidate) and the competition's current frontier
model on the same seeded subset of held-out windows, so that the coordinator can judge the
submitter's claim and the paired improvement from numbers its author did not produce. The
task is complete: with the two models' bytes (named by sha256) the referee program
(``verify.referee``) needs nothing else. It imports no torch, so the manifest and the queue
can validate it cheaply.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from trainfleet.data.spec import DatasetSpec
from trainfleet.manifest.names import _Spec
from trainfleet.train.recipes import GPTParams

MAX_WINDOWS = 4096
"""The largest subset a referee evaluates (and the longest loss array a report may carry)."""
DEFAULT_WINDOWS = 128  # bench/verify: with 3 referees needing 2, <= 1% honest claims refused
_MAX_SEED = 2**63 - 1

Scalar = str | int | float | bool


class RefereeTask(_Spec):
    """One referee's evaluation of a submission: candidate and frontier on one subset."""

    submission_id: str = Field(
        min_length=1, max_length=128, description="the submission being refereed"
    )
    competition_id: str = Field(
        min_length=1, max_length=128, description="the competition it was submitted to"
    )
    index: int = Field(ge=0, le=255, description="this referee's slot in the panel, 0..n-1")
    candidate: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="sha256 of the candidate's safetensors file"
    )
    frontier: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the frontier model's safetensors file it is compared with",
    )
    hyper: dict[str, Scalar] = Field(
        description="the competition's model family: the gpt recipe's params (GPTParams)"
    )
    dataset: DatasetSpec = Field(description="the held-out spec; its held-out shards are used")
    windows: int = Field(
        DEFAULT_WINDOWS,
        ge=1,
        le=MAX_WINDOWS,
        description="windows (of seq_len + 1 tokens) in this referee's subset",
    )
    seed: int = Field(ge=0, le=_MAX_SEED, description="the subset's seed (the coordinator's)")
    producer: str = Field(
        min_length=1,
        max_length=253,
        description="host that produced the candidate ('operator' for the operator)",
    )

    @field_validator("hyper")
    @classmethod
    def _fits_recipe(cls, hyper: dict[str, Any]) -> dict[str, Any]:
        GPTParams.model_validate(hyper)
        return hyper

    def params(self) -> GPTParams:
        """The model family's params."""
        return GPTParams.model_validate(self.hyper)

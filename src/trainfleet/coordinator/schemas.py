"""Request and response bodies of the HTTP API (also the source of its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.capability.model import Capability
from trainfleet.queue.base import ArtifactRecord, Claim, Event, JobRecord, JobRef, WorkerRecord


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterRequest(Body):
    capability: Capability
    slots: int = Field(
        1,
        ge=1,
        le=64,
        description="jobs this worker may hold at once (batch clients; the worker daemon: 1)",
    )


class RegisterResponse(Body):
    worker_id: str
    token: str = Field(description="per-worker credential: send as 'Authorization: Bearer ...'")
    effective: Capability = Field(description="detected capability after the host policy")
    notes: list[str]
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    limits: dict[str, int] = Field(
        default_factory=dict,
        description="what the coordinator accepts per request (max_log_lines,"
        " max_log_line_chars, max_error_chars, max_json_bytes, max_result_bytes): the worker"
        " sends no more",
    )


class ClaimResponse(Body):
    claim: Claim | None = Field(description="null when there is no work for this worker now")


class EpochBody(Body):
    epoch: int = Field(ge=1, description="fencing epoch from the claim")


class LogBody(EpochBody):
    lines: list[str] = Field(max_length=10_000)


class CompleteBody(EpochBody):
    result: dict[str, Any] = Field(
        default_factory=dict, description="metrics and the artifact id of this attempt"
    )


class FailBody(EpochBody):
    error: str = Field(max_length=20_000)
    retryable: bool = Field(True, description="false: fail the job now, without retries")
    release: bool = Field(False, description="hand back (worker shutdown); no failure counted")


class ManifestBody(Body):
    text: str = Field(description="the TOML manifest text")
    path: str = Field("<manifest>", description="file name used in error messages")
    dry_run: bool = Field(False, description="only return the plan; change nothing")


class RouterBody(Body):
    router: dict[str, Any] = Field(
        description="the router as `trainfleet data fit-router` writes it"
    )


class Count(Body):
    count: int


class JobDetail(Body):
    job: JobRecord
    events: list[Event]
    artifacts: list[ArtifactRecord]
    same_name: list[JobRef] = Field(
        default_factory=list,
        description="other jobs with this name (older versions a reload replaced), oldest first",
    )


class JobList(Body):
    jobs: list[JobRecord]


class WorkerList(Body):
    workers: list[WorkerRecord]


class Status(Body):
    counts: dict[str, int]
    workers_online: int
    manifest_hash: str | None
    version: str


class Explanation(Body):
    id: str
    name: str
    state: str
    needs: str
    message: str
    eligible_online: list[str]
    hosts: dict[str, list[str]]

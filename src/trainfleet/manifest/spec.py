"""Typed, frozen manifest specs. Unknown keys are rejected; every field says what it means.

The field names here are the manifest keys, the JSON keys of the HTTP API and the names in the
docs: one name per concept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from trainfleet.data.spec import DatasetSpec, content_fields
from trainfleet.manifest.names import INT64_MAX, HostName, Int64, Name, _Spec
from trainfleet.manifest.pipelines import PipelineSpec, PipelineTask
from trainfleet.manifest.runs import ReplicaTask, RunSpec
from trainfleet.verify.spec import RefereeTask

Scalar = str | int | float | bool
JobKind = Literal["train", "command", "replica", "referee", "producer", "consumer"]
Tier = Literal["public", "private"]


def _task_kind(value: Any) -> str:
    """Which task a job carries: a referee task names a submission, a pipeline task its
    role, a replica task a run."""
    if isinstance(value, RefereeTask) or (isinstance(value, dict) and "submission_id" in value):
        return "referee"
    if isinstance(value, PipelineTask) or (isinstance(value, dict) and "role" in value):
        return "pipeline"
    return "replica"


# A replica task parses exactly as before (same JSON, same identity); a referee task is told
# apart by its submission_id, a pipeline task by its role, and ``JobSpec`` checks that each
# rides on a job of its kind.
Task = Annotated[
    Annotated[ReplicaTask, Tag("replica")]
    | Annotated[RefereeTask, Tag("referee")]
    | Annotated[PipelineTask, Tag("pipeline")],
    Discriminator(_task_kind),
]


class HostPolicy(_Spec):
    """What the operator allows a host to do, and what it declares it has.

    Declared capability is intersected with what the worker detects; the more restrictive
    wins (a host declared with a GPU where none is found is CPU-only).
    """

    description: str = Field("", description="free text shown in `trainfleet workers`")
    priority: int = Field(
        0,
        description="among idle eligible hosts, a job goes to the highest priority first",
    )
    allow_jobs: list[str] = Field(
        default_factory=lambda: ["*"], description="glob patterns of job names this host may run"
    )
    deny_jobs: list[str] = Field(
        default_factory=list, description="glob patterns of job names it may not run; deny wins"
    )
    cuda: bool | None = Field(None, description="declared CUDA; unset = trust detection")
    num_gpus: int | None = Field(None, ge=0, description="cap on GPUs used; unset = detected")
    vram_gib: float | None = Field(None, ge=0, description="cap on VRAM per GPU; unset = detected")
    ram_gib: float | None = Field(None, ge=0, description="cap on RAM; unset = detected")
    cores: int | None = Field(None, ge=1, description="cap on CPU cores; unset = detected")


_JOB_DEFAULTABLE = (
    "kind",
    "dataset",
    "recipe",
    "model",
    "mode",
    "priority",
    "require_cuda",
    "prefer_cuda",
    "min_vram_gib",
    "min_ram_gib",
    "min_cores",
    "allowed_hosts",
    "max_failures",
    "timeout_s",
    "tier",
    "submitter",
)

# Keys renamed in a release: old manifest key -> new one. The loader accepts the old key with a
# warning; a spec stored by an earlier release (in a queue database) is read silently.
RENAMED_KEYS = {"max_attempts": "max_failures"}


def _renamed(data: Any) -> Any:
    if isinstance(data, dict) and any(old in data for old in RENAMED_KEYS):
        data = dict(data)
        for old, new in RENAMED_KEYS.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
    return data


class JobSpec(_Spec):
    """One unit of independent training work."""

    name: Name = Field(description="unique job name (letters, digits, . _ -)")
    kind: JobKind = Field(
        "train",
        description="'train' (built-in trainer) or 'command'; 'replica' is a run's task,"
        " made by the coordinator, never written in a manifest",
    )
    recipe: str | None = Field(None, description="built-in recipe for kind='train' (e.g. 'gpt')")
    command: list[str] | None = Field(
        None, description="argv for kind='command'; hyper.* are appended as --key value"
    )
    model: str = Field("", description="label for what is trained (shown in tables)")
    mode: str = Field("full", description="run mode; for 'gpt': 'full' or 'smoke'")
    priority: Int64 = Field(0, description="higher runs first; FIFO within a priority")
    hyper: dict[str, Scalar] = Field(
        default_factory=dict, description="hyperparameters (recipe params or --flags)"
    )
    require_cuda: bool = Field(False, description="only CUDA hosts may claim it")
    prefer_cuda: bool = Field(
        False, description="wait prefer_cuda_wait_s for a CUDA host before a CPU host may take it"
    )
    min_vram_gib: float = Field(0, ge=0, description="minimum VRAM of one GPU; needs require_cuda")
    min_ram_gib: float = Field(0, ge=0, description="minimum host RAM")
    min_cores: int = Field(1, ge=1, le=INT64_MAX, description="minimum CPU cores")
    allowed_hosts: list[HostName] = Field(
        default_factory=list, description="host names that may run it; empty = any"
    )
    max_failures: int = Field(
        3,
        ge=1,
        le=100,
        description="failed or lost attempts before the job fails (hand-backs do not count);"
        " formerly max_attempts",
    )
    timeout_s: float = Field(3600, gt=0, description="wall-clock limit of one attempt")
    dataset: DatasetSpec | None = Field(
        None,
        description="the [datasets.NAME] spec a train job trains on (the manifest names it)",
    )
    path: int | None = Field(
        None, ge=0, description="for a routed dataset: the path whose documents the job trains on"
    )
    tier: Tier = Field(
        "public",
        description="'private': only a worker with a valid attestation may claim it",
    )
    after: list[Name] = Field(
        default_factory=list,
        description="names of jobs that must complete first: the job waits (state"
        " 'waiting') until every one has completed, and fails if one fails or is cancelled",
    )
    submitter: Name = Field(
        "operator",
        description="who the work is for: fair share orders the jobs of one priority by"
        " their submitter's recent (decayed) compute use, least first",
    )
    task: Task | None = Field(
        None,
        description="for kind='replica': the run, round and replica slot it trains; for"
        " kind='referee': the submission and held-out subset it re-measures; for"
        " kind='producer'/'consumer': the pipeline, role and index",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_renamed_keys(cls, data: Any) -> Any:
        return _renamed(data)

    @model_validator(mode="after")
    def _referee_task_on_referee_jobs(self) -> JobSpec:
        referee_task = isinstance(self.task, RefereeTask)
        if self.kind == "referee" and not referee_task:
            raise ValueError(
                "a kind='referee' job needs a referee task: referee jobs re-measure market"
                " submissions and are made by the coordinator, never written in a manifest"
            )
        if referee_task and self.kind != "referee":
            raise ValueError(f"a referee task rides on a kind='referee' job, not {self.kind!r}")
        pipeline_task = self.task if isinstance(self.task, PipelineTask) else None
        if self.kind in ("producer", "consumer") and (
            pipeline_task is None or pipeline_task.role != self.kind
        ):
            raise ValueError(
                f"a kind={self.kind!r} job needs a pipeline task of that role: pipeline jobs"
                " are made by the coordinator from [[pipelines]], never written in a manifest"
            )
        if pipeline_task is not None and self.kind != pipeline_task.role:
            raise ValueError(
                f"a {pipeline_task.role} task rides on a kind={pipeline_task.role!r} job,"
                f" not {self.kind!r}"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that make a job the same job (scheduling fields may change freely)."""
        identity: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "recipe": self.recipe,
            "command": self.command,
            "mode": self.mode,
            "hyper": self.hyper,
        }
        # Only when set, so jobs without a dataset keep the ids they had before datasets.
        if self.dataset is not None:  # its content: renaming a dataset table is not a new job
            identity["dataset"] = content_fields(self.dataset)
        if self.path is not None:
            identity["path"] = self.path
        if self.task is not None:
            identity["task"] = self.task.model_dump(mode="json")
        return identity

    @property
    def trained_dataset(self) -> DatasetSpec | None:
        """The dataset it trains on: its own, or its run's for a replica task (a referee
        task's held-out dataset is evaluated, not trained on)."""
        if self.dataset is not None:
            return self.dataset
        task = self.replica_task
        return task.dataset if task is not None else None

    @property
    def replica_task(self) -> ReplicaTask | None:
        """Its replica task, if it is a run's (None for every other job)."""
        return self.task if isinstance(self.task, ReplicaTask) else None

    @property
    def pipeline_task(self) -> PipelineTask | None:
        """Its pipeline task, if it is a pipeline's producer or consumer."""
        return self.task if isinstance(self.task, PipelineTask) else None

    @property
    def panel(self) -> str | None:
        """For a referee job, the submission it judges: the jobs of one panel go to distinct
        hosts (the ``jobs.panel`` column)."""
        return self.task.submission_id if isinstance(self.task, RefereeTask) else None

    def scheduling(self) -> dict[str, Any]:
        """Fields a reload may change on an existing job without changing its identity."""
        return self.model_dump(exclude=_IDENTITY_FIELDS)


_IDENTITY_FIELDS = {
    "name",
    "kind",
    "recipe",
    "command",
    "mode",
    "hyper",
    "dataset",
    "path",
    "task",
}


class Defaults(_Spec):
    """Values every job inherits unless it sets its own (hyper tables are merged)."""

    kind: JobKind | None = None
    dataset: str | None = Field(None, description="name of the dataset every train job uses")
    recipe: str | None = None
    model: str | None = None
    mode: str | None = None
    priority: int | None = None
    hyper: dict[str, Scalar] = Field(
        default_factory=dict, description="merged under the hyper of every train job"
    )
    require_cuda: bool | None = None
    prefer_cuda: bool | None = None
    min_vram_gib: float | None = Field(None, ge=0)
    min_ram_gib: float | None = Field(None, ge=0)
    min_cores: int | None = Field(None, ge=1)
    allowed_hosts: list[HostName] | None = None
    max_failures: int | None = Field(None, ge=1, le=100)
    timeout_s: float | None = Field(None, gt=0)
    tier: Tier | None = None
    submitter: Name | None = None
    prefer_cuda_wait_s: float = Field(
        30.0, ge=0, description="how long prefer_cuda jobs wait for a CUDA host"
    )

    def apply(self, raw_job: dict[str, Any]) -> dict[str, Any]:
        merged = {k: getattr(self, k) for k in _JOB_DEFAULTABLE if getattr(self, k) is not None}
        merged.update(raw_job)
        if merged.get("kind", "train") == "command":
            # Default recipe and hyper are for train jobs: a program's flags are its own.
            for key in ("recipe", "dataset"):
                if key not in raw_job:
                    merged.pop(key, None)
        elif isinstance(raw_job.get("hyper", {}), dict):
            # A non-table hyper is left as is, for validation to report.
            merged["hyper"] = {**self.hyper, **raw_job.get("hyper", {})}
        return merged


class FairShareSpec(_Spec):
    """``[fair_share]``: how jobs of one priority are ordered by their submitters' recent use
    (Slurm's multifactor fair-share factor with ``PriorityDecayHalfLife``)."""

    half_life_h: float = Field(
        168.0,
        gt=0,
        allow_inf_nan=False,
        description="hours after which a job-hour of use counts half (Slurm's default: 7 days)",
    )
    interval_s: float = Field(
        5.0,
        ge=0.05,  # each tick is a write transaction: not a busy loop on the write lock
        le=3600,
        description="seconds between the leader's fair-share ticks (0.05 to 3600)",
    )
    shares: dict[Name, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="submitter -> weight; a submitter not named has weight 1",
    )


class Manifest(_Spec):
    """A whole manifest: defaults, host policies, datasets, jobs, runs and pipelines."""

    defaults: Defaults = Field(default_factory=Defaults)
    fair_share: FairShareSpec = Field(
        default_factory=FairShareSpec, description="fair-share ordering within a priority"
    )
    hosts: dict[HostName, HostPolicy] = Field(default_factory=dict)
    datasets: dict[Name, DatasetSpec] = Field(default_factory=dict)
    jobs: list[JobSpec] = Field(default_factory=list)
    runs: list[RunSpec] = Field(default_factory=list, description="collaborative DiLoCo runs")
    pipelines: list[PipelineSpec] = Field(
        default_factory=list, description="knowledge-distillation pipelines (producer/consumer)"
    )
    warnings: list[str] = Field(
        default_factory=list,
        exclude=True,
        description="what the loader found suspicious but not wrong (not part of the hash)",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Manifest:
        seen: set[str] = set()
        for job in self.jobs:
            if job.name in seen:
                raise ValueError(f"duplicate job name {job.name!r}")
            seen.add(job.name)
        runs: set[str] = set()
        for run in self.runs:
            if run.name in runs:
                raise ValueError(f"duplicate run name {run.name!r}")
            runs.add(run.name)
        pipelines: set[str] = set()
        for pipeline in self.pipelines:
            if pipeline.name in pipelines:
                raise ValueError(f"duplicate pipeline name {pipeline.name!r}")
            pipelines.add(pipeline.name)
        return self

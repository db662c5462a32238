"""Pipeline endpoints: the control plane of disaggregated pipelines (issue 11).

A pipeline (``[[pipelines]]`` in the manifest) runs producer jobs (a teacher computing
features) that feed consumer jobs (a student trainer) through a feature store
(``trainfleet.features``). Only references travel here: a ``SampleRef`` names a sample's
bytes in a store (address, key, generation, BLAKE3 digest, size, HMAC); no route carries tensor
bytes, and every body is bounded (``MAX_BODY_BYTES``, 256 KiB: 413 beyond). The rules (who
may publish, lease, ack; what settles) are the queue's (``queue.sqlite_pipeline_refs``);
these routes authenticate, bound and translate.

API (JSON shapes are the pydantic models named):

- ``POST /v1/jobs/{job_id}/pipeline`` (auth ``worker``; fenced like a heartbeat: 409 once
  the claim is stale, or for a job another worker holds) ``{"epoch": int}`` ->
  ``PipelineAttach`` = ``{pipeline_id, name, role: producer|consumer, index, secret (hex),
  attempt_token, spec (PipelineSpec JSON), teacher_model (sha256 | null), teacher_params
  (GPTParams JSON | null)}``. 400 if the job is not a pipeline job. The worker writes it
  (mode 0600) to ``attach.json`` for the job's process; the teacher model is downloaded with
  ``GET /v1/market/models/{sha256}``, which a worker running a producer job of the pipeline
  may read (``queue.holds_model``).

The job's process (auth ``attempt``: ``Authorization: Bearer <attempt_token>``; valid only
while that attempt is the job's active one: 409 ``stale_epoch`` afterwards, 401 for a wrong
token, 403 for another pipeline's path or the other role's route):

- ``POST /v1/pipelines/{pipeline_id}/publish`` (producer) ``{"refs": [SampleRef]}`` (at most
  ``MAX_ITEMS``) -> ``PipelinePublished`` = ``{"accepted": [sample_id], "skipped":
  [{"sample_id", "reason"}]}``; a ref whose MAC does not verify with the pipeline's secret,
  or outside the producer's share, is a 400 naming the sample.
- ``POST /v1/pipelines/{pipeline_id}/lease`` (consumer) ``{"max_samples": 1..256}`` ->
  ``PipelineLease`` = ``{"samples": [SampleRef], "retire": bool, "done": bool,
  "num_consumers": int}``.
- ``POST /v1/pipelines/{pipeline_id}/ack`` (consumer) ``{"acks": [{"sample_id", "step"}]}``
  -> ``PipelineAcks`` = ``{"results": [{"sample_id", "accepted": bool, "reason": str}]}``;
  a consumer trains on a sample only once its ack is accepted (exactly-once per consumer
  step).
- ``POST /v1/pipelines/{pipeline_id}/return`` (consumer) ``{"sample_ids": [..]}`` ->
  ``PipelineReturned`` = ``{"returned": int}``: leased samples it could not fetch, to be
  produced again.
- ``POST /v1/pipelines/{pipeline_id}/sync`` (producer) ``{"released": [sample_id]}`` ->
  ``PipelineSync`` = ``{"release": [SampleRef], "produce": [int], "finished": bool}``.

Operator (auth ``read``); a pipeline record never carries its secret:

- ``GET /v1/pipelines`` -> ``PipelineList`` = ``{"pipelines": [{"pipeline":
  PipelineRecord, "counts": PipelineCounts}]}``, oldest first; PipelineRecord = ``{id, name,
  spec, state: waiting|producing|completed|failed|superseded, teacher_job, teacher_model,
  consumers, in_manifest, detail, created_at, updated_at}``; PipelineCounts = ``{samples,
  produced, backlog, in_flight, consumed, committed, released, requeued, reproduced}``
  (``queue.pipelines_base``).
- ``GET /v1/pipelines/{pipeline}`` (a name, meaning its newest pipeline, or an id) ->
  ``PipelineDetail`` = ``{"pipeline", "counts", "jobs": [JobRecord]}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from trainfleet.coordinator.auth import attempt_token
from trainfleet.coordinator.endpoints import HEX64, INT64_MAX, Ctx, Handler, Param, RouteTable
from trainfleet.coordinator.schemas import Body, EpochBody
from trainfleet.errors import BadRequest, Forbidden
from trainfleet.features.ref import SampleRef
from trainfleet.queue.base import JobRecord
from trainfleet.queue.pipelines_base import MAX_BATCH, PipelineCounts, PipelineRecord
from trainfleet.train.recipes import GPTParams

routes = RouteTable()

MAX_ITEMS = MAX_BATCH  # refs, acks or sample ids in one request (the queue's bound)
MAX_RELEASED = 4096  # sample ids a producer reports released in one sync
MAX_BODY_BYTES = 256 * 1024  # 256 refs of a usual store address fit (HttpControl sends 64)
PIPELINE_ROLES = ("producer", "consumer")

SampleId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$")]

PIPELINE_ID = Param("pipeline_id", "the pipeline's id (64 lowercase hex)", pattern=HEX64)
PIPELINE_REF = Param(
    "pipeline",
    "a pipeline's name (its newest pipeline) or id",
    pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$",
    max_length=80,
)


# bodies -----------------------------------------------------------------------------------
class PipelineAttach(Body):
    pipeline_id: str = Field(description="the pipeline's id (64 hex)")
    name: str = Field(description="the pipeline's name")
    role: Literal["producer", "consumer"]
    index: int = Field(description="producer p or consumer k of the pipeline")
    secret: str = Field(description="the pipeline's secret (hex): signs refs, guards the store")
    attempt_token: str = Field(
        description="the job process's credential on the pipeline routes (JOB_ID.EPOCH.MAC)"
    )
    spec: dict[str, Any] = Field(description="the PipelineSpec")
    teacher_model: str | None = Field(
        description="sha256 of the teacher's model.safetensors (GET /v1/market/models/{sha256})"
    )
    teacher_params: dict[str, Any] | None = Field(description="the teacher's GPTParams")


class PublishBody(Body):
    refs: list[SampleRef] = Field(max_length=MAX_ITEMS, description="refs of produced samples")


class Skipped(Body):
    sample_id: str
    reason: str


class PipelinePublished(Body):
    accepted: list[str] = Field(description="sample ids now ready for consumers")
    skipped: list[Skipped] = Field(description="samples not taken (already consumed...)")


class LeaseBody(Body):
    max_samples: int = Field(ge=1, le=MAX_ITEMS, description="at most this many samples")


class PipelineLease(Body):
    samples: list[SampleRef] = Field(description="leased to this attempt, in idx order")
    retire: bool = Field(description="this consumer's index is past the consumer count: stop")
    done: bool = Field(description="every sample of the pipeline was consumed: stop")
    num_consumers: int = Field(description="the pipeline's current consumer count")


class AckItem(Body):
    sample_id: SampleId
    step: int = Field(ge=0, le=INT64_MAX, description="the consumer step that trains on it")


class AckBody(Body):
    acks: list[AckItem] = Field(max_length=MAX_ITEMS)


class AckOutcome(Body):
    sample_id: str
    accepted: bool = Field(description="false: do NOT train on this sample")
    reason: str = ""


class PipelineAcks(Body):
    results: list[AckOutcome]


class ReturnBody(Body):
    sample_ids: list[SampleId] = Field(max_length=MAX_ITEMS)


class PipelineReturned(Body):
    returned: int = Field(description="samples put back to be produced again")


class SyncBody(Body):
    released: list[SampleId] = Field(
        default_factory=list,
        max_length=MAX_RELEASED,
        description="sample ids whose bytes this producer freed since the last sync",
    )


class PipelineSync(Body):
    release: list[SampleRef] = Field(description="consumed samples whose bytes may be freed")
    produce: list[int] = Field(description="sample idx of this producer's share to (re)produce")
    finished: bool = Field(description="nothing left for this producer: exit")


class PipelineSummary(Body):
    pipeline: PipelineRecord = Field(description="the pipeline (a record never holds its secret)")
    counts: PipelineCounts


class PipelineList(Body):
    pipelines: list[PipelineSummary]


class PipelineDetail(PipelineSummary):
    jobs: list[JobRecord] = Field(description="its producer and consumer jobs")


# helpers ----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A queue reply (pydantic model, dataclass, dict) as JSON-ready data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _caller(ctx: Ctx, role: str) -> tuple[str, int]:
    """The attempt's (job id, epoch), if it is a ``role`` job of the path's pipeline."""
    caller = ctx.attempt
    if caller.pipeline_id != ctx.path("pipeline_id"):
        raise Forbidden("this attempt token belongs to another pipeline")
    if caller.role != role:
        raise Forbidden(f"a {caller.role} job does not call this route (a {role}'s)")
    return caller.job.id, caller.epoch


def teacher_params(job: JobRecord) -> dict[str, Any]:
    """The teacher job's model shape (its GPTParams) as JSON."""
    return GPTParams.model_validate(dict(job.spec.hyper)).model_dump(mode="json")


# worker -----------------------------------------------------------------------------------
@routes.route(
    "POST",
    "/v1/jobs/{job_id}/pipeline",
    auth="worker",
    summary="Attach a claimed producer or consumer job to its pipeline: the secret, the"
    " attempt token its process uses, the spec and the teacher model",
    body=EpochBody,
    response=PipelineAttach,
)
async def attach_pipeline(ctx: Ctx) -> PipelineAttach:
    queue = ctx.coord.queue
    epoch = ctx.body.epoch
    job = await ctx.run(queue.check_epoch, ctx.path("job_id"), ctx.worker, epoch)  # fenced
    if job.spec.kind not in PIPELINE_ROLES:
        raise BadRequest(f"job {job.name} is a {job.spec.kind} job, not a pipeline job")
    job, pipeline, secret = await ctx.run(queue.pipeline_attempt, job.id, epoch)
    task = job.spec.pipeline_task
    assert task is not None  # pipeline_attempt refuses any other job
    params = None
    if pipeline.teacher_job:
        params = teacher_params(await ctx.run(queue.get_job, pipeline.teacher_job))
    return PipelineAttach(
        pipeline_id=pipeline.id,
        name=pipeline.name,
        role=job.spec.kind,
        index=task.index,
        secret=secret,
        attempt_token=attempt_token(
            await ctx.run(queue.pipeline_attempt_key, pipeline.id), job.id, epoch
        ),
        spec=pipeline.spec.model_dump(mode="json"),
        teacher_model=pipeline.teacher_model,
        teacher_params=params,
    )


def _attempt_route(
    action: str, summary: str, body: type[Body], response: type[Body]
) -> Callable[[Handler], Handler]:
    """A route of the ref queue, ``POST /v1/pipelines/{pipeline_id}/ACTION``: called by a
    pipeline job's process with its attempt token, bounded to ``MAX_BODY_BYTES``."""
    return routes.route(
        "POST",
        f"/v1/pipelines/{{pipeline_id}}/{action}",
        auth="attempt",
        summary=summary,
        body=body,
        response=response,
        path_params=(PIPELINE_ID,),
        errors=(403,),
        max_body_bytes=MAX_BODY_BYTES,
    )


@_attempt_route(
    "publish",
    "A producer publishes refs of the samples it put in its store",
    PublishBody,
    PipelinePublished,
)
async def publish(ctx: Ctx) -> PipelinePublished:
    job_id, epoch = _caller(ctx, "producer")
    refs = [r.model_dump(mode="json") for r in ctx.body.refs]
    reply = _plain(await ctx.run(ctx.coord.queue.publish_samples, job_id, epoch, refs))
    return PipelinePublished.model_validate(reply)


@_attempt_route(
    "lease",
    "A consumer leases ready samples of its partition (refs only)",
    LeaseBody,
    PipelineLease,
)
async def lease(ctx: Ctx) -> PipelineLease:
    job_id, epoch = _caller(ctx, "consumer")
    queue = ctx.coord.queue
    reply = _plain(await ctx.run(queue.lease_samples, job_id, epoch, ctx.body.max_samples))
    return PipelineLease.model_validate(reply)


@_attempt_route(
    "ack",
    "A consumer acknowledges leased samples at the steps that train on them",
    AckBody,
    PipelineAcks,
)
async def ack(ctx: Ctx) -> PipelineAcks:
    job_id, epoch = _caller(ctx, "consumer")
    acks = [(a.sample_id, a.step) for a in ctx.body.acks]
    results = _plain(await ctx.run(ctx.coord.queue.ack_samples, job_id, epoch, acks))
    return PipelineAcks.model_validate({"results": results})


@_attempt_route(
    "return",
    "A consumer returns leased samples it could not fetch (produced again)",
    ReturnBody,
    PipelineReturned,
)
async def return_samples(ctx: Ctx) -> PipelineReturned:
    job_id, epoch = _caller(ctx, "consumer")
    ids = list(ctx.body.sample_ids)
    returned = await ctx.run(ctx.coord.queue.return_samples, job_id, epoch, ids)
    return PipelineReturned(returned=returned)


@_attempt_route(
    "sync",
    "A producer reports freed samples; the reply lists what to free and produce",
    SyncBody,
    PipelineSync,
)
async def sync(ctx: Ctx) -> PipelineSync:
    job_id, epoch = _caller(ctx, "producer")
    released = list(ctx.body.released)
    reply = _plain(await ctx.run(ctx.coord.queue.producer_sync, job_id, epoch, released))
    return PipelineSync.model_validate(reply)


# operator ---------------------------------------------------------------------------------
@routes.route(
    "GET",
    "/v1/pipelines",
    auth="read",
    summary="List pipelines with their counts",
    response=PipelineList,
)
async def list_pipelines(ctx: Ctx) -> PipelineList:
    queue = ctx.coord.queue
    out = []
    for record in await ctx.run(queue.list_pipelines):
        counts = await ctx.run(queue.pipeline_counts, record.id)
        out.append(PipelineSummary(pipeline=record, counts=counts))
    return PipelineList(pipelines=out)


@routes.route(
    "GET",
    "/v1/pipelines/{pipeline}",
    auth="read",
    summary="One pipeline (by name or id): its counts and its producer and consumer jobs",
    response=PipelineDetail,
    path_params=(PIPELINE_REF,),
)
async def pipeline_detail(ctx: Ctx) -> PipelineDetail:
    queue = ctx.coord.queue
    record = await ctx.run(queue.get_pipeline, ctx.path("pipeline"))
    counts = await ctx.run(queue.pipeline_counts, record.id)
    jobs = await ctx.run(queue.pipeline_jobs, record.id)
    return PipelineDetail(pipeline=record, counts=counts, jobs=jobs)


__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ITEMS",
    "PipelineAttach",
    "PipelineDetail",
    "PipelineList",
    "routes",
]

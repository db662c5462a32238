"""Batch worker endpoints: claim, heartbeat or complete several jobs in one request.

For clients that hold several jobs at once (a referee, a benchmark; a worker registered with
``slots`` > 1): one request and one round trip instead of k. The single-job endpoints stay,
and each item here means exactly what the single-job request would.

- ``POST /v1/claims {"max_jobs": k}`` -> ``{"claims": [...]}``: up to k claims, bounded by the
  worker's free slots (its unacknowledged claims come back first: idempotent).
- ``POST /v1/heartbeats {"beats": [{"job_id", "epoch"}]}`` -> ``{"replies": [...]}``, one per
  beat, through the coordinator's heartbeat book (``coordinator/beats.py``).
- ``POST /v1/completions {"results": [{"job_id", "epoch", "result"}]}`` -> ``{"outcomes":
  [...]}``: each item ``accepted``, ``fenced`` (its epoch is stale: the attempt was written
  off) or ``refused`` (anything else wrong with it), with a ``detail``; one bad item never
  spoils the others.

Each list holds at most ``MAX_ITEMS``; more is a 422 with a JSON body.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from trainfleet.coordinator.beats import BeatReply
from trainfleet.coordinator.completion import check_result, complete_attempt
from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.longpoll import MAX_WAIT_S, claim_waiting
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import ApiError, BadRequest, StaleEpoch
from trainfleet.queue.base import ArtifactRecord, Claim, JobQueue, JobRecord, JobState
from trainfleet.queue.claims import MAX_CLAIMS

routes = RouteTable()

MAX_ITEMS = MAX_CLAIMS  # 64: claims, beats or results in one request
JOB_ID = Field(min_length=1, max_length=256, description="the job's id")
EPOCH = Field(ge=1, description="the claim's fencing epoch")


class TooManyItems(ApiError):
    status_code = 422
    code = "too_many_items"


def _bounded(items: list[Any] | int, what: str) -> None:
    count = items if isinstance(items, int) else len(items)
    if count > MAX_ITEMS:
        raise TooManyItems(
            f"{count} {what} in one request; at most {MAX_ITEMS}", limit=MAX_ITEMS, got=count
        )


class ClaimsBody(Body):
    max_jobs: int = Field(
        1, ge=1, json_schema_extra={"maximum": MAX_ITEMS}, description="claim up to this many"
    )
    wait_s: float = Field(
        0.0, ge=0, le=MAX_WAIT_S, description="wait up to this long for work (long poll)"
    )


class ClaimsResponse(Body):
    claims: list[Claim] = Field(description="empty when there is no work for this worker now")


class BeatItem(Body):
    job_id: str = JOB_ID
    epoch: int = EPOCH


class HeartbeatsBody(Body):
    beats: list[BeatItem] = Field(json_schema_extra={"maxItems": MAX_ITEMS})


class BeatOutcome(Body):
    job_id: str
    outcome: Literal["ok", "fenced", "refused"]
    detail: str = ""
    cancel: bool = Field(False, description="the job was cancelled: stop it")
    state: JobState | None = None
    heartbeat_interval_s: float | None = None
    heartbeat_timeout_s: float | None = None


class HeartbeatsResponse(Body):
    replies: list[BeatOutcome]


class ResultItem(Body):
    job_id: str = JOB_ID
    epoch: int = EPOCH
    result: dict[str, Any] = Field(default_factory=dict)


class CompletionsBody(Body):
    results: list[ResultItem] = Field(json_schema_extra={"maxItems": MAX_ITEMS})


class CompletionOutcome(Body):
    job_id: str
    outcome: Literal["accepted", "fenced", "refused"]
    detail: str = ""
    state: JobState | None = Field(None, description="the job's state after an accepted item")


class CompletionsResponse(Body):
    outcomes: list[CompletionOutcome]


@routes.route(
    "POST",
    "/v1/claims",
    auth="worker",
    summary="Claim up to max_jobs jobs at once (bounded by the worker's slots)",
    body=ClaimsBody,
    response=ClaimsResponse,
    errors=(409, 422),
)
async def claim_batch(ctx: Ctx) -> ClaimsResponse:
    body: ClaimsBody = ctx.body
    _bounded(body.max_jobs, "jobs asked for")

    async def claim_once() -> list[Claim] | None:
        got = await ctx.run_db(ctx.coord.queue.claim_many, ctx.worker, body.max_jobs)
        return got or None

    async def hand_back(got: list[Claim]) -> None:  # the worker hung up during a long poll
        why = "the worker hung up before its claim reached it"
        for c in got:
            await ctx.run_db(ctx.coord.queue.fail, c.job.id, ctx.worker, c.epoch, why, release=True)

    claims = await claim_waiting(ctx, claim_once, hand_back, body.wait_s) or []
    ctx.coord.metrics.claims.inc(len(claims))
    return ClaimsResponse(claims=claims)


@routes.route(
    "POST",
    "/v1/heartbeats",
    auth="worker",
    summary="Heartbeat several claims at once; one reply per beat, in order",
    body=HeartbeatsBody,
    response=HeartbeatsResponse,
    errors=(422,),
)
async def heartbeat_batch(ctx: Ctx) -> HeartbeatsResponse:
    body: HeartbeatsBody = ctx.body
    _bounded(body.beats, "beats")
    replies = []
    for beat in body.beats:
        try:
            got: BeatReply = await ctx.coord.beats.beat(
                beat.job_id, ctx.worker, beat.epoch, ctx.run
            )
        except ApiError as err:
            outcome = "fenced" if isinstance(err, StaleEpoch) else "refused"
            replies.append(BeatOutcome(job_id=beat.job_id, outcome=outcome, detail=str(err)))
            continue
        replies.append(BeatOutcome(job_id=beat.job_id, outcome="ok", **got.model_dump()))
    return HeartbeatsResponse(replies=replies)


@routes.route(
    "POST",
    "/v1/completions",
    auth="worker",
    summary="Complete several attempts at once; each item accepted, fenced or refused",
    body=CompletionsBody,
    response=CompletionsResponse,
    errors=(422,),
)
async def complete_batch(ctx: Ctx) -> CompletionsResponse:
    """Few hops for the whole batch: the results are checked here, every job (and the
    artifacts of those naming one) is read in one writer call, the shard plans are made on
    the threadpool, and the plain jobs complete in ONE transaction (one savepoint per item);
    a replica task is judged and recorded on its own (``completion.complete_attempt``)."""
    body: CompletionsBody = ctx.body
    _bounded(body.results, "results")
    queue = ctx.coord.queue
    items = body.results
    outcomes: dict[int, CompletionOutcome] = {}

    def refuse(i: int, err: ApiError) -> None:
        outcome = "fenced" if isinstance(err, StaleEpoch) else "refused"
        outcomes[i] = CompletionOutcome(job_id=items[i].job_id, outcome=outcome, detail=str(err))

    for i, item in enumerate(items):
        try:
            check_result(item.result)
        except ApiError as err:
            refuse(i, err)
    todo = [i for i in range(len(items)) if i not in outcomes]
    looked = await ctx.run_db(
        _look_up, queue, [(items[i].job_id, "artifact" in items[i].result) for i in todo]
    )
    jobs: dict[int, JobRecord] = {}
    for i, (job, bound) in zip(todo, looked, strict=True):
        if isinstance(job, ApiError):
            refuse(i, job)
            continue
        artifact = items[i].result.get("artifact")
        if bound is not None and not any(
            a.sha256 == artifact and a.epoch == items[i].epoch for a in bound
        ):
            refuse(i, BadRequest(f"result names artifact {artifact!r}, not uploaded by it"))
            continue
        jobs[i] = job
    with_data = [job.id for job in jobs.values() if job.spec.trained_dataset is not None]
    if with_data:
        await ctx.run_io(_plan_shards, queue, with_data)
    plain = [i for i, job in jobs.items() if job.spec.kind != "replica"]
    done = await ctx.run_db(
        queue.complete_many,
        ctx.worker,
        [(jobs[i].id, items[i].epoch, items[i].result) for i in plain],
    )
    finished: dict[int, JobRecord | ApiError] = dict(zip(plain, done, strict=True))
    for i, job in jobs.items():
        if i not in finished:  # a replica: its pseudo-gradient is judged on the threadpool
            try:
                finished[i] = await complete_attempt(ctx, job.id, items[i].epoch, items[i].result)
            except ApiError as err:
                finished[i] = err
    for i, got in finished.items():
        if isinstance(got, ApiError):
            refuse(i, got)
            continue
        ctx.coord.beats.forget(got.id)
        outcomes[i] = CompletionOutcome(job_id=items[i].job_id, outcome="accepted", state=got.state)
    return CompletionsResponse(outcomes=[outcomes[i] for i in range(len(items))])


def _look_up(
    queue: JobQueue, refs: list[tuple[str, bool]]
) -> list[tuple[JobRecord | ApiError, list[ArtifactRecord] | None]]:
    """Each job, and its artifacts where asked; a job not found gives its error."""
    out: list[tuple[JobRecord | ApiError, list[ArtifactRecord] | None]] = []
    for ref, with_artifacts in refs:
        try:
            job = queue.get_job(ref)
        except ApiError as err:
            out.append((err, None))
            continue
        out.append((job, queue.artifacts(job.id) if with_artifacts else None))
    return out


def _plan_shards(queue: JobQueue, job_ids: list[str]) -> None:
    for job_id in job_ids:
        queue.ensure_shard_plan(job_id)


__all__ = ["MAX_ITEMS", "routes"]

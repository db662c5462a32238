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

Each list holds at most ``MAX_ITEMS``; more is a 400 with a JSON body, refused by the body's
model before any item is read.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from pydantic import Field

from trainfleet.coordinator.completion import check_result, complete_attempt
from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.longpoll import MAX_WAIT_S, claim_waiting
from trainfleet.coordinator.routes_worker import claim_with_starts
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import ApiError, StaleEpoch
from trainfleet.queue.base import Claim, JobRecord, JobState
from trainfleet.queue.claims import MAX_CLAIMS
from trainfleet.queue.sqlite import SQLQueue

routes = RouteTable()

MAX_ITEMS = MAX_CLAIMS  # 64: claims, beats or results in one request
JOB_ID = Field(min_length=1, max_length=256, description="the job's id")
EPOCH = Field(ge=1, description="the claim's fencing epoch")


class ClaimsBody(Body):
    max_jobs: int = Field(1, ge=1, le=MAX_ITEMS, description="claim up to this many")
    wait_s: float = Field(
        0.0, ge=0, le=MAX_WAIT_S, description="wait up to this long for work (long poll)"
    )


class ClaimsResponse(Body):
    claims: list[Claim] = Field(description="empty when there is no work for this worker now")


class BeatItem(Body):
    job_id: str = JOB_ID
    epoch: int = EPOCH


class HeartbeatsBody(Body):
    beats: list[BeatItem] = Field(max_length=MAX_ITEMS)  # refused before any item is read


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
    results: list[ResultItem] = Field(max_length=MAX_ITEMS)  # refused before any item is read


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
    settles_beats=False,  # writes or folds the first beats itself
)
async def claim_batch(ctx: Ctx) -> ClaimsResponse:
    body: ClaimsBody = ctx.body

    async def claim_once() -> list[Claim] | None:
        got = await claim_with_starts(ctx, body.max_jobs)
        return got or None

    async def hand_back(got: list[Claim]) -> None:  # the worker hung up during a long poll
        why = "the worker hung up before its claim reached it"
        for c in got:  # each on its own: one already written off does not keep the rest
            with contextlib.suppress(ApiError):
                await ctx.run_db(
                    ctx.coord.queue.fail, c.job.id, ctx.worker, c.epoch, why, release=True
                )

    claims = await claim_waiting(ctx, claim_once, hand_back, body.wait_s) or []
    for c in claims:
        ctx.coord.beats.expect(c.job.id, ctx.worker, c.epoch)  # its beats from memory
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
    settles_beats=False,  # writes or folds the first beats itself
)
async def heartbeat_batch(ctx: Ctx) -> HeartbeatsResponse:
    body: HeartbeatsBody = ctx.body
    replies = []
    items = [(beat.job_id, beat.epoch) for beat in body.beats]
    # The beats the book cannot answer go to the database together: one writer call.
    answers = await ctx.coord.beats.beat_many(ctx.worker, items, ctx.run_db)
    for beat, got in zip(body.beats, answers, strict=True):
        if isinstance(got, ApiError):
            outcome = "fenced" if isinstance(got, StaleEpoch) else "refused"
            replies.append(BeatOutcome(job_id=beat.job_id, outcome=outcome, detail=str(got)))
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
    settles_beats=False,  # writes or folds the first beats itself
)
async def complete_batch(ctx: Ctx) -> CompletionsResponse:
    """Few hops for the whole batch: the results are checked here, and every plain job
    completes in ONE writer call and ONE transaction (one savepoint per item), with the first
    beats the heartbeat book still holds; a job with a dataset or a replica task then goes
    the single completion's way (``completion.complete_attempt``: its slow work runs on the
    threadpool)."""
    body: CompletionsBody = ctx.body
    queue, beats, items = ctx.coord.queue, ctx.coord.beats, body.results
    finished: dict[int, JobRecord | ApiError] = {}
    for i, item in enumerate(items):
        try:
            check_result(item.result)
        except ApiError as err:
            finished[i] = err
    todo = [i for i in range(len(items)) if i not in finished]
    slow = todo
    if isinstance(queue, SQLQueue):
        taken = [beats.take_start(items[i].job_id, ctx.worker, items[i].epoch) for i in todo]
        starts = {b.job_id: b for b in taken if b is not None}
        try:
            done = await ctx.run_hot(
                queue.complete_plain_many,
                ctx.worker,
                [(items[i].job_id, items[i].epoch, items[i].result) for i in todo],
                starts,
            )
        except BaseException:
            for b in starts.values():
                beats.give_back(b)
            raise
        slow = []
        for i, item_done in zip(todo, done, strict=True):
            if isinstance(item_done, ApiError):
                finished[i] = item_done
            elif item_done[1] is not None:
                finished[i] = item_done[1]
            else:
                slow.append(i)
                if items[i].job_id in starts:
                    beats.give_back(starts[items[i].job_id])
    for i in slow:  # a replica task or a job with a dataset (or a queue of another kind)
        try:
            finished[i] = await complete_attempt(
                ctx, items[i].job_id, items[i].epoch, items[i].result
            )
        except ApiError as err:
            finished[i] = err
    outcomes = []
    for i, item in enumerate(items):
        result = finished[i]
        if isinstance(result, ApiError):
            outcome = "fenced" if isinstance(result, StaleEpoch) else "refused"
            outcomes.append(
                CompletionOutcome(job_id=item.job_id, outcome=outcome, detail=str(result))
            )
            continue
        beats.forget(result.id)
        outcomes.append(
            CompletionOutcome(job_id=item.job_id, outcome="accepted", state=result.state)
        )
    return CompletionsResponse(outcomes=outcomes)


__all__ = ["MAX_ITEMS", "routes"]

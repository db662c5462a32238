"""Collaborative-run endpoints: global weights for replicas, and the runs' tables for people.

API (JSON shapes are the pydantic models named; field lists in ``queue.runs_base``):

- ``GET /v1/weights/{sha256}`` (auth ``worker``): the bytes of a run's global weights
  (safetensors, fp32) named by a ``ReplicaTask.weights``; streamed, ``application/octet-stream``.
  404 (JSON) for any digest that is not some run round's start weights, so a worker
  credential cannot read other artifacts through it; 403 unless the worker holds an active
  replica task that starts from them (so a run's placement rules cover its weights). The
  bytes served are counted into the
  round's ``bytes_down``. Content addressed: cache by digest and check the sha256.
- ``GET /v1/runs`` (auth ``read``): ``RunList`` = ``{"runs": [RunRecord]}``, oldest first;
  RunRecord = ``{id, name, state: active|completed|paused|superseded, spec: RunSpec,
  round, num_rounds, weights, weights_size, momentum, in_manifest, created_at, updated_at}``.
- ``GET /v1/runs/{run}`` (auth ``read``; ``run`` = a run id or name, a name meaning its
  newest run): ``RunDetail`` = ``{"run": RunRecord, "rounds": [RoundRecord],
  "contributions": [ContributionRecord], "same_name": [RunRecord]}``; RoundRecord =
  ``{run_id, round, state: open|closed, weights, weights_size, target_s, opened_at,
  quorum_at, closed_at, accepted, refused, late_applied, dropped, heldout_loss, bytes_up,
  bytes_down, next_weights, wall_s, detail}``; ContributionRecord = ``{run_id, round,
  replica, job_id, epoch, worker_id, sha256, size, status: accepted|refused|applied|dropped,
  reason, norm, inner_steps_done, compute_s, staleness, applied_in_round, created_at}``.

A replica task is claimed with the ordinary ``POST /v1/workers/claim``: ``claim.job.spec``
has ``kind = "replica"`` and ``task`` (a ``ReplicaTask``). The worker uploads its
pseudo-gradient with the ordinary artifact upload and completes with ``result =
{"metrics": {...}, "artifact": sha256, "artifact_size": n, "contribution":
{"inner_steps_done": int, "compute_s": float, ...}}`` (``inner_steps_done`` and ``compute_s``
are read from ``contribution``, else from ``metrics``); the reply (the job record) carries
``result.verdict = {"status": "accepted"|"refused"|"dropped", "reason": str, "norm": float}``.
"""

from __future__ import annotations

from pydantic import Field
from starlette.responses import StreamingResponse

from trainfleet.coordinator.endpoints import Ctx, Param, RouteTable
from trainfleet.coordinator.routes_read import stream_blob
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import Forbidden, NotFound
from trainfleet.queue.runs_base import ContributionRecord, RoundRecord, RunRecord

routes = RouteTable()

RUN_REF = Param(
    "run",
    "a run's name (its newest run) or id",
    pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
    max_length=128,
)


class RunList(Body):
    runs: list[RunRecord]


class RunDetail(Body):
    run: RunRecord
    rounds: list[RoundRecord] = Field(description="every round so far, oldest first")
    contributions: list[ContributionRecord] = Field(
        description="every contribution, by (round, replica)"
    )
    same_name: list[RunRecord] = Field(
        default_factory=list, description="older runs of this name (superseded by a reload)"
    )


@routes.route(
    "GET",
    "/v1/weights/{sha256}",
    auth="worker",
    summary="Download a run round's global weights (safetensors) by sha256; only to a worker"
    " holding a replica task that starts from them",
    media_type="application/octet-stream",
)
async def weights(ctx: Ctx) -> StreamingResponse:
    sha = ctx.path("sha256")
    coord = ctx.coord
    where = await ctx.run(coord.queue.weights_round, sha)
    if where is None or not await ctx.run(coord.store.exists, sha):
        raise NotFound(f"no run weights {sha}")
    # Only to a worker that holds a task starting from them: a run's allowed_hosts and CUDA
    # requirements, checked at the claim, cover its weights too.
    if not await ctx.run(coord.queue.holds_weights, ctx.worker, sha):
        raise Forbidden("this worker holds no replica task that starts from these weights")
    await ctx.run(
        coord.queue.add_bytes_down, where[0], where[1], await ctx.run(coord.store.size, sha)
    )
    return await stream_blob(ctx, sha)


@routes.route("GET", "/v1/runs", auth="read", summary="List collaborative runs", response=RunList)
async def list_runs(ctx: Ctx) -> RunList:
    return RunList(runs=await ctx.run(ctx.coord.queue.list_runs))


@routes.route(
    "GET",
    "/v1/runs/{run}",
    auth="read",
    summary="One run (by name or id) with its rounds and contributions",
    response=RunDetail,
    path_params=(RUN_REF,),
)
async def run_detail(ctx: Ctx) -> RunDetail:
    queue = ctx.coord.queue
    run = await ctx.run(queue.get_run, ctx.path("run"))
    rounds = await ctx.run(queue.run_rounds, run.id)
    contributions = await ctx.run(queue.run_contributions, run.id)
    others = [r for r in await ctx.run(queue.list_runs) if r.name == run.name and r.id != run.id]
    return RunDetail(run=run, rounds=rounds, contributions=contributions, same_name=others)


__all__ = ["RunDetail", "RunList", "routes"]

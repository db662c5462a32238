"""Read endpoints (operator token, or none with ``serve --public-reads``): jobs, job detail
with events, logs, explain, workers, status, artifact download."""

from __future__ import annotations

from collections.abc import Iterator

from starlette.responses import StreamingResponse

from trainfleet import __version__
from trainfleet.coordinator.endpoints import INT64_MAX, Ctx, Param, RouteTable
from trainfleet.coordinator.schemas import (
    Body,
    Explanation,
    JobDetail,
    JobList,
    Status,
    WorkerList,
)
from trainfleet.errors import NotFound
from trainfleet.queue.base import JobRecord, LogLine

routes = RouteTable()

STATES = ("waiting", "pending", "claimed", "running", "completed", "failed", "cancelled")
STATE = Param("state", "only jobs in this state", enum=STATES)
AFTER = Param(
    "after", "return lines after this sequence number", "integer", 0, INT64_MAX, default=0
)
LIMIT = Param("limit", "at most this many lines", "integer", 1, 10_000, default=1000)


class LogPage(Body):
    job_id: str
    state: str
    lines: list[LogLine]
    next_after: int


@routes.route("GET", "/v1/status", auth="read", summary="Counts by state", response=Status)
async def status(ctx: Ctx) -> Status:
    queue = ctx.coord.queue
    counts = await ctx.run(queue.counts)
    workers = await ctx.run(queue.list_workers)
    return Status(
        counts=counts,
        workers_online=sum(w.state == "online" for w in workers),
        manifest_hash=await ctx.run(queue.current_manifest_hash),
        version=__version__,
    )


@routes.route(
    "GET",
    "/v1/jobs",
    auth="read",
    summary="List jobs (query: state)",
    response=JobList,
    query=(STATE,),
)
async def list_jobs(ctx: Ctx) -> JobList:
    state = ctx.query_str("state")
    return JobList(jobs=await ctx.run(ctx.coord.queue.list_jobs, state))


async def _job(ctx: Ctx) -> JobRecord:
    return await ctx.run(ctx.coord.queue.get_job, ctx.path("job_id"))


@routes.route(
    "GET",
    "/v1/jobs/{job_id}",
    auth="read",
    summary="One job (by id, id prefix or name) with its events and artifacts",
    response=JobDetail,
)
async def job_detail(ctx: Ctx) -> JobDetail:
    job = await _job(ctx)
    events = await ctx.run(ctx.coord.queue.events, job.id)
    artifacts = await ctx.run(ctx.coord.queue.artifacts, job.id)
    same_name = await ctx.run(ctx.coord.queue.same_name, job.id)
    return JobDetail(job=job, events=events, artifacts=artifacts, same_name=same_name)


@routes.route(
    "GET",
    "/v1/jobs/{job_id}/logs",
    auth="read",
    summary="Log lines after a sequence number (query: after, limit)",
    response=LogPage,
    query=(AFTER, LIMIT),
)
async def job_logs(ctx: Ctx) -> LogPage:
    after, limit = ctx.query_int("after"), ctx.query_int("limit")
    job = await _job(ctx)
    lines = await ctx.run(ctx.coord.queue.logs, job.id, after, limit)
    return LogPage(
        job_id=job.id, state=job.state, lines=lines, next_after=lines[-1].seq if lines else after
    )


@routes.route(
    "GET",
    "/v1/jobs/{job_id}/explain",
    auth="read",
    summary="Why a job is or is not running",
    response=Explanation,
)
async def explain(ctx: Ctx) -> Explanation:
    return Explanation(**await ctx.run(ctx.coord.queue.explain, ctx.path("job_id")))


@routes.route("GET", "/v1/workers", auth="read", summary="All workers", response=WorkerList)
async def workers(ctx: Ctx) -> WorkerList:
    return WorkerList(workers=await ctx.run(ctx.coord.queue.list_workers))


@routes.route(
    "GET",
    "/v1/artifacts/{sha256}",
    auth="read",
    summary="Download an artifact's bytes",
    media_type="application/octet-stream",
)
async def download(ctx: Ctx) -> StreamingResponse:
    sha = ctx.path("sha256")  # checked against its declaration (endpoints.SHA256)
    if not await ctx.run(ctx.coord.store.exists, sha):
        raise NotFound(f"no artifact {sha}")
    return await stream_blob(ctx, sha)


async def stream_blob(ctx: Ctx, sha: str) -> StreamingResponse:
    """A stored blob's bytes, streamed in 1 MiB chunks, with its Content-Length."""
    store = ctx.coord.store
    size = await ctx.run(store.size, sha)
    handle = await ctx.run(store.open, sha)

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"content-length": str(size)}
    )

"""Worker endpoints: register, claim, heartbeat, log, upload, complete, fail, deregister.

Every write after a claim names the claim's epoch; the queue refuses a stale one with 409.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect

from trainfleet.artifacts import IngestBuffer, check_digest
from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.schemas import (
    ClaimResponse,
    CompleteBody,
    Count,
    EpochBody,
    FailBody,
    LogBody,
    RegisterRequest,
    RegisterResponse,
)
from trainfleet.errors import BadRequest, IntegrityError
from trainfleet.queue.base import ArtifactRecord, HeartbeatReply, JobRecord

routes = RouteTable()


@routes.route(
    "POST",
    "/v1/workers/register",
    auth="join",
    summary="Register a worker; returns its credential and effective capability",
    body=RegisterRequest,
    response=RegisterResponse,
)
async def register(ctx: Ctx) -> RegisterResponse:
    body: RegisterRequest = ctx.body
    worker, token = await ctx.run(ctx.coord.queue.register_worker, body.capability)
    return RegisterResponse(
        worker_id=worker.id,
        token=token,
        effective=worker.effective,
        notes=worker.notes,
        heartbeat_interval_s=ctx.coord.heartbeat_interval_s,
        heartbeat_timeout_s=ctx.coord.queue.settings.heartbeat_timeout_s,
    )


@routes.route("POST", "/v1/workers/deregister", auth="worker", summary="Leave the fleet")
async def deregister(ctx: Ctx) -> None:
    await ctx.run(ctx.coord.queue.deregister_worker, ctx.worker)


@routes.route(
    "POST",
    "/v1/workers/claim",
    auth="worker",
    summary="Claim the best job this worker may run (claim is null when there is none)",
    response=ClaimResponse,
)
async def claim(ctx: Ctx) -> ClaimResponse:
    got = await ctx.run(ctx.coord.queue.claim, ctx.worker)
    if got is not None:
        ctx.coord.metrics.claims.inc()
    return ClaimResponse(claim=got)


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/heartbeat",
    auth="worker",
    summary="Keep a claim alive; the reply says whether the job was cancelled",
    body=EpochBody,
    response=HeartbeatReply,
)
async def heartbeat(ctx: Ctx) -> HeartbeatReply:
    return await ctx.run(ctx.coord.queue.heartbeat, ctx.path("job_id"), ctx.worker, ctx.body.epoch)


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/logs",
    auth="worker",
    summary="Append output lines of the running attempt",
    body=LogBody,
    response=Count,
)
async def append_log(ctx: Ctx) -> Count:
    body: LogBody = ctx.body
    n = await ctx.run(
        ctx.coord.queue.append_log, ctx.path("job_id"), ctx.worker, body.epoch, body.lines
    )
    return Count(count=n)


@routes.route(
    "PUT",
    "/v1/jobs/{job_id}/artifacts/{sha256}",
    auth="worker",
    summary="Upload an artifact (query: epoch, size, name); verified against its sha256",
    response=ArtifactRecord,
    raw_body="application/octet-stream",
)
async def upload(ctx: Ctx) -> ArtifactRecord:
    coord, job_id = ctx.coord, ctx.path("job_id")
    sha256 = check_digest(ctx.path("sha256"))
    epoch, size = ctx.query_int("epoch", 0), ctx.query_int("size", -1)
    if epoch < 1:
        raise BadRequest("query parameter 'epoch' (the claim's fencing epoch) is required")
    name = ctx.request.query_params.get("name", "outputs.tar.zst")
    if size < 0:
        raise BadRequest("query parameter 'size' (the artifact's length in bytes) is required")
    if size > coord.max_upload_bytes:
        raise BadRequest(f"artifact of {size} bytes exceeds the {coord.max_upload_bytes} limit")
    # Refuse a stale claim before reading a possibly large body.
    await ctx.run(coord.queue.check_epoch, job_id, ctx.worker, epoch)
    with IngestBuffer(coord.staging_dir, max_bytes=size) as buf:
        try:
            async for chunk in ctx.request.stream():
                buf.write(chunk)
        except ClientDisconnect:
            raise IntegrityError(
                f"upload interrupted after {buf.size} of {size} bytes; nothing was stored"
            ) from None
        buf.close()
        await ctx.run(coord.store.commit_file, buf.path, sha256, size)
    record = await ctx.run(
        coord.queue.record_artifact, job_id, ctx.worker, epoch, sha256, size, name
    )
    coord.metrics.upload_bytes.inc(size)
    return record


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/complete",
    auth="worker",
    summary="Complete the attempt with its result; result.artifact must be uploaded first",
    body=CompleteBody,
    response=JobRecord,
)
async def complete(ctx: Ctx) -> JobRecord:
    body: CompleteBody = ctx.body
    job_id, queue = ctx.path("job_id"), ctx.coord.queue
    artifact = body.result.get("artifact")
    if artifact is not None:
        bound = await ctx.run(queue.artifacts, job_id)
        if not any(a.sha256 == artifact and a.epoch == body.epoch for a in bound):
            raise BadRequest(f"result names artifact {artifact!r}, not uploaded by this attempt")
    return await ctx.run(queue.complete, job_id, ctx.worker, body.epoch, body.result)


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/fail",
    auth="worker",
    summary="Fail the attempt (retried while attempts remain) or hand it back (release)",
    body=FailBody,
    response=JobRecord,
)
async def fail(ctx: Ctx) -> JobRecord:
    body: FailBody = ctx.body
    return await ctx.run(
        ctx.coord.queue.fail,
        ctx.path("job_id"),
        ctx.worker,
        body.epoch,
        body.error,
        retryable=body.retryable,
        release=body.release,
    )


__all__ = ["routes"]

"""Worker endpoints: register, claim, heartbeat, log, upload, complete, fail, deregister.

Every write after a claim names the claim's epoch; the queue refuses a stale one with 409.
"""

from __future__ import annotations

import errno

from starlette.requests import ClientDisconnect

from trainfleet.artifacts import IngestBuffer, space
from trainfleet.coordinator.auth import register_caller
from trainfleet.coordinator.beats import BeatReply
from trainfleet.coordinator.completion import MAX_RESULT_BYTES, complete_attempt
from trainfleet.coordinator.endpoints import INT64_MAX, MAX_JSON_BYTES, Ctx, Param, RouteTable
from trainfleet.coordinator.longpoll import ClaimWait, claim_waiting
from trainfleet.coordinator.schemas import (
    Body,
    ClaimResponse,
    CompleteBody,
    Count,
    EpochBody,
    FailBody,
    LogBody,
    RegisterRequest,
    RegisterResponse,
)
from trainfleet.coordinator.state import Coordinator
from trainfleet.errors import (
    ApiError,
    Conflict,
    InsufficientStorage,
    IntegrityError,
    PayloadTooLarge,
)
from trainfleet.queue.base import ArtifactRecord, Claim, JobRecord
from trainfleet.queue.sqlite import SQLQueue
from trainfleet.queue.sqlite_attempts import MAX_LOG_LINE_CHARS

routes = RouteTable()


def _max_length(model: type[Body], field: str) -> int:
    metadata = model.model_fields[field].metadata
    return int(next(m.max_length for m in metadata if hasattr(m, "max_length")))


MAX_ARTIFACTS_PER_ATTEMPT = 4  # the worker uploads one archive per attempt

# What a worker may send per request, told at registration so it chunks and cuts to fit.
WORKER_LIMITS = {
    "max_result_bytes": MAX_RESULT_BYTES,
    "max_log_lines": _max_length(LogBody, "lines"),
    "max_log_line_chars": MAX_LOG_LINE_CHARS,
    "max_error_chars": _max_length(FailBody, "error"),
    "max_json_bytes": MAX_JSON_BYTES,
}


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
    worker, token = await register_caller(ctx.request, ctx.coord, body.capability)
    if body.slots != 1:  # a batch client (referee, benchmark) holding several jobs at once
        await ctx.run(ctx.coord.queue.set_worker_slots, worker.id, body.slots)
    return RegisterResponse(
        worker_id=worker.id,
        token=token,
        effective=worker.effective,
        notes=worker.notes,
        heartbeat_interval_s=ctx.coord.heartbeat_interval_s,
        heartbeat_timeout_s=ctx.coord.queue.settings.heartbeat_timeout_s,
        limits=WORKER_LIMITS,
    )


@routes.route("POST", "/v1/workers/deregister", auth="worker", summary="Leave the fleet")
async def deregister(ctx: Ctx) -> None:
    await ctx.run(ctx.coord.queue.deregister_worker, ctx.worker)
    ctx.coord.tokens.clear()  # its credential is refused from the next request on


@routes.route(
    "POST",
    "/v1/workers/claim",
    auth="worker",
    summary="Claim the best job this worker may run (claim is null when there is none);"
    " with wait_s, wait up to that long for work (long poll)",
    body=ClaimWait,
    response=ClaimResponse,
    links={
        name: {
            "operationId": op,
            "parameters": {"job_id": "$response.body#/claim/job/id"},
            "description": text,
        }
        for name, op, text in (
            ("ClaimedJob", "job_detail", "the claimed job, its events and artifacts"),
            ("Heartbeat", "heartbeat", "keep the claim alive (with claim.epoch)"),
            ("Complete", "complete", "report the attempt's result (with claim.epoch)"),
            ("Fail", "fail", "fail or hand back the attempt (with claim.epoch)"),
        )
    },
    settles_beats=False,  # writes or folds the first beats itself
)
async def claim(ctx: Ctx) -> ClaimResponse:
    async def claim_once() -> Claim | None:
        got = await claim_with_starts(ctx, 1)
        return got[0] if got else None

    async def hand_back(got: Claim) -> JobRecord:  # the worker hung up during a long poll
        why = "the worker hung up before its claim reached it"
        return await ctx.run(
            ctx.coord.queue.fail, got.job.id, ctx.worker, got.epoch, why, release=True
        )

    got = await claim_waiting(ctx, claim_once, hand_back, ctx.body.wait_s)
    if got is not None:
        ctx.coord.beats.expect(got.job.id, ctx.worker, got.epoch)  # its beats from memory
        ctx.coord.metrics.claims.inc()
    return ClaimResponse(claim=got)


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/heartbeat",
    auth="worker",
    summary="Keep a claim alive; the reply says whether the job was cancelled, and the"
    " heartbeat interval and lease to keep",
    body=EpochBody,
    response=BeatReply,
    settles_beats=False,  # writes or folds the first beats itself
)
async def heartbeat(ctx: Ctx) -> BeatReply:
    """Answered from the coordinator's heartbeat book, written in batches (``beats``)."""
    return await ctx.coord.beats.beat(ctx.path("job_id"), ctx.worker, ctx.body.epoch, ctx.run)


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


EPOCH = Param("epoch", "the claim's fencing epoch", "integer", 1, INT64_MAX, required=True)
SIZE = Param("size", "the artifact's length in bytes", "integer", 0, INT64_MAX, required=True)
NAME = Param(
    "name",
    "the artifact's file name (printable: no '/', '\\', control or bidi-override characters)",
    pattern=r"^[^/\\\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]{1,200}$",
    default="outputs.tar.zst",
)


@routes.route(
    "PUT",
    "/v1/jobs/{job_id}/artifacts/{sha256}",
    auth="worker",
    summary="Upload an artifact (query: epoch, size, name); verified against its sha256",
    response=ArtifactRecord,
    raw_body="application/octet-stream",
    query=(EPOCH, SIZE, NAME),
)
async def upload(ctx: Ctx) -> ArtifactRecord:
    """Stream the body into staging, counted against the declared size and hashed as it
    arrives; store it (a rename) and bind it to the attempt. A stale epoch found at binding
    time removes the bytes again unless another record binds the same digest or another
    upload of it (pinned) is still storing or binding it."""
    coord, job_id = ctx.coord, ctx.path("job_id")
    sha256 = ctx.path("sha256")  # checked against its declaration (endpoints.SHA256)
    epoch, size = ctx.query_int("epoch"), ctx.query_int("size")
    name = ctx.query_str("name") or NAME.default
    assert isinstance(name, str)
    if size > coord.max_upload_bytes:
        raise PayloadTooLarge(
            f"artifact of {size} bytes exceeds the {coord.max_upload_bytes}-byte upload limit",
            limit_bytes=coord.max_upload_bytes,
        )
    declared = ctx.request.headers.get("content-length")
    if declared is not None and declared.strip() != str(size):
        raise IntegrityError(
            f"the body's Content-Length {declared[:40]!r} is not the declared size {size}",
            expected_size=size,
        )
    # Refuse a stale claim, or one over its artifact quota, before reading a large body.
    await ctx.run(coord.queue.check_epoch, job_id, ctx.worker, epoch)
    _check_quota(await ctx.run(coord.queue.artifacts, job_id), epoch, sha256, size, coord)
    refused: ApiError | None = None
    with coord.store.pinned(sha256):  # no fenced twin nor the GC deletes it before we bind
        stored = await _stream_and_store(ctx, sha256, size)
        try:
            record = await ctx.run(
                coord.queue.record_artifact, job_id, ctx.worker, epoch, sha256, size, name
            )
        except ApiError as err:
            refused = err
    if refused is not None:
        if stored:  # kept while another upload of the same bytes is binding them
            await ctx.run(coord.store.delete_unbound, sha256, coord.queue.is_bound)
        raise refused
    coord.metrics.upload_bytes.inc(size)
    return record


def _check_quota(
    records: list[ArtifactRecord], epoch: int, sha256: str, size: int, coord: Coordinator
) -> None:
    """An attempt uploads one archive (again, with the same digest, when a reply was lost):
    refuse more than ``MAX_ARTIFACTS_PER_ATTEMPT`` distinct ones, or more bytes in all than
    one upload may have, so a worker holding a claim cannot fill the coordinator's disk."""
    mine = [r for r in records if r.epoch == epoch]
    if any(r.sha256 == sha256 for r in mine):
        return  # the same upload again: idempotent
    if len(mine) >= MAX_ARTIFACTS_PER_ATTEMPT:
        raise Conflict(
            f"this attempt already uploaded {len(mine)} artifacts; at most"
            f" {MAX_ARTIFACTS_PER_ATTEMPT} are kept per attempt"
        )
    used = sum(r.size for r in mine)
    if used + size > coord.max_upload_bytes:
        raise PayloadTooLarge(
            f"this attempt's artifacts would total {used + size} bytes, over the"
            f" {coord.max_upload_bytes}-byte limit of one attempt",
            limit_bytes=coord.max_upload_bytes,
        )


async def _stream_and_store(ctx: Ctx, sha256: str, size: int) -> bool:
    """Stream the body into staging and commit it; whether the bytes were newly stored."""
    coord = ctx.coord
    try:
        with (
            space.reserve(coord.staging_dir, size),
            IngestBuffer(coord.staging_dir, max_bytes=size) as buf,
        ):
            try:
                async for chunk in ctx.request.stream():
                    buf.write(chunk)  # IntegrityError as soon as it passes the declared size
            except ClientDisconnect:
                raise IntegrityError(
                    f"upload interrupted after {buf.size} of {size} bytes; nothing was stored"
                ) from None
            stored: bool = await ctx.run(coord.store.commit_ingested, buf, sha256, size)
            return stored
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise InsufficientStorage(
            f"the coordinator's artifact storage is full ({err.strerror}); nothing was stored,"
            " retry later"
        ) from None


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/complete",
    auth="worker",
    summary="Complete the attempt with its result; result.artifact must be uploaded first",
    body=CompleteBody,
    response=JobRecord,
    settles_beats=False,  # writes or folds the first beats itself
)
async def complete(ctx: Ctx) -> JobRecord:
    body: CompleteBody = ctx.body
    return await complete_attempt(ctx, ctx.path("job_id"), body.epoch, body.result)


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
    job = await ctx.run(
        ctx.coord.queue.fail,
        ctx.path("job_id"),
        ctx.worker,
        body.epoch,
        body.error,
        retryable=body.retryable,
        release=body.release,
    )
    ctx.coord.beats.forget(job.id)
    if job.state == "pending":
        ctx.coord.work.notify()  # wake long-poll claims: it can run elsewhere
    return job


async def claim_with_starts(ctx: Ctx, max_jobs: int) -> list[Claim]:
    """Up to ``max_jobs`` claims for the caller. Its first beats still in the heartbeat book
    are written in the claim's own transaction first: a claim asked again then redelivers
    only the claims the worker never heartbeat, as when each first beat was written at once."""
    queue, beats = ctx.coord.queue, ctx.coord.beats
    if not isinstance(queue, SQLQueue):
        return await ctx.run_db(queue.claim_many, ctx.worker, max_jobs)
    starts = beats.take_starts(ctx.worker)
    try:
        return await ctx.run_hot(queue.claim_many, ctx.worker, max_jobs, starts=starts)
    except BaseException:
        for beat in starts:
            beats.give_back(beat)
        raise


__all__ = ["claim_with_starts", "routes"]

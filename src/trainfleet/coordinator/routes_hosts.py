"""Fleet identity endpoints (operator token): enroll, rotate and revoke hosts, revoke workers.

A host's join token is returned once, by ``enroll`` or ``rotate``, and only its hash is kept.
A revoke takes effect on the revoked worker's next request (401) and requeues its active job
in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from trainfleet.capability.model import ASSIGNED_HOST_PATTERN, HOST_NAME_PATTERN
from trainfleet.coordinator.endpoints import Ctx, Param, RouteTable
from trainfleet.coordinator.schemas import Body
from trainfleet.queue.base import HostRecord, JobRecord

routes = RouteTable()

NEW_HOST = Param(
    "name",
    "a host name: 1-63 of letters, digits, '.', '_', '-'; starts alphanumeric",
    pattern=HOST_NAME_PATTERN,
)
HOST = Param(
    "name",
    "a host: an enrolled name, or open:NAME for a host that joined in open mode",
    pattern=ASSIGNED_HOST_PATTERN,
)
WORKER = Param("worker_id", "a worker id, as `trainfleet workers` lists it")


class HostToken(Body):
    host: str
    token: str = Field(description="the host's join token; shown once, never stored in clear")


class Rotated(HostToken):
    requeued: list[JobRecord] = Field(
        description="active jobs put back to pending (with revoke_workers; else none)"
    )


class RotateBody(Body):
    revoke_workers: bool = Field(
        False, description="also revoke the host's running workers (default: they keep going)"
    )


class Revoked(Body):
    revoked: str = Field(description="the host or worker revoked")
    requeued: list[JobRecord] = Field(description="active jobs put back to pending")


class HostList(Body):
    hosts: list[HostRecord]


@routes.route("GET", "/v1/hosts", auth="operator", summary="Enrolled hosts", response=HostList)
async def list_hosts(ctx: Ctx) -> HostList:
    return HostList(hosts=await ctx.run(ctx.coord.queue.list_hosts))


@routes.route(
    "POST",
    "/v1/hosts/{name}/enroll",
    auth="operator",
    path_params=(NEW_HOST,),
    summary="Enroll a host: returns a join token bound to its name (shown once)",
    response=HostToken,
)
async def enroll(ctx: Ctx) -> HostToken:
    name = ctx.path("name")
    return HostToken(host=name, token=await ctx.run(ctx.coord.queue.enroll_host, name))


@routes.route(
    "POST",
    "/v1/hosts/{name}/rotate",
    auth="operator",
    path_params=(NEW_HOST,),
    summary="Issue a new join token for a host; the old one stops working at once",
    body=RotateBody,
    response=Rotated,
)
async def rotate(ctx: Ctx) -> Rotated:
    name, body = ctx.path("name"), ctx.body
    token, requeued = await ctx.run(
        ctx.coord.queue.rotate_host, name, revoke_workers=body.revoke_workers
    )
    _forget(ctx, requeued)
    ctx.coord.metrics.requeues.inc(len(requeued))
    return Rotated(host=name, token=token, requeued=requeued)


@routes.route(
    "POST",
    "/v1/hosts/{name}/revoke",
    auth="operator",
    path_params=(HOST,),
    summary="Revoke a host: its join token and every worker of it; requeues their jobs",
    response=Revoked,
)
async def revoke_host(ctx: Ctx) -> Revoked:
    return await _revoke(ctx, ctx.coord.queue.revoke_host, ctx.path("name"))


@routes.route(
    "POST",
    "/v1/workers/{worker_id}/revoke",
    auth="operator",
    path_params=(WORKER,),
    summary="Revoke one worker's credential; requeues its active job",
    response=Revoked,
)
async def revoke_worker(ctx: Ctx) -> Revoked:
    return await _revoke(ctx, ctx.coord.queue.revoke_worker, ctx.path("worker_id"))


async def _revoke(ctx: Ctx, revoke: Callable[[str], list[JobRecord]], target: str) -> Revoked:
    """Revoke ``target`` (a host or a worker id) and count the jobs it put back to pending."""
    requeued = await ctx.run(revoke, target)
    _forget(ctx, requeued)
    ctx.coord.metrics.requeues.inc(len(requeued))
    return Revoked(revoked=target, requeued=requeued)


def _forget(ctx: Ctx, requeued: list[JobRecord]) -> None:
    """Drop the credentials cached in memory (the next request is refused) and the requeued
    attempts' heartbeats; wake long-poll claims for the requeued jobs."""
    ctx.coord.tokens.clear()
    for job in requeued:
        ctx.coord.beats.forget(job.id)
    if requeued:
        ctx.coord.work.notify()

"""Operator endpoints (operator token): reload the manifest, cancel, requeue."""

from __future__ import annotations

from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.schemas import ManifestBody
from trainfleet.errors import BadRequest, ManifestError
from trainfleet.manifest import parse_manifest
from trainfleet.queue.base import JobRecord, ReloadPlan

routes = RouteTable()


@routes.route(
    "POST",
    "/v1/manifest",
    auth="operator",
    summary="Load a manifest: add new jobs, update scheduling, mark removed (dry_run: plan only)",
    body=ManifestBody,
    response=ReloadPlan,
)
async def reload(ctx: Ctx) -> ReloadPlan:
    body: ManifestBody = ctx.body
    try:
        manifest = parse_manifest(body.text, body.path)
    except ManifestError as err:
        raise BadRequest(f"invalid manifest {body.path}", problems=err.problems) from None
    return await ctx.run(ctx.coord.queue.apply_manifest, manifest, dry_run=body.dry_run)


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/cancel",
    auth="operator",
    summary="Cancel a job; its worker sees it at the next heartbeat",
    response=JobRecord,
)
async def cancel(ctx: Ctx) -> JobRecord:
    return await ctx.run(ctx.coord.queue.cancel, ctx.path("job_id"))


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/requeue",
    auth="operator",
    summary="Put a job back to pending (fencing off any worker still running it)",
    response=JobRecord,
)
async def requeue(ctx: Ctx) -> JobRecord:
    return await ctx.run(ctx.coord.queue.requeue, ctx.path("job_id"))

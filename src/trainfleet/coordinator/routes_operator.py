"""Operator endpoints (operator token): reload the manifest, cancel, requeue."""

from __future__ import annotations

import tomllib

from trainfleet.coordinator.bodies import check_toml_depth
from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.schemas import ManifestBody
from trainfleet.errors import BadRequest, ManifestError
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.load import MAX_DEPTH, nested_too_deep
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
    await ctx.run(_check_nesting, body.text, body.path)
    try:
        manifest = parse_manifest(body.text, body.path)
    except ManifestError as err:
        raise BadRequest(f"invalid manifest {body.path}", problems=err.problems) from None
    return await ctx.run(ctx.coord.queue.apply_manifest, manifest, dry_run=body.dry_run)


def _check_nesting(text: str, path: str) -> None:
    """Refuse a manifest nested deeper than the loader's ``MAX_DEPTH`` before the recursive
    parts of parsing see it: brackets by a scan (tomllib recurses per level), dotted keys
    (``a.b.c...``, built without recursion) on the parsed tree, by the loader's own rule."""
    check_toml_depth(text, f"manifest {path}", MAX_DEPTH)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # parse_manifest reports it, with its line
    except RecursionError:
        raise BadRequest(f"manifest {path} nests deeper than {MAX_DEPTH} levels") from None
    if nested_too_deep(data):
        raise BadRequest(f"manifest {path} nests deeper than {MAX_DEPTH} levels")


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

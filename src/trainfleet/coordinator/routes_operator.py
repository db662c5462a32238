"""Operator endpoints (operator token): reload the manifest, cancel, requeue."""

from __future__ import annotations

from trainfleet.coordinator.bodies import check_toml_depth
from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.schemas import ManifestBody
from trainfleet.errors import BadRequest, ManifestError, ManifestTooDeep
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.load import MAX_DEPTH
from trainfleet.manifest.spec import Manifest
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
    manifest = await ctx.run(_parse, body.text, body.path)
    plan = await ctx.run(ctx.coord.queue.apply_manifest, manifest, dry_run=body.dry_run)
    if not body.dry_run:
        ctx.coord.work.notify()  # wake long-poll claims (coordinator.longpoll)
    return plan


def _parse(text: str, path: str) -> Manifest:
    """The manifest, parsed off the event loop. One nested deeper than the loader's
    ``MAX_DEPTH`` is refused by a bracket scan before tomllib (which recurses per level)
    sees it, and otherwise by the loader's own rule on the parsed tree (dotted keys)."""
    check_toml_depth(text, f"manifest {path}", MAX_DEPTH)
    try:
        # ``after`` may name submitted jobs: the queue checks those (queue.deps.check_reload).
        return parse_manifest(text, path, external_after=True)
    except ManifestTooDeep:
        raise BadRequest(f"manifest {path} nests deeper than {MAX_DEPTH} levels") from None
    except ManifestError as err:
        raise BadRequest(f"invalid manifest {path}", problems=err.problems) from None


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/cancel",
    auth="operator",
    summary="Cancel a job; its worker sees it at the next heartbeat",
    response=JobRecord,
)
async def cancel(ctx: Ctx) -> JobRecord:
    job = await ctx.run(ctx.coord.queue.cancel, ctx.path("job_id"))
    ctx.coord.beats.forget(job.id)  # its next heartbeat reads the cancel (coordinator.beats)
    return job


@routes.route(
    "POST",
    "/v1/jobs/{job_id}/requeue",
    auth="operator",
    summary="Put a job back to pending (fencing off any worker still running it)",
    response=JobRecord,
)
async def requeue(ctx: Ctx) -> JobRecord:
    job = await ctx.run(ctx.coord.queue.requeue, ctx.path("job_id"))
    ctx.coord.beats.forget(job.id)  # the old claim's next heartbeat is fenced
    ctx.coord.work.notify()
    return job

"""``GET /v1/fair-share`` (read auth): every submitter's decayed usage, share, fair-share
factor and level, and its pending, waiting and running jobs (``queue.fairshare``)."""

from __future__ import annotations

from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.queue.fairshare import FairShareReport

routes = RouteTable()


@routes.route(
    "GET",
    "/v1/fair-share",
    auth="read",
    summary="Fair share: each submitter's recent use, share, factor and level",
    response=FairShareReport,
)
async def fair_share(ctx: Ctx) -> FairShareReport:
    return await ctx.run(ctx.coord.queue.fair_share)

"""Data-plane endpoints: publish a document router (operator), fetch it (workers).

The coordinator stores routers; it does not vouch for them. A worker started with
``--verify-routing`` re-fits the router from the dataset spec and refuses one that differs.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.schemas import RouterBody
from trainfleet.data.router import Router as DocumentRouter
from trainfleet.errors import BadRequest, RoutingMismatch
from trainfleet.queue.base import RouterRecord

routes = RouteTable()


@routes.route(
    "PUT",
    "/v1/routers/{fit_id}",
    auth="operator",
    summary="Publish the document router workers are handed for a dataset (by its fit id)",
    body=RouterBody,
    response=RouterRecord,
)
async def publish_router(ctx: Ctx) -> RouterRecord:
    body: RouterBody = ctx.body
    fit_id = ctx.path("fit_id")
    try:
        parsed = DocumentRouter.from_json(body.router)
    except RoutingMismatch as err:
        raise BadRequest(f"not a valid router: {err}") from None
    if parsed.fit_id != fit_id:
        raise BadRequest(f"the router's fit_id {parsed.fit_id} does not match the path {fit_id}")
    return await ctx.run(ctx.coord.queue.publish_router, fit_id, parsed.digest, body.router)


@routes.route(
    "GET",
    "/v1/routers/{fit_id}",
    auth="reader",
    summary="The published router for a fit id (a worker credential or the operator token)",
)
async def get_router(ctx: Ctx) -> JSONResponse:
    return JSONResponse(await ctx.run(ctx.coord.queue.get_router, ctx.path("fit_id")))

"""Build the coordinator's ASGI app: routes, JSON errors, OpenAPI, metrics and the reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from trainfleet import __version__
from trainfleet.coordinator import routes_data, routes_operator, routes_read, routes_worker
from trainfleet.coordinator.endpoints import Ctx, RouteTable
from trainfleet.coordinator.state import Coordinator

log = logging.getLogger(__name__)


def api_routes() -> RouteTable:
    table = RouteTable()
    for module in (routes_worker, routes_operator, routes_read, routes_data):
        table.include(module.routes)
    return table


async def _reap_forever(coord: Coordinator) -> None:
    """Requeue lost attempts within ``heartbeat_timeout_s + reap_interval_s`` of the last beat."""
    while True:
        await asyncio.sleep(coord.reap_interval_s)
        try:
            reaped = await run_in_threadpool(coord.queue.reap)
        except Exception:
            log.exception("reaper pass failed; retrying")
            continue
        for job in reaped:
            coord.metrics.requeues.inc()
            log.warning("job %s (%s) lost its worker: now %s", job.name, job.id[:12], job.state)


def create_app(coord: Coordinator) -> Starlette:
    table = api_routes()
    # Declared through the route table too, so the OpenAPI document lists every served path.
    service = RouteTable()

    @service.route("GET", "/openapi.json", auth="none", summary="This OpenAPI 3.1 document")
    async def openapi(_: Ctx) -> Response:
        return JSONResponse(spec)

    @service.route("GET", "/health", auth="none", summary="Liveness and the coordinator version")
    async def health(_: Ctx) -> Response:
        return JSONResponse({"ok": True, "version": __version__})

    @service.route("GET", "/metrics", auth="none", summary="Prometheus metrics (text format)")
    async def metrics(ctx: Ctx) -> Response:
        body = await ctx.run(coord.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4")

    table.include(service)
    spec = table.openapi(__version__)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "message": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,  # e.g. the Allow header a 405 must carry
        )

    async def server_error(_: Request, exc: Exception) -> Response:
        log.error("internal error", exc_info=exc)
        return JSONResponse(
            {"error": "internal", "message": "internal error; see the coordinator log"},
            status_code=500,
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        renewed = await run_in_threadpool(coord.queue.renew_leases)
        if renewed:
            log.info("resuming: %d active job(s) get a fresh heartbeat deadline", renewed)
        reaper = asyncio.create_task(_reap_forever(coord))
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper

    app = Starlette(
        routes=table.starlette_routes(coord),
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.coordinator = coord
    return app

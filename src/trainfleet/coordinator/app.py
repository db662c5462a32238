"""Build the coordinator's ASGI app: routes, JSON errors, OpenAPI, metrics, and the tasks its
lifespan runs: the heartbeat flusher (``beats``), the reaper, the artifact GC and the round
driver of collaborative runs (``rounds``), the market's (``market``) and the pipelines'
(``pipelines``). The reaper flushes the heartbeat book before each
pass, so it never misses a beat that arrived, and it restarts every active lease after a
wall-clock step, so that a step neither requeues running jobs nor keeps lost ones (the rule:
``clock_steps``). A reaped job wakes the long-poll claims (``longpoll``). On a PostgreSQL
database several coordinators share, only the leader reaps, renews leases and ticks rounds
(``leader``), and each LISTENs for work the others made claimable (``notify``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from trainfleet import __version__
from trainfleet.artifacts.gc import INTERVAL_S as GC_INTERVAL_S
from trainfleet.artifacts.gc import collect_garbage
from trainfleet.coordinator import (
    routes_attest,
    routes_batch,
    routes_dashboard,
    routes_data,
    routes_fairshare,
    routes_hosts,
    routes_market,
    routes_operator,
    routes_pipelines,
    routes_read,
    routes_runs,
    routes_submit,
    routes_worker,
)
from trainfleet.coordinator.beats import Run, flush_forever
from trainfleet.coordinator.clock_steps import ClockSteps
from trainfleet.coordinator.endpoints import RAW_PATH_KEY, Ctx, RouteTable
from trainfleet.coordinator.fastpath import FastPath
from trainfleet.coordinator.market import drive_forever as drive_market_forever
from trainfleet.coordinator.notify import listen_for_work
from trainfleet.coordinator.pipelines import drive_forever as drive_pipelines_forever
from trainfleet.coordinator.rounds import TICK_S as ROUND_TICK_S
from trainfleet.coordinator.state import Coordinator
from trainfleet.coordinator.writer import run_on
from trainfleet.manifest.spec import FairShareSpec
from trainfleet.queue import vacuum
from trainfleet.queue.base import JobRecord
from trainfleet.queue.db import Dialect

log = logging.getLogger(__name__)


def api_routes() -> RouteTable:
    table = RouteTable()
    for module in (
        routes_worker,
        routes_batch,
        routes_operator,
        routes_submit,
        routes_read,
        routes_data,
        routes_fairshare,
        routes_hosts,
        routes_runs,
        routes_attest,
        routes_market,
        routes_pipelines,
        routes_dashboard,
    ):
        table.include(module.routes)
    return table


def reap_once(coord: Coordinator, steps: ClockSteps) -> list[JobRecord]:
    """One reaper pass. A wall-clock step since the last pass first restarts every active
    lease, so the step cannot requeue running jobs (the rule: ``clock_steps``)."""
    step_s = steps.step_s()
    if step_s:
        renewed = coord.queue.renew_leases()
        log.warning(
            "wall clock stepped %+.1fs between reaper passes: %d active lease(s) restart now",
            step_s,
            renewed,
        )
    steps.settle()
    return coord.queue.reap()


def db_runner(coord: Coordinator) -> Run:
    """Run a queue call on the coordinator's writer (``coordinator.writer``)."""
    return functools.partial(run_on, coord.db_executor)


async def _renew_if_new_term(coord: Coordinator, run: Run) -> None:
    """The leader of a new term (the start, or a take-over) gives every active attempt a
    fresh lease: it cannot know which beats went unflushed, nor how long nobody reaped."""
    if coord.leader.take_new_term():
        renewed = await run(coord.queue.renew_leases)
        if renewed:
            log.info("resuming: %d active job(s) get a fresh heartbeat deadline", renewed)


async def _reap_forever(coord: Coordinator) -> None:
    """Requeue lost attempts within ``heartbeat_timeout_s + reap_interval_s`` of the last beat."""
    steps = ClockSteps()
    steps.step_s()  # the first measurement: a step during the first sleep is then noticed
    run = db_runner(coord)
    while True:
        await asyncio.sleep(coord.reap_interval_s)
        if not coord.leader.is_leader:
            continue  # another coordinator of this database reaps (coordinator.leader)
        try:
            await _renew_if_new_term(coord, run)
            await coord.beats.flush(run)  # every beat received so far is in the database
            reaped = await run(reap_once, coord, steps)
        except Exception:
            log.exception("reaper pass failed; retrying")
            continue
        for job in reaped:
            coord.beats.forget(job.id)
            coord.metrics.requeues.inc()
            log.warning("job %s (%s) lost its worker: now %s", job.name, job.id[:12], job.state)
        if any(job.state == "pending" for job in reaped):
            coord.work.notify()


DEPS_TICK_S = 0.5


async def _resolve_dependencies_forever(coord: Coordinator) -> None:
    """The dependency step (``queue.deps``) every ``DEPS_TICK_S``, on the leader only: waiting
    jobs whose parents completed become claimable (long-poll claims are woken), those with a
    failed parent fail."""
    run = db_runner(coord)
    while True:
        await asyncio.sleep(DEPS_TICK_S)
        if not coord.leader.is_leader:
            continue  # another coordinator of this database resolves (coordinator.leader)
        try:
            moved = await run(coord.queue.resolve_dependencies)
        except Exception:
            log.exception("dependency step failed; retrying")
            continue
        if moved:
            coord.work.notify()


async def _fair_share_forever(coord: Coordinator) -> None:
    """The fair-share tick (``queue.fairshare``) on the leader: at start, then every
    ``[fair_share] interval_s`` of the manifest applied (read back by each tick)."""
    run = db_runner(coord)
    interval_s = FairShareSpec().interval_s
    while True:
        if coord.leader.is_leader:  # else another coordinator of this database ticks
            try:
                interval_s = (await run(coord.queue.fair_share_tick)).interval_s
            except Exception:
                log.exception("fair-share tick failed; retrying")
        await asyncio.sleep(interval_s)


async def _vacuum_forever(coord: Coordinator) -> None:
    """On PostgreSQL without autovacuum, the leader vacuums ``jobs`` when its dead rows pile
    up (``queue.vacuum``), on the ordinary threadpool: it may take seconds."""
    db = getattr(coord.queue, "db", None)
    if db is None or db.dialect != Dialect.POSTGRES:
        return
    leader_vacuum = vacuum.Vacuum()  # what its last vacuum left (a new leader learns anew)
    while True:
        await asyncio.sleep(vacuum.CHECK_S)
        if not coord.leader.is_leader:
            continue  # another coordinator of this database vacuums (coordinator.leader)
        try:
            await run_in_threadpool(leader_vacuum.run_if_bloated, db)
        except Exception:
            log.exception("vacuum of jobs failed; retrying")


async def _collect_garbage_forever(coord: Coordinator) -> None:
    """Remove artifact blobs no record binds (fenced or abandoned uploads), after a grace."""
    while True:
        await asyncio.sleep(GC_INTERVAL_S)
        try:
            await run_in_threadpool(
                collect_garbage, coord.store, coord.queue, staging_dir=coord.staging_dir
            )
        except Exception:
            log.exception("artifact gc pass failed; retrying")


async def _drive_rounds_forever(coord: Coordinator) -> None:
    """Tick the round driver every ``TICK_S``, and at once after a replica completion."""
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()

    def wake_up() -> None:
        loop.call_soon_threadsafe(wake.set)

    coord.rounds.wake = wake_up
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), ROUND_TICK_S)
            wake.clear()
            if not coord.leader.is_leader:
                continue  # another coordinator of this database ticks (coordinator.leader)
            try:
                await run_in_threadpool(coord.rounds.tick)
            except Exception:
                log.exception("round driver tick failed; retrying")
    finally:
        coord.rounds.wake = lambda: None  # this loop is gone
        # A cancelled await leaves its thread running: wait for that tick to end, or the
        # queue is closed under it (a segfault in sqlite3) on shutdown.
        await asyncio.to_thread(_wait_idle, coord.rounds.lock)


def _wait_idle(lock: threading.Lock) -> None:
    with lock:
        pass


async def _end_disallowed_attestations(coord: Coordinator, run: Run) -> None:
    """A coordinator that pins measurements ends the attestations of builds no longer on its
    allowlist at start-up (a restart with a shorter ``--measurements``)."""
    policy = coord.attestation
    allowed = getattr(policy.verifier, "measurements", None) if policy is not None else None
    if allowed is None:
        return
    ended = await run(coord.queue.end_attestations_except, list(allowed))
    if ended:
        log.info("ended %d attestation(s) whose measurement is no longer allowed", ended)


def create_app(coord: Coordinator) -> Starlette:
    table = api_routes()
    # Declared through the route table too, so the OpenAPI document lists every served path.
    service = RouteTable()

    @service.route(
        "GET",
        "/openapi.json",
        auth="none",
        summary="This OpenAPI 3.1 document",
        media_type="application/json",
    )
    async def openapi(_: Ctx) -> Response:
        return JSONResponse(spec)

    @service.route(
        "GET",
        "/health",
        auth="none",
        summary="Liveness, the coordinator version, and whether it leads (runs the reaper)",
        media_type="application/json",
    )
    async def health(_: Ctx) -> Response:
        return JSONResponse({"ok": True, "version": __version__, "leader": coord.leader.is_leader})

    @service.route(
        "GET",
        "/metrics",
        auth="read",
        summary="Prometheus metrics (text format)",
        media_type="text/plain",
    )
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
        coord.work.bind(asyncio.get_running_loop())
        run = db_runner(coord)
        listener = None
        tasks: list[asyncio.Task[None]] = []
        try:  # whatever fails while starting, what was started is stopped (finally)
            await asyncio.to_thread(coord.leader.start)
            listener = listen_for_work(coord.queue, coord.work.notify)
            await _renew_if_new_term(coord, run)
            await _end_disallowed_attestations(coord, run)
            tasks = [
                asyncio.create_task(flush_forever(coord.beats, coord.beat_flush_s, run)),
                asyncio.create_task(_reap_forever(coord)),
                asyncio.create_task(_fair_share_forever(coord)),
                asyncio.create_task(_resolve_dependencies_forever(coord)),
                asyncio.create_task(_collect_garbage_forever(coord)),
                asyncio.create_task(_vacuum_forever(coord)),
                asyncio.create_task(_drive_rounds_forever(coord)),
                asyncio.create_task(drive_market_forever(coord)),
                asyncio.create_task(drive_pipelines_forever(coord)),
            ]
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:  # a clean stop keeps every beat (a crash loses at most one flush: beats)
                await coord.beats.flush(run)
            except Exception:
                log.exception("last heartbeat flush failed")
            if listener is not None:
                await asyncio.to_thread(listener.stop)
            await asyncio.to_thread(coord.leader.stop)  # another coordinator may lead now

    app = CoordinatorApp(
        routes=table.starlette_routes(coord),
        exception_handlers={HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(RawPathRouting)],
        lifespan=lifespan,
    )
    # The hot worker routes skip Starlette altogether: its middleware, routing and body
    # validation (fastpath); an unexpected error there gets the same JSON 500.
    app.fast = FastPath(app.starlette_call, coord, table.endpoints, on_error=server_error)
    # "/v1/jobs/" is a 404, not a redirect the description cannot list.
    app.router.redirect_slashes = False
    app.state.coordinator = coord
    return app


class CoordinatorApp(Starlette):
    """The coordinator's Starlette app behind its fast path (``fastpath.FastPath``), which
    answers the hot worker requests itself and hands every other request to Starlette."""

    fast: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast is None:
            await super().__call__(scope, receive, send)
        else:
            await self.fast(scope, receive, send)

    async def starlette_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Starlette's own handling of a request (its middleware, routes, handlers)."""
        await super().__call__(scope, receive, send)


class RawPathRouting:
    """Route on the path as sent, so a quoted '/' (``%2F``) in a job reference stays inside
    its segment; ``Ctx.path`` unquotes each parameter (``endpoints.RAW_PATH_KEY``)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and isinstance(raw, bytes):
            scope = {**scope, "path": raw.decode("latin-1"), RAW_PATH_KEY: True}
        await self.app(scope, receive, send)

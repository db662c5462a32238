"""Long-poll claims: an idle worker's claim waits for work instead of polling every second.

``POST /v1/workers/claim`` takes an optional JSON body ``{"wait_s": W}`` (0 <= W <= 30). With
W > 0 and nothing to claim, the request waits until work may have become claimable
(``WorkSignal.notify``: a reload, a requeue, a reaped or failed attempt, a new round; the
PostgreSQL LISTEN/NOTIFY bridge of several coordinators calls it too), then claims again;
it answers ``{"claim": null}`` only once W has passed. A claim is also retried every
``RECHECK_S`` while waiting: some work becomes claimable by time alone (a job kept for a
CUDA host, a replica task kept for its slot's previous worker), and each try marks the worker
seen, so a waiting worker never looks offline. A worker that deregistered or was revoked
meanwhile gets nothing (its credential is checked before each try), and a client that hung
up is not handed a job.

A worker has at most ``MAX_WAITING_PER_WORKER`` long polls waiting at once (its current one,
and one sent again after a connection it gave up on): each waiting claim holds a connection
and is tried again, on the queue's writer, at every wake-up, so one credential opening
thousands would starve everyone. A long poll over the bound is answered at once, as a claim
without ``wait_s`` is (the daemon then pauses its poll interval: no busy loop).

Without a body (older workers) the claim answers at once, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from pydantic import Field

from trainfleet.coordinator.auth import authenticate
from trainfleet.coordinator.schemas import Body
from trainfleet.errors import Unauthorized

if TYPE_CHECKING:
    from trainfleet.coordinator.endpoints import Ctx

T = TypeVar("T")

MAX_WAIT_S = 30.0
RECHECK_S = 5.0  # a waiting claim is tried again at least this often
MAX_WAITING_PER_WORKER = 2  # long polls one worker may have waiting at once


class ClaimWait(Body):
    wait_s: float = Field(
        0.0,
        ge=0,
        le=MAX_WAIT_S,
        description="wait up to this long for work when there is none now (long poll)",
    )


class WorkSignal:
    """Wakes waiting claims when work may have become claimable. ``notify`` may be called
    from any thread; waiters live on the event loop it was bound to."""

    def __init__(self) -> None:
        self.generation = 0
        self.closing = False  # shutdown began: waiting claims answer now (``close``)
        self.waiting = 0  # claims waiting now
        self.polls: dict[str, int] = {}  # long polls in progress, by worker
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._event = loop, asyncio.Event()

    def notify(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(self._wake)

    def close(self) -> None:
        """Shutdown began: every waiting claim answers now, and none waits from here on."""
        self.closing = True
        self.notify()

    def _wake(self) -> None:
        self.generation += 1
        old, self._event = self._event, asyncio.Event()
        if old is not None:
            old.set()

    async def wait(self, generation: int, timeout_s: float) -> None:
        """Return once notified after ``generation`` was read, or after ``timeout_s``."""
        if self.generation != generation or self._event is None:
            return
        self.waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout_s)
        finally:
            self.waiting -= 1


async def claim_waiting(
    ctx: Ctx,
    claim_once: Callable[[], Awaitable[T | None]],
    hand_back: Callable[[T], Awaitable[object]],
    wait_s: float,
) -> T | None:
    """``claim_once()`` now and, while it finds nothing, whenever ``ctx.coord.work`` fires
    (or every ``RECHECK_S``), until ``wait_s`` has passed.

    Before each retry the worker's credential is checked again (a deregistered or revoked
    worker's waiting claim takes nothing: 401), and a client that hung up is not handed a
    job: a claim made for it just then is handed back (``hand_back``), no failure counted.
    """
    signal: WorkSignal = ctx.coord.work
    worker = ctx.worker
    if wait_s > 0 and signal.polls.get(worker, 0) >= MAX_WAITING_PER_WORKER:
        wait_s = 0.0  # over the bound: answered at once
    if wait_s <= 0:
        return await claim_once()
    signal.polls[worker] = signal.polls.get(worker, 0) + 1
    try:
        return await _claim_until(ctx, signal, claim_once, hand_back, wait_s)
    finally:
        left = signal.polls.pop(worker) - 1
        if left:
            signal.polls[worker] = left


async def _claim_until(
    ctx: Ctx,
    signal: WorkSignal,
    claim_once: Callable[[], Awaitable[T | None]],
    hand_back: Callable[[T], Awaitable[object]],
    wait_s: float,
) -> T | None:
    """The long poll itself (``claim_waiting``, within the worker's bound)."""
    deadline = time.monotonic() + wait_s
    retry = False
    while True:
        if retry:
            if await ctx.request.is_disconnected():
                return None
            if await authenticate("worker", ctx.request, ctx.coord) != ctx.worker:
                raise Unauthorized("this credential no longer names the waiting worker")
        retry = True
        generation = signal.generation
        got = await claim_once()
        if got is not None and await ctx.request.is_disconnected():
            await hand_back(got)
            signal.notify()  # claimable again: other waiting polls may take it
            return None
        left = deadline - time.monotonic()
        if got is not None or left <= 0 or signal.closing:
            return got
        await signal.wait(generation, min(left, RECHECK_S))

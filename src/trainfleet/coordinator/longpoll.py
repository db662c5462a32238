"""Long-poll claims: an idle worker's claim waits for work instead of polling every second.

``POST /v1/workers/claim`` takes an optional JSON body ``{"wait_s": W}`` (0 <= W <= 30). With
W > 0 and nothing to claim, the request waits until work may have become claimable
(``WorkSignal.notify``: a reload, a requeue, a reaped or failed attempt, a new round; the
PostgreSQL LISTEN/NOTIFY bridge of several coordinators calls it too), then claims again;
it answers ``{"claim": null}`` only once W has passed. A claim is also retried every
``RECHECK_S`` while waiting: some work becomes claimable by time alone (a job kept for a
CUDA host, a replica task kept for its slot's previous worker), and each try marks the worker
seen, so a waiting worker never looks offline. A client that hangs up is not handed a job.

Without a body (older workers) the claim answers at once, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import Field
from starlette.requests import Request

from trainfleet.coordinator.schemas import Body

T = TypeVar("T")

MAX_WAIT_S = 30.0
RECHECK_S = 5.0  # a waiting claim is tried again at least this often


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
        self.waiting = 0  # claims waiting now
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
    request: Request,
    signal: WorkSignal,
    claim_once: Callable[[], Awaitable[T | None]],
    wait_s: float,
) -> T | None:
    """``claim_once()`` now and, while it finds nothing, whenever ``signal`` fires (or every
    ``RECHECK_S``), until ``wait_s`` has passed or the client has hung up."""
    deadline = time.monotonic() + wait_s
    while True:
        generation = signal.generation
        got = await claim_once()
        left = deadline - time.monotonic()
        if got is not None or left <= 0:
            return got
        await signal.wait(generation, min(left, RECHECK_S))
        if await request.is_disconnected():
            return None

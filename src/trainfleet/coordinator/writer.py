"""Where the coordinator runs its queue calls: ``coord.db_executor``.

On SQLite there is one write lock. Forty threadpool threads each holding a connection and
queueing on ``BEGIN IMMEDIATE`` spent their time in a lock convoy (issue 9 measured a
``BEGIN IMMEDIATE`` wait p99 near 1 s), so every queue call of a request runs on ONE thread
instead: calls are served in arrival order, each transaction begins at once, and the thread
keeps its connection warm. A database that takes concurrent writers (``single_writer`` False:
PostgreSQL) gets a pool sized to its connection pool.

On SQLite the calls waiting for that thread at once commit together, in one transaction,
a call that fails rolled back alone (``coordinator.group_commit``). The hot routes' short
calls (a claim, a completion: ``Ctx.run_hot``) run as such groups on the event loop itself
while that thread is idle: the thread and the loop share the GIL, and each waiting for the
other cost more than the work on a loaded machine.

The rule that keeps this fast: nothing slow runs on that thread; on SQLite not even the WAL
checkpoints, which run on a thread of their own (``queue.checkpoint``). Shard planning, decoding a
pseudo-gradient, held-out evaluation and file I/O go to the ordinary threadpool
(``Ctx.run_io``); only the queue's own transactions go to the writer (``Ctx.run_db``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from trainfleet.coordinator.group_commit import GroupWriter

T = TypeVar("T")

DEFAULT_POOL = 8  # writers for a multi-writer database that does not say its pool size
GROUP_COMMIT = True  # SQLite: queue calls waiting together share one transaction
HOT_ON_LOOP = True  # SQLite: a hot route's calls run on the event loop when the writer is idle


def make_db_executor(queue: object) -> ThreadPoolExecutor:
    """One thread when the queue's database has a single writer (SQLite, and any queue that
    does not say), else one thread per pooled connection."""
    db = getattr(queue, "db", None)
    single = bool(getattr(db, "single_writer", True))
    background = getattr(queue, "checkpoint_in_background", None)
    if background is not None:  # SQLite: no checkpoint (an fsync) inside the writer's commits
        background()
    if single:
        if getattr(db, "dialect", None) == "sqlite" and GROUP_COMMIT:
            return GroupWriter(db)  # the calls waiting together commit together
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainfleet-writer")
    size = int(getattr(db, "pool_size", 0) or DEFAULT_POOL)
    return ThreadPoolExecutor(max_workers=size, thread_name_prefix="trainfleet-db")


async def run_on(
    executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)`` on ``executor``, awaited from the event loop."""
    loop = asyncio.get_running_loop()
    if isinstance(executor, GroupWriter):  # answered straight on this loop (group_commit)
        result: T = await executor.call(loop, fn, *args, **kwargs)
        return result
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))


async def run_hot(
    executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """``run_on`` for a short call of a hot route: on SQLite on the event loop itself when the
    writer thread is idle (``GroupWriter.call_inline``)."""
    if isinstance(executor, GroupWriter) and HOT_ON_LOOP:
        loop = asyncio.get_running_loop()
        result: T = await executor.call_inline(loop, fn, *args, **kwargs)
        return result
    return await run_on(executor, fn, *args, **kwargs)


__all__ = ["make_db_executor", "run_hot", "run_on"]

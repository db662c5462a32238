"""Group commit: the SQLite writer runs the queue calls waiting for it in ONE transaction.

On SQLite every queue call of the coordinator runs on one thread (``coordinator/writer.py``),
and each write transaction pays its own ``BEGIN IMMEDIATE`` and ``COMMIT`` (the commit
writes the log): issue 9 measured those two at about 40% of that thread's time with 64
workers. When several calls are waiting, ``GroupWriter`` runs them together inside one
transaction and commits once:

- each call still sees the state every earlier call left, and a call's own transaction
  (``Database.tx``) joins the group's, so every read-check-write stays atomic;
- a call that raises is rolled back alone and gets its error; the others are unaffected
  (see "Optimistic" below);
- no reply is given before the group commits: a call's result is only seen once its writes
  are in the log, as before. If the commit itself fails, every call of the group gets that
  error (nothing of the group was written).

A lone call runs as before, in its own transaction. Groups hold at most ``MAX_GROUP`` calls,
so the write lock is never held for long.

Optimistic, since calls rarely fail (a stale epoch, a conflict): a group first runs with no
savepoints at all, and only if one of its calls raises is that transaction rolled back and
the group run again, each call in its own savepoint, which gives exactly the outcomes and
writes of savepoints from the start (each call sees the same state either way; a call runs
again only where its first run was rolled back). That saves two statements per call of a
clean group (``retried`` counts the groups that ran twice).

The event loop's calls (``writer.run_on``) come in through ``call``, not ``submit``: each is
answered on an asyncio future, and a group's answers reach their loop in ONE wake-up
(``call_soon_threadsafe``) instead of one per call through a ``concurrent.futures.Future``
chained to an asyncio one (about a sixth of the coordinator's CPU per claim cycle went to
that hand-over in issue 9's profile). A call whose awaiting task was cancelled before the
writer reached it is skipped, as an executor skips a cancelled future.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainfleet.queue.sqlite_attempts import Later

log = logging.getLogger(__name__)

MAX_GROUP = 32
# How soon the loop's hot calls look again at a busy database if its holder has not said it
# let go (``SQLiteDatabase.try_hold``'s waiter wakes them as soon as it does).
INLINE_RECHECK_S = 0.005
# Where a call's outcome goes: an executor's future (``submit``) or the event loop's (``call``).
_Target = Future[Any] | asyncio.Future[Any]
_Item = tuple[_Target, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_Outcome = tuple[_Target, bool, Any]  # the target, whether the call returned, what it gave


class GroupWriter(ThreadPoolExecutor):
    """A one-thread executor for a SQLite ``Database`` (``db.tx()`` joins an open
    transaction on its thread) that commits the calls waiting together in one group."""

    def __init__(self, db: Any, max_group: int = MAX_GROUP) -> None:
        super().__init__(max_workers=1, thread_name_prefix="trainfleet-writer")
        self.db = db
        self.max_group = max_group
        self.groups = 0  # transactions that held more than one call
        self.retried = 0  # groups run again with a savepoint per call (one of them failed)
        self._calls: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.inline_groups = 0  # groups of hot calls run on the event loop (``call_inline``)
        self._closed = False
        self._inline: list[_Item] = []  # this turn of the loop's hot calls
        self._recheck: asyncio.TimerHandle | None = None  # set while they wait for the database
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="trainfleet-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future[Any] = Future()
            self._calls.put((future, fn, args, kwargs))
        return future

    def call(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """``fn(*args, **kwargs)`` on the writer, answered on a future of ``loop``."""
        waiter = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._calls.put((waiter, fn, args, kwargs))
        return waiter

    def call_inline(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        """``call`` for a short call of a hot route (a claim, a completion): run on the event
        loop itself, with the other such calls of the same turn of the loop as one group,
        once the writer thread does not hold the database.

        The writer thread and the event loop share the GIL: with both busy, each waited for
        the other, and on a loaded machine that handover cost more than the work (issue 9:
        0.70 against 0.80-0.88 ms of server CPU per claim cycle at 64 workers). Anything
        that may run long (a manifest, a run's planning) still goes to the thread, and
        while the thread holds the database these calls wait on the loop, never blocking
        it, until the thread lets the database go (it wakes the loop) or ``INLINE_RECHECK_S``
        passes. They never go to the thread: fed by the loop, it would keep the database busy
        and the loop would find it so. Nor does the loop look again and again: a waiting loop
        that keeps taking the GIL slowed the thread's statements several times over (each
        statement gives the GIL up and waits to get it back), and so kept the database busy
        for longer (issue 9: 5,000 looks in a 3 s run)."""
        waiter = loop.create_future()
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        self._inline.append((waiter, fn, args, kwargs))
        if len(self._inline) == 1:  # a drain is scheduled while any call waits here
            loop.call_soon(self._drain, loop)
        return waiter

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the hot calls waiting on the loop, as groups, once the database is free."""
        if self._recheck is not None:  # this call came first: its timer is not needed
            self._recheck.cancel()
            self._recheck = None
        if self._closed:
            items, self._inline = self._inline, []
            closed = RuntimeError("the coordinator's writer has shut down")
            _deliver([(future, False, closed) for future, _, _, _ in items])
            return
        if not self.db.try_hold(lambda: _wake(loop, self._woken)):
            # The writer thread is in a transaction: wait until it lets go.
            self._recheck = loop.call_later(INLINE_RECHECK_S, self._drain, loop)
            return
        # One group per turn: the loop serves its sockets (heartbeats) between groups.
        items, self._inline = self._inline[: self.max_group], self._inline[self.max_group :]
        if self._inline:
            loop.call_soon(self._drain, loop)
        try:
            self._run([item for item in items if _starts(item[0])])
            self.inline_groups += 1
        finally:
            self.db.release()

    def _woken(self, loop: asyncio.AbstractEventLoop) -> None:
        """The database's holder let it go: drain now if the hot calls are waiting for it."""
        if self._recheck is not None:
            self._drain(loop)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._calls.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
        super().shutdown(wait=wait, cancel_futures=cancel_futures)

    def _serve(self) -> None:
        while True:
            first = self._calls.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < self.max_group:
                try:
                    more = self._calls.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                group.append(more)
            self._run([item for item in group if _starts(item[0])])
            if stop:
                return

    def _run(self, group: list[_Item]) -> None:
        if len(group) == 1:
            future, fn, args, kwargs = group[0]
            _deliver([_settle(future, fn, args, kwargs)])
            return
        try:
            outcomes = self._clean(group)
            if outcomes is None:  # a call failed: its group was rolled back, run it again
                self.retried += 1
                outcomes = self._each(group)
        except BaseException as err:  # the group's transaction failed: nothing was written
            log.exception("a group of %d queue calls failed to commit", len(group))
            _deliver([(future, False, err) for future, _, _, _ in group])
            return
        self.groups += 1
        _deliver(outcomes)

    def _clean(self, group: list[_Item]) -> list[_Outcome] | None:
        """The group in one transaction without savepoints, its claims and completions
        leaving their events and fair-share charges to be written together at the end
        (``SQLiteDatabase.group``); None, with nothing written, if any call (or those writes)
        raised."""
        outcomes: list[_Outcome] = []
        later = Later(free_slots_later=False)
        settled = False
        try:
            with self.db.group(later):
                for future, fn, args, kwargs in group:
                    outcomes.append((future, True, fn(*args, **kwargs)))
                self.db.settle()
                if later.failed:  # a call caught the failure of a write left to the group
                    raise _LeftUnwritten
                settled = True
        except BaseException:
            if not settled:  # a call raised: the transaction rolled back
                return None
            raise  # the commit itself failed
        return outcomes

    def _each(self, group: list[_Item]) -> list[_Outcome]:
        """The group in one transaction, each call in its own savepoint: a call that raises
        is rolled back alone and gets its error."""
        outcomes: list[_Outcome] = []
        with self.db.tx() as conn:
            for future, fn, args, kwargs in group:
                conn.execute("SAVEPOINT tf_group")
                try:
                    value = fn(*args, **kwargs)
                except BaseException as err:
                    conn.execute("ROLLBACK TO SAVEPOINT tf_group")
                    conn.execute("RELEASE SAVEPOINT tf_group")
                    outcomes.append((future, False, err))
                else:
                    conn.execute("RELEASE SAVEPOINT tf_group")
                    outcomes.append((future, True, value))
        return outcomes


class _LeftUnwritten(Exception):
    """A group's deferred writes failed inside a call that went on: roll the group back."""


def _wake(loop: asyncio.AbstractEventLoop, fn: Callable[[asyncio.AbstractEventLoop], None]) -> None:
    """``fn(loop)`` on ``loop``, from any thread (nothing once the loop has closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, loop)


def _starts(target: _Target) -> bool:
    """Whether the call is still wanted: its future not cancelled (an executor's is marked
    running, so it can no longer be)."""
    if isinstance(target, Future):
        return target.set_running_or_notify_cancel()
    return not target.cancelled()


def _settle(target: _Target, fn: Callable[..., Any], args: Any, kwargs: Any) -> _Outcome:
    try:
        return target, True, fn(*args, **kwargs)
    except BaseException as err:
        return target, False, err


def _deliver(outcomes: list[_Outcome]) -> None:
    """Hand each outcome to its future: an executor's at once, the event loop's in one
    wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        target = outcome[0]
        if isinstance(target, Future):
            _resolve(outcome)
        else:
            by_loop.setdefault(target.get_loop(), []).append(outcome)
    for loop, answers in by_loop.items():
        if _running(loop):  # run on the loop itself (``call_inline``): answer at once
            _resolve_all(answers)
            continue
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits these
            loop.call_soon_threadsafe(_resolve_all, answers)


def _running(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread is running ``loop``."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for outcome in outcomes:
        _resolve(outcome)


def _resolve(outcome: _Outcome) -> None:
    target, ok, value = outcome
    if target.done():  # an awaiting task cancelled meanwhile
        return
    if ok:
        target.set_result(value)
    else:
        target.set_exception(value)


__all__ = ["MAX_GROUP", "GroupWriter"]

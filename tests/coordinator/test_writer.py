"""Where a handler's blocking calls run (``coordinator/writer.py``): queue methods on the one
writer thread of a SQLite coordinator, everything else (file I/O, judging, parsing) on the
ordinary threadpool, so nothing slow queues up in front of the writer."""

from __future__ import annotations

import asyncio
import threading
import types
from types import SimpleNamespace
from typing import Any

from test_api import Api

from trainfleet.coordinator.endpoints import Ctx
from trainfleet.coordinator.writer import make_db_executor


def test_queue_calls_run_on_one_writer_and_the_rest_elsewhere(api: Api) -> None:
    coord = api.coord
    assert coord.db_executor._max_workers == 1  # SQLite: a single writer
    ctx = Ctx(None, coord, None, None)  # type: ignore[arg-type]
    names: list[str] = []

    def record(*_: Any) -> None:
        names.append(threading.current_thread().name)

    as_queue_method = types.MethodType(record, coord.queue)  # bound to the queue
    as_store_method = types.MethodType(record, coord.store)
    for fn in (as_queue_method, as_store_method, record):
        asyncio.run(ctx.run(fn))
    asyncio.run(ctx.run_db(record))
    asyncio.run(ctx.run_io(as_queue_method))
    writer = [n.startswith("trainfleet-writer") for n in names]
    assert writer == [True, False, False, True, False]
    assert len({n for n, w in zip(names, writer, strict=True) if w}) == 1


def test_a_database_with_concurrent_writers_gets_a_pool() -> None:
    pg = SimpleNamespace(db=SimpleNamespace(single_writer=False, pool_size=6))
    assert make_db_executor(pg)._max_workers == 6
    assert make_db_executor(SimpleNamespace())._max_workers == 1  # a queue that does not say

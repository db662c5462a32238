"""Profile a ``trainfleet serve`` process under a bench load: cProfile on its event loop and,
separately, on its queue writer thread.

    TRAINFLEET_BENCH_PROFILE=DIR python -m bench.queue --arms sqlite --sizes 64

``bench.queue_servers`` then starts each coordinator as ``python -m bench.queue_profile DIR
serve ...`` instead of ``python -m trainfleet.cli.main serve ...``; on a clean stop (SIGTERM)
this writes DIR/loop-PID.prof and DIR/writer-PID.prof (read them with ``pstats``).
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

PROFILE_ENV = "TRAINFLEET_BENCH_PROFILE"
WINDOW_ENV = "TRAINFLEET_BENCH_PROFILE_WINDOW"  # set: profile the loop from SIGUSR1 on


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    sys.argv = ["trainfleet", *sys.argv[2:]]
    from trainfleet.cli.main import main as cli_main
    from trainfleet.coordinator import group_commit

    writer = cProfile.Profile(time.thread_time)  # CPU time, not waits
    window = os.environ.get(WINDOW_ENV)
    opened: list[bool] = []  # SIGUSR1 came: the writer starts profiling at its next group
    run = group_commit.GroupWriter._run

    def profiled_run(self: Any, group: Any) -> None:
        if window and opened and len(opened) == 1:
            opened.append(True)
            writer.enable()  # on the writer thread itself
        run(self, group)

    serve = group_commit.GroupWriter._serve

    def profiled_serve(self: Any) -> None:
        if not window:
            writer.enable()
        serve(self)

    group_commit.GroupWriter._serve = profiled_serve  # type: ignore[method-assign]
    group_commit.GroupWriter._run = profiled_run  # type: ignore[method-assign]
    # uvicorn raises the signal again after its graceful stop: end as an exception instead,
    # so that the profiles below are written.
    signal.signal(signal.SIGTERM, _exit)
    loop = cProfile.Profile(time.thread_time)

    def open_window(*_: Any) -> None:
        loop.enable()
        opened.append(True)

    if window:  # from SIGUSR1 on (the fleet's measured window)
        signal.signal(signal.SIGUSR1, open_window)
    else:
        loop.enable()
    try:
        cli_main()
    finally:
        loop.disable()
        loop.dump_stats(out / f"loop-{os.getpid()}.prof")
        writer.dump_stats(out / f"writer-{os.getpid()}.prof")  # its thread is idle by now


if __name__ == "__main__":
    main()

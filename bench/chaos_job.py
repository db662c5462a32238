"""One job of the chaos benchmark (``bench/chaos.py``).

Every execution appends JSON lines to a shared marker file (``O_APPEND``, one ``write`` per
line, so lines from concurrent executions never interleave): ``start``, a ``tick`` every
0.1 s while it runs, and ``end`` once its outputs are written, each with the execution's own
``run`` id, its pid and the wall-clock time. From these the benchmark tells whether two
executions of one job were alive at the same time, and whether an execution that finished
had its result land.

    --kind short    run --seconds, write metrics.json (with the run id) and a payload
    --kind long     the same (the benchmark gives it more seconds than the heartbeat timeout)
    --kind flaky    the first execution of this job fails (exit 3); later ones are short
    --kind chatty   print a lot (thousands of lines, some very long, some with escapes)
    --kind doomed   always fail (exit 4): the job must end "failed", not lost
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--kind", default="short")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--markers", required=True)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:12]
    fd = os.open(args.markers, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def mark(event: str) -> None:
        line = {"job": args.name, "run": run, "pid": os.getpid(), "ev": event, "t": time.time()}
        os.write(fd, (json.dumps(line) + "\n").encode())

    mark("start")
    print(f"chaos job {args.name} ({args.kind}) run {run}", flush=True)
    if args.kind == "flaky" and not _ran_before(Path(args.markers), args.name, run):
        mark("fail")
        sys.exit(3)
    if args.kind == "chatty":
        for i in range(3000):
            print(f"line {i} \x1b[32mgreen\x1b[0m [red]markup[/]", flush=i % 500 == 0)
            if i % 1000 == 0:
                print("x" * 20_000, flush=True)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        mark("tick")
        time.sleep(0.1)
    if args.kind == "doomed":
        mark("fail")
        sys.exit(4)
    out = Path(os.environ.get("TRAINFLEET_OUTPUT_DIR", "."))
    (out / "metrics.json").write_text(json.dumps({"heldout_loss": 1.0, "run": run}))
    (out / "payload.bin").write_bytes(os.urandom(32 * 1024))
    mark("end")
    print("finished", flush=True)


def _ran_before(markers: Path, name: str, run: str) -> bool:
    for line in markers.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("job") == name and row.get("ev") == "start" and row.get("run") != run:
            return True
    return False


if __name__ == "__main__":
    main()

"""Run the built-in ``gpt`` recipe: ``python -m trainfleet.train --params JSON --output DIR``.

This is what a worker starts for a ``kind = "train"`` job. Progress goes to stdout, one flushed
line at a time, because the worker streams it line by line. The CPU thread count comes from
``TRAINFLEET_NUM_THREADS`` when the worker sets it. Bad params (or a corpus too small for them)
print one line to stderr and exit 2. With ``--dataset`` it trains on that dataset spec's shards,
cached under the worker's ``TRAINFLEET_CACHE_*`` settings; a router that fails verification
exits 3 (refused: the worker reports it as fatal, never retried), and a source that cannot be
read or does not match its pins exits 1 (another host may succeed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from trainfleet import env
from trainfleet.data.prepare import CacheSettings
from trainfleet.data.spec import DatasetSpec
from trainfleet.errors import CorpusTooSmall, DataError, RoutingMismatch
from trainfleet.train.recipes import RECIPES, GPTParams
from trainfleet.train.trainer import DataSource, train

EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


def _log(line: str) -> None:
    print(line, flush=True)


def _fail(message: str, code: int = EXIT_USAGE, prog: str = "trainfleet.train") -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def run_training(work: Callable[[], object], prog: str = "trainfleet.train") -> int:
    """Run ``work`` and map what it raises to this package's exit codes (module doc): too
    little data 2, a refused router 3, a data error 1; 0 when it returns."""
    try:
        work()
    except CorpusTooSmall as e:
        return _fail(str(e), prog=prog)
    except RoutingMismatch as e:
        return _fail(f"refused: {e}", EXIT_REFUSED, prog)
    except DataError as e:
        return _fail(str(e), EXIT_DATA, prog)
    return 0


def _data_source(dataset: str, path: int | None) -> DataSource:
    spec = TypeAdapter[Any](DatasetSpec).validate_json(dataset)
    router_file = os.environ.get(env.ROUTER_FILE)
    handed = json.loads(Path(router_file).read_text()) if router_file else None
    return DataSource(spec, path, CacheSettings.from_env(), handed)


def _describe(error: ValidationError) -> str:
    """A pydantic error as one line: 'field: problem; field: problem'."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "params"
        parts.append(f"{where}: {problem['msg']}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainfleet.train", description=__doc__)
    parser.add_argument("--params", default="{}", help="recipe params (hyper.*) as a JSON object")
    parser.add_argument("--mode", default="full", choices=RECIPES["gpt"].modes)
    parser.add_argument("--output", required=True, type=Path, help="directory for outputs")
    parser.add_argument("--dataset", help="a dataset spec as JSON (default: hyper.corpus)")
    parser.add_argument("--path", type=int, help="the routed dataset's path to train on")
    args = parser.parse_args(argv)

    try:
        params = GPTParams.model_validate_json(args.params)
    except ValidationError as e:
        return _fail(f"invalid --params: {_describe(e)}")
    threads_text = os.environ.get(env.NUM_THREADS, "")
    if threads_text and not (threads_text.isdigit() and int(threads_text) > 0):
        return _fail(f"{env.NUM_THREADS} must be a positive integer, got {threads_text!r}")
    num_threads = int(threads_text) if threads_text else None
    try:
        data = _data_source(args.dataset, args.path) if args.dataset else None
    except ValidationError as e:
        return _fail(f"invalid --dataset: {_describe(e)}")

    return run_training(
        lambda: train(params, args.mode, args.output, num_threads=num_threads, log=_log, data=data)
    )


if __name__ == "__main__":
    sys.exit(main())

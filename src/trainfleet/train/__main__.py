"""Run the built-in ``gpt`` recipe: ``python -m trainfleet.train --params JSON --output DIR``.

This is what a worker starts for a ``kind = "train"`` job. Progress goes to stdout, one flushed
line at a time, because the worker streams it line by line. The CPU thread count comes from
``TRAINFLEET_NUM_THREADS`` when the worker sets it. Bad params (or a corpus too small for them)
print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from trainfleet import env
from trainfleet.errors import CorpusTooSmall
from trainfleet.train.recipes import RECIPES, GPTParams
from trainfleet.train.trainer import train

EXIT_USAGE = 2


def _log(line: str) -> None:
    print(line, flush=True)


def _fail(message: str) -> int:
    print(f"trainfleet.train: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


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
        train(params, args.mode, args.output, num_threads=num_threads, log=_log)
    except CorpusTooSmall as e:
        return _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every ``trainfleet`` command shares: consoles, connection options, error handling.

Connection options of every operator command come from flags, then environment variables
(``TRAINFLEET_URL``, ``TRAINFLEET_TOKEN``), then the local coordinator's state directory
(``.trainfleet/operator.token``), so on the coordinator's own machine no flag is needed.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from trainfleet import env
from trainfleet.client import Client
from trainfleet.errors import ApiError, CoordinatorUnavailable, ManifestError, TrainfleetError

# Piped output (scripts, CI logs) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

UrlOpt = Annotated[
    str, typer.Option("--url", envvar=env.URL, help="Coordinator base URL.", show_default=True)
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar=env.TOKEN,
        help="Operator token. Default: read from STATE_DIR/operator.token.",
        show_default=False,
    ),
]
StateOpt = Annotated[
    Path,
    typer.Option("--state-dir", envvar=env.STATE_DIR, help="Coordinator state directory."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
JobArg = Annotated[str, typer.Argument(help="Job name, id, or unique id prefix.")]

DEFAULT_STATE = Path(env.DEFAULT_STATE_DIR)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def errors() -> Iterator[None]:
    """Turn user-facing errors into one clear message and a non-zero exit."""
    try:
        yield
    except ManifestError as err:
        err_console.print(f"[red]error:[/] invalid manifest {escape(err.path)}", highlight=False)
        for problem in err.problems:
            err_console.print(f"  - {escape(problem)}", highlight=False)
        raise typer.Exit(2) from None
    except ApiError as err:
        err_console.print(f"[red]error:[/] {escape(err.message)}", highlight=False)
        for problem in err.details.get("problems", []):
            text = (
                problem if isinstance(problem, str) else f"{problem['field']}: {problem['message']}"
            )
            err_console.print(f"  - {escape(text)}", highlight=False)
        raise typer.Exit(1) from None
    except CoordinatorUnavailable as err:
        fail(f"{err}\n  is `trainfleet serve` running there? (--url / {env.URL})")
    except TrainfleetError as err:
        fail(str(err))


def client(url: str, token: str | None, state_dir: Path) -> Client:
    if token is None:
        path = state_dir / "operator.token"
        if not path.exists():
            fail(
                f"no operator token: pass --token, set {env.TOKEN}, or run where"
                f" {path} exists (written by `trainfleet serve`)"
            )
        token = path.read_text().strip()
    return Client(url, token)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def setup_logging(level: str, prefix: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s {prefix}%(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise

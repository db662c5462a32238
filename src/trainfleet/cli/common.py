"""What every ``trainfleet`` command shares: consoles, connection options, error handling.

Connection options of every operator command come from flags, then environment variables
(``TRAINFLEET_URL``, ``TRAINFLEET_TOKEN``), then the local coordinator's state directory
(``.trainfleet/operator.token``), so on the coordinator's own machine no flag is needed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from trainfleet import env
from trainfleet.cli.render import plain
from trainfleet.client import Client
from trainfleet.errors import (
    ApiError,
    CoordinatorUnavailable,
    ManifestError,
    TrainfleetError,
    UntrustedCertificate,
)

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
CaCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-cert",
        envvar=env.CA_CERT,
        help="CA certificate (PEM) to trust for an https coordinator.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _job_ref(value: str | list[str]) -> str | list[str]:
    """Refuse an empty job reference up front: a clear usage error (exit 2), no request."""
    for ref in [value] if isinstance(value, str) else value:
        if not ref.strip():
            raise typer.BadParameter("empty job reference: give a job name, id or id prefix")
    return value


JobArg = Annotated[
    str, typer.Argument(help="Job name, id, or unique id prefix.", callback=_job_ref)
]
JobsArg = Annotated[
    list[str], typer.Argument(help="Jobs (names, ids or id prefixes).", callback=_job_ref)
]

DEFAULT_STATE = Path(env.DEFAULT_STATE_DIR)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(Text("error: ", style="red") + plain(message), highlight=False)
    raise typer.Exit(code)


def safe_stdio() -> None:
    """Whatever a string holds, printing it never raises (UnicodeEncodeError on a lone
    surrogate or a narrow locale): unencodable characters come out backslash-escaped."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


@contextmanager
def errors() -> Iterator[None]:
    """Turn user-facing errors into one clear message and a non-zero exit."""
    try:
        yield
    except ManifestError as err:
        err_console.print(Text("error: ", style="red") + plain(f"invalid manifest {err.path}"))
        for problem in err.problems:
            err_console.print(plain(f"  - {problem}"), highlight=False)
        raise typer.Exit(2) from None
    except ApiError as err:
        err_console.print(Text("error: ", style="red") + plain(err.message), highlight=False)
        problems = err.details.get("problems", [])
        for problem in problems if isinstance(problems, list) else [problems]:
            text = (
                f"{problem.get('field')}: {problem.get('message')}"
                if isinstance(problem, dict)
                else problem
            )
            err_console.print(plain(f"  - {text}"), highlight=False)
        raise typer.Exit(1) from None
    except UntrustedCertificate as err:
        fail(str(err))  # it answered; its certificate is the problem
    except CoordinatorUnavailable as err:
        fail(f"{err}\n  is `trainfleet serve` running there? (--url / {env.URL})")
    except TrainfleetError as err:
        fail(str(err))


def client(url: str, token: str | None, state_dir: Path, ca_cert: Path | None = None) -> Client:
    """An operator client; ``ca_cert`` (default: ``TRAINFLEET_CA_CERT``) for https."""
    ca_cert = ca_cert or (Path(os.environ[env.CA_CERT]) if os.environ.get(env.CA_CERT) else None)
    if token is None:
        path = state_dir / "operator.token"
        if not path.exists():
            fail(
                f"no operator token: pass --token, set {env.TOKEN}, or run where"
                f" {path} exists (written by `trainfleet serve`)"
            )
        token = path.read_text().strip()
    return Client(url, token, ca_cert=ca_cert)


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

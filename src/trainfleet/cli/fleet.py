"""``trainfleet hosts ...`` and ``trainfleet workers ...``: who may join the fleet, and
taking that back.

A host's join token is printed once (alone on stdout, so ``> NAME.token`` keeps it) or
written to ``--token-file`` with mode 0600; the coordinator keeps only its hash.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from trainfleet import env
from trainfleet.capability.model import is_assigned_host_name, is_host_name, is_worker_id
from trainfleet.cli import render
from trainfleet.cli.common import (
    DEFAULT_STATE,
    CaCertOpt,
    JsonOpt,
    StateOpt,
    TokenOpt,
    UrlOpt,
    client,
    console,
    err_console,
    errors,
    print_json,
)
from trainfleet.cli.hints import LOOPBACK_HOSTS, join_command
from trainfleet.client import Client
from trainfleet.errors import BadRequest, NotFound

TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="Write the host's join token to this file (mode 0600) instead of printing it.",
    ),
]

hosts_app = typer.Typer(
    name="hosts", help="Enroll hosts (a join token per host), list, rotate or revoke them."
)
workers_app = typer.Typer(
    name="workers",
    help="List workers (no subcommand), or revoke one worker or every worker of a host.",
    invoke_without_command=True,
)


def write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by its owner only (0600, even if it existed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def _check_ref(ref: str, *, open_ok: bool, worker_ok: bool = False) -> None:
    """The coordinator's host-name policy, checked here first: a name such as '..' would
    otherwise change the URL it is sent in (to another endpoint), not just be refused."""
    if worker_ok and is_worker_id(ref):
        return
    if not (is_assigned_host_name(ref) if open_ok else is_host_name(ref)):
        raise BadRequest(
            f"invalid host name {ref[:80]!r}: 1-63 characters of letters, digits, '.', '_'"
            " or '-', starting with a letter or digit"
            + (" (or open:NAME, or a worker id)" if open_ok else "")
        )


@contextmanager
def _checked_client(
    ref: str,
    url: str,
    token: str | None,
    state_dir: Path,
    ca_cert: Path | None,
    *,
    open_ok: bool,
    worker_ok: bool = False,
) -> Iterator[Client]:
    """An operator client for a command about ``ref``, once ``ref`` passes ``_check_ref``;
    a user error in either step, or in the block, is one message and a non-zero exit."""
    with errors():
        _check_ref(ref, open_ok=open_ok, worker_ok=worker_ok)
        with client(url, token, state_dir, ca_cert) as c:
            yield c


def _hand_over(reply: dict[str, Any], token_file: Path | None, url: str, verb: str) -> None:
    host = escape(reply["host"])
    if token_file is not None:
        write_secret(token_file, reply["token"])
        err_console.print(
            f"{verb} host {host}; its join token is in {escape(str(token_file))}", soft_wrap=True
        )
        where = str(token_file)
    else:
        err_console.print(f"{verb} host {host}; its join token (shown once):")
        sys.stdout.write(reply["token"] + "\n")
        sys.stdout.flush()
        where = "NAME.token"
    join = join_command(url, where, tls=url.lower().startswith("https:"))
    # soft_wrap: a command to copy must never be broken across lines, however long its paths
    err_console.print(
        f"on {host}:  {escape(join)}   (or set {env.JOIN_TOKEN})", highlight=False, soft_wrap=True
    )
    local = urlsplit(url).hostname
    if local in LOOPBACK_HOSTS:
        err_console.print(
            f"({local} is this machine: from another one, use the coordinator's address)",
            highlight=False,
        )


@hosts_app.command("enroll")
def enroll(
    name: Annotated[str, typer.Argument(help="Host name (1-63 of letters, digits, . _ -).")],
    token_file: TokenFileOpt = None,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
) -> None:
    """Enroll a host: issue a join token bound to NAME (a worker using it is host NAME)."""
    with _checked_client(name, url, token, state_dir, ca_cert, open_ok=False) as c:
        reply = c.enroll_host(name)
    _hand_over(reply, token_file, url, "enrolled")


@hosts_app.command("rotate")
def rotate(
    name: Annotated[str, typer.Argument(help="An enrolled host.")],
    token_file: TokenFileOpt = None,
    revoke_workers: Annotated[
        bool,
        typer.Option(
            "--revoke-workers", help="Also revoke its running workers (default: they keep going)."
        ),
    ] = False,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
) -> None:
    """Issue a new join token for a host; the old one is refused from now on."""
    with _checked_client(name, url, token, state_dir, ca_cert, open_ok=False) as c:
        reply = c.rotate_host(name, revoke_workers=revoke_workers)
    _hand_over(reply, token_file, url, "rotated")
    _print_requeued(err_console, reply.get("requeued", []))  # stderr: stdout is the token alone


@hosts_app.command("revoke")
def revoke_host(
    name: Annotated[str, typer.Argument(help="A host.")],
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
) -> None:
    """Revoke a host: its join token and every worker of it (their jobs are requeued)."""
    with _checked_client(name, url, token, state_dir, ca_cert, open_ok=True) as c:
        _print_revoked(c.revoke_host(name), "host")


@hosts_app.command("list")
def list_hosts(
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Enrolled hosts, their state and workers online (never their tokens)."""
    with errors(), client(url, token, state_dir, ca_cert) as c:
        hosts = c.hosts()
    if as_json:
        print_json(hosts)
        return
    console.print(render.hosts_table(hosts))


@workers_app.callback()
def workers(
    ctx: typer.Context,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Workers with their effective capability and the corrections made to it."""
    if ctx.invoked_subcommand is not None:
        return
    with errors(), client(url, token, state_dir, ca_cert) as c:
        data = c.workers()
    if as_json:
        print_json(data)
    else:
        console.print(render.workers_table(data))


@workers_app.command("revoke")
def revoke(
    ref: Annotated[str, typer.Argument(metavar="WORKER|HOST", help="A worker id or a host.")],
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    ca_cert: CaCertOpt = None,
) -> None:
    """Revoke a worker's credential, or a host's (its join token and all its workers), at
    once: the next request gets 401 and the active job is requeued. A worker revoked alone
    may register again with its host's token; revoke the host to keep it out."""
    with _checked_client(ref, url, token, state_dir, ca_cert, open_ok=True, worker_ok=True) as c:
        try:
            reply, kind = c.revoke_worker(ref), "worker"
        except NotFound:
            reply, kind = c.revoke_host(ref), "host"
        _print_revoked(reply, kind)


def _print_revoked(reply: dict[str, Any], kind: str) -> None:
    console.print(f"revoked {kind} {escape(render.clean(reply['revoked']))}", highlight=False)
    _print_requeued(console, reply["requeued"])


def _print_requeued(out: Console, jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        out.print(
            f"  requeued {escape(render.clean(job['name']))} ({job['id'][:12]})", highlight=False
        )

"""What ``serve`` and ``join`` tell a person: the commands ``serve`` prints, each runnable
as printed, and the host name a worker's log lines carry.

``serve --host 0.0.0.0`` listens on every interface, but ``http://0.0.0.0:8470`` is not an
address anyone can join: on another machine it means that machine itself. So the operator's
commands get a local address, and the join command gets this machine's name.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainfleet import env

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def join_command(url: str, token_file: str, *, tls: bool) -> str:
    """``trainfleet join`` as a host runs it, with its token file (and a CA over https)."""
    return f"trainfleet join {url} --token-file {token_file}" + (" --ca-cert CA.pem" if tls else "")


def serve_hints(
    *, host: str, port: int, tls: bool, state_dir: Path, default_state_dir: Path, open_join: bool
) -> list[str]:
    """The lines ``serve`` prints before it starts serving (never a token)."""
    scheme = "https" if tls else "http"
    everywhere = host in WILDCARD_HOSTS
    name = socket.gethostname()  # no DNS lookup: it cannot hang a start
    # Over https the certificate names this machine, not 127.0.0.1.
    local = (name if tls else "::1" if host == "::" else "127.0.0.1") if everywhere else host
    here = _url(scheme, local, port)
    there = _url(scheme, name if everywhere else host, port)
    enroll = "trainfleet hosts enroll NAME --token-file NAME.token"
    if here != env.DEFAULT_URL:
        enroll += f" --url {here}"
    if state_dir != default_state_dir:
        enroll += f" --state-dir {state_dir}"
    shell = "in another shell" + ("" if state_dir.is_absolute() else ", in this directory")
    lines = [
        f"coordinator on {_url(scheme, host, port)}"
        + (", every interface" if everywhere else "")
        + f"  (state: {state_dir}; operator token in {state_dir / 'operator.token'})",
        f"enroll a host ({shell}):",
        f"  {enroll}" + (" --ca-cert CA.pem" if tls else ""),
        "then, on that host, with NAME.token copied there:",
        f"  {join_command(there, 'NAME.token', tls=tls)}",
    ]
    if everywhere:
        lines.append(f"  ({name}: this machine's name; where a host cannot resolve it, its IP)")
    elif host in LOOPBACK_HOSTS:
        lines.append(f"  ({host} is this machine only: serve --host 0.0.0.0 to admit others)")
    if open_join:
        lines.append(
            f"open join is ON: the shared token in {state_dir / 'join.token'} admits anyone,"
            " as a new policy-less host open:NAME"
        )
    return lines


class WorkerTag(logging.Filter):
    """Sets ``worker_tag`` on every record: ``worker HOST`` with the host the worker is
    registered as (the join token decides it), ``--host`` until then, else ``worker``."""

    def __init__(self, host: str | None) -> None:
        super().__init__()
        self.host = host
        self.registration: Callable[[], dict[str, Any]] = dict  # the worker's, once known

    def filter(self, record: logging.LogRecord) -> bool:
        effective = self.registration().get("effective") or {}
        host = effective.get("host") or self.host
        record.worker_tag = f"worker {host}" if host else "worker"
        return True

    def install(self) -> None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)

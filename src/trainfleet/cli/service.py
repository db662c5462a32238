"""``trainfleet join``'s service flags: install, remove or print the worker's systemd unit.

The join command parses and validates its flags as for a worker run, then hands them here
instead of running the worker. Which flags the unit carries is read from click's record of
where each value came from: every join option the operator gave (on the command line or
through its environment variable) except the token (it goes to the env file), ``--state-dir``
(only used to find the open-mode token, which is resolved now) and the service flags
themselves. The logic is in :mod:`trainfleet.worker.service`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from trainfleet.cli.common import fail
from trainfleet.worker import service

InstallServiceOpt = Annotated[
    bool,
    typer.Option(
        "--install-service",
        help="Instead of running the worker, install it as a systemd service (Linux, root):"
        " writes /etc/systemd/system/trainfleet-worker[-NAME].service with these flags and the"
        " join token into /etc/trainfleet/worker[-NAME].env (mode 0600), then enables and"
        " starts it.",
    ),
]
UninstallServiceOpt = Annotated[
    bool,
    typer.Option(
        "--uninstall-service",
        help="Stop, disable and remove the service and its env file (no URL needed).",
    ),
]
PrintServiceOpt = Annotated[
    bool,
    typer.Option(
        "--print-service",
        help="Print the unit and its env file (token redacted) that --install-service would"
        " write; writes nothing.",
    ),
]
ServiceNameOpt = Annotated[
    str | None,
    typer.Option(
        "--service-name",
        help="Several workers on one machine: trainfleet-worker-NAME.service.",
        show_default=False,
    ),
]
ServiceUserOpt = Annotated[
    str | None,
    typer.Option(
        "--service-user",
        help="The user the service (and its jobs) run as. Default: the user who ran sudo,"
        " else root.",
        show_default=False,
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="--install-service: replace an installed unit.")
]

# Join options that never go into the unit.
NOT_CARRIED = frozenset(
    {
        "url",
        "token_file",
        "token",
        "state_dir",
        "install_service",
        "uninstall_service",
        "print_service",
        "service_name",
        "service_user",
        "force",
    }
)


@dataclass(frozen=True)
class ServiceAction:
    """What the service flags ask for (at most one of install, uninstall, print)."""

    install: bool
    uninstall: bool
    print_only: bool
    name: str | None
    user: str | None
    force: bool

    @classmethod
    def parse(
        cls,
        install: bool,
        uninstall: bool,
        print_only: bool,
        name: str | None,
        user: str | None,
        force: bool,
    ) -> ServiceAction | None:
        """None when no service flag was given; refuses conflicting or stray flags."""
        if install + uninstall + print_only > 1:
            fail("give one of --install-service, --uninstall-service, --print-service", 2)
        if not (install or uninstall or print_only):
            if name is not None or user is not None or force:
                fail(
                    "--service-name, --service-user and --force go with --install-service,"
                    " --uninstall-service or --print-service",
                    2,
                )
            return None
        if uninstall and (user is not None or force):
            fail("--uninstall-service takes --service-name only", 2)
        try:
            service.check_name(name)
        except service.ServiceError as err:
            fail(str(err), 2)
        return cls(install, uninstall, print_only, name, user, force)

    def uninstall_now(self) -> None:
        try:
            removed = service.uninstall(self.name, service.Host.current())
        except service.ServiceError as err:
            fail(str(err))
        paths = ", ".join(str(p) for p in removed.removed)
        typer.echo(
            f"stopped, disabled and removed {removed.unit} ({paths}); kept {removed.state_dir}"
            " (the worker's directory: remove it by hand when no longer wanted)"
        )

    def install_or_print(self, ctx: typer.Context, url: str, token: str) -> None:
        try:
            spec = service.ServiceSpec(
                join_args=(url, *service.flag_args(given_options(ctx))),
                token=token,
                name=self.name,
                user=self.user or service.default_user(),
                environment=tuple(
                    (var, os.environ[var]) for var in service.CARRIED_ENV if os.environ.get(var)
                ),
            )
            host = service.Host.current()
            if self.print_only:
                env_path = host.env_path(spec.name)
                sys.stdout.write(
                    f"# {host.unit_path(spec.name)}\n{service.render_unit(spec, env_path)}\n"
                    f"# {env_path} (mode 0600, owner root)\n"
                    f"{service.render_env_file(spec, redact=True)}"
                )
                return
            done = service.install(spec, host, force=self.force)
        except service.ServiceError as err:
            fail(str(err))
        typer.echo(
            f"{'replaced and restarted' if done.replaced else 'installed and started'}"
            f" {done.unit} (runs as {spec.user}): {done.unit_path}, join token in"
            f" {done.env_path} (mode 0600); workdir {spec.workdir}."
            f" Follow it with `journalctl -u {done.unit} -f`."
        )


def given_options(ctx: typer.Context) -> list[tuple[str, object]]:
    """(flag, value) of every join option the operator gave, in the command's order.

    Path values stay paths (made absolute by ``service.flag_args``); ``--enclave
    simulated:KEYFILE`` gets an absolute KEYFILE for the same reason. (Duck-typed: typer
    ships its own copy of click, whose classes are not ``click``'s.)"""
    given: list[tuple[str, object]] = []
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name is None:
            continue
        if param.name in NOT_CARRIED:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        value = ctx.params[param.name]
        if param.name == "enclave" and isinstance(value, str) and ":" in value:
            kind, _, keyfile = value.partition(":")
            value = f"{kind}:{Path(keyfile).absolute()}"
        given.append((max(param.opts, key=len), value))
    return given

"""``trainfleet attest ...``: the operator's tools for the private tier (``verify.attest``).

``keygen DIR`` writes a SIMULATED attestation key pair: the public half is pinned by the
coordinator (``serve --attestation-key DIR/simulated-attestation.pub``), the private half
is the simulated enclave of a worker (``join --enclave simulated:DIR/simulated-attestation.key``).
``measure`` prints this install's measurement, one line to append to the coordinator's
``--measurements`` allowlist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trainfleet.cli.common import JsonOpt, err_console, fail, print_json

attest_app = typer.Typer(
    name="attest",
    help="Attestation of the private tier: a SIMULATED attestation key pair, this install's"
    " measurement.",
    no_args_is_help=True,
)


@attest_app.command()
def keygen(
    directory: Annotated[Path, typer.Argument(help="Where to write the key pair.")],
) -> None:
    """Write a SIMULATED attestation key pair (Ed25519) into DIRECTORY. Anyone holding the
    private key can attest any measurement: it is for tests and local use, not security."""
    # Loaded on use: every command loads this module, and the verify package loads the
    # manifest's models and numpy (0.14 s of each command's start).
    from trainfleet.verify.attest import keygen as make_keys

    try:
        private, public = make_keys(directory)
    except FileExistsError:
        fail(f"{directory} already holds a simulated attestation key; not overwritten", 2)
    except OSError as err:
        fail(f"cannot write into {directory}: {err.strerror}", 2)
    print(f"simulated attestation key (private, mode 0600): {private}")
    print(f"simulated attestation key (public, for serve --attestation-key): {public}")
    err_console.print(
        "SIMULATED: these keys attest nothing about the hardware; a worker joins with"
        f" --enclave simulated:{private}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@attest_app.command()
def measure(as_json: JsonOpt = False) -> None:
    """Print this install's measurement (sha256 of trainfleet's source files and the worker
    config it covers): a line for the coordinator's --measurements allowlist."""
    from trainfleet.verify.attest import measure as measure_install
    from trainfleet.verify.attest import worker_config

    config = worker_config()
    value = measure_install(config)
    if as_json:
        print_json({"measurement": value, "config": config})
    else:
        print(value)

"""The capability record a worker reports and the coordinator matches jobs against.

Everything in it is chosen by the worker, so every field is bounded: a host name is 1-63
characters of ``[A-Za-z0-9._-]`` starting with a letter or digit (what a manifest or an
enrollment can name), other strings are printable and short, numbers are finite. A register
with anything else is refused with a 400 that names the field.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Open-mode workers are registered as ``open:<name>``: the ':' cannot appear in a manifest
# host name or an enrolled one, so no policy and no enrollment can ever apply to them.
OPEN_HOST_PREFIX = "open:"
ASSIGNED_HOST_PATTERN = r"^(open:)?[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# A worker id is its host and six hex digits (``gpu-box-3f2a1c``): up to 70 characters.
WORKER_ID_PATTERN = r"^(open:)?[A-Za-z0-9][A-Za-z0-9._-]{0,62}-[0-9a-f]{6}$"
MAX_TEXT_CHARS = 256
MAX_GPUS = 1024

# Printable: no C0/C1 control characters (no escape sequences, newlines or NULs).
Text = Annotated[
    str, StringConstraints(max_length=MAX_TEXT_CHARS, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")
]


def is_host_name(name: str) -> bool:
    """Whether ``name`` may be enrolled or declared as a host."""
    return re.fullmatch(HOST_NAME_PATTERN, name) is not None


def is_assigned_host_name(name: str) -> bool:
    """Whether ``name`` is a host a worker can be registered as: a host name, or ``open:NAME``."""
    return re.fullmatch(ASSIGNED_HOST_PATTERN, name) is not None


def is_worker_id(ref: str) -> bool:
    """Whether ``ref`` has the form of a worker id (the registry makes them so)."""
    return re.fullmatch(WORKER_ID_PATTERN, ref) is not None


def policy_host_name(hostname: str) -> str:
    """``hostname`` made a valid host name (other characters become '-', cut to 63): the
    host a worker reports when it is not given one."""
    if is_host_name(hostname):
        return hostname
    name = re.sub(r"[^A-Za-z0-9._-]", "-", hostname).lstrip("._-")[:63]
    return name or "host"


class Capability(BaseModel):
    """One worker's capability. Sent at registration; snapshotted into every artifact binding."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    host: Annotated[str, StringConstraints(pattern=ASSIGNED_HOST_PATTERN)] = Field(
        description="host name used for policy: 1-63 of [A-Za-z0-9._-], starting alphanumeric"
        " (the coordinator replaces it with the enrolled name, or open:NAME in open mode)"
    )
    hostname: Text = Field(description="the machine's own hostname")
    cores: int = Field(ge=1, le=10**9, description="usable CPU cores")
    ram_gib: float = Field(ge=0, description="total RAM in GiB")
    cuda: bool = Field(description="a usable CUDA device is present")
    num_gpus: int = Field(0, ge=0, le=MAX_GPUS)
    gpu_names: list[Text] = Field(default_factory=list, max_length=MAX_GPUS)
    vram_gib: float = Field(0.0, ge=0, description="VRAM of the largest GPU in GiB")
    torch_version: Text = ""
    python_version: Text = ""
    code_version: Text = Field("", description="trainfleet version, plus git commit if known")
    platform: Text = ""

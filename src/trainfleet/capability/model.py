"""The capability record a worker reports and the coordinator matches jobs against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Capability(BaseModel):
    """One worker's capability. Sent at registration; snapshotted into every artifact binding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="host name used for policy (hostname unless overridden)")
    hostname: str = Field(description="the machine's own hostname")
    cores: int = Field(ge=1, description="usable CPU cores")
    ram_gib: float = Field(ge=0, description="total RAM in GiB")
    cuda: bool = Field(description="a usable CUDA device is present")
    num_gpus: int = Field(0, ge=0)
    gpu_names: list[str] = Field(default_factory=list)
    vram_gib: float = Field(0.0, ge=0, description="VRAM of the largest GPU in GiB")
    torch_version: str = ""
    python_version: str = ""
    code_version: str = Field("", description="trainfleet version, plus git commit if known")
    platform: str = ""

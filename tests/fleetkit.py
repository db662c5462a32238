"""Test helpers shared across the suite: a controllable clock, capabilities, manifests."""

from __future__ import annotations

from trainfleet.capability.model import Capability
from trainfleet.manifest import parse_manifest
from trainfleet.manifest.spec import Manifest


class FakeClock:
    """A clock tests move by hand: no sleeping to wait for time to pass."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_cap(
    host: str = "cpu-a",
    *,
    cuda: bool = False,
    vram_gib: float = 0.0,
    cores: int = 4,
    ram_gib: float = 16.0,
) -> Capability:
    return Capability(
        host=host,
        hostname=host,
        cores=cores,
        ram_gib=ram_gib,
        cuda=cuda,
        num_gpus=1 if cuda else 0,
        gpu_names=["Fake GPU"] if cuda else [],
        vram_gib=vram_gib if cuda else 0.0,
    )


def manifest_of(text: str) -> Manifest:
    return parse_manifest(text, "test.toml")

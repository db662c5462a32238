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


def routed_dataset_toml(
    name: str = "tiny",
    *,
    num_documents: int = 60,
    doc_tokens: int = 64,
    shard_tokens: int = 512,
    num_features: int = 64,
    sample_documents: int | None = 60,
) -> str:
    """A small synthetic dataset of 3 dialects routed to 3 paths, as manifest TOML."""
    sample = f"sample_documents = {sample_documents}\n" if sample_documents else ""
    return (
        f'\n[datasets.{name}]\nsource = "synthetic"\nnum_dialects = 3\n'
        f"num_documents = {num_documents}\ndoc_tokens = {doc_tokens}\n"
        f"shard_tokens = {shard_tokens}\n\n[datasets.{name}.router]\nnum_paths = 3\n"
        f"num_features = {num_features}\n{sample}"
    )

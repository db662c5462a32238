"""The coordinator never loads torch to serve: its import took about 2 s of CPU and 180 MiB
(a `serve` healthy after 13-15 s on a loaded machine, against 3 s without it). Torch is
loaded where tensors are actually handled (a run's averaging, a market model's check), on
first use."""

from __future__ import annotations

import json
import subprocess
import sys

TORCH = ("torch", "safetensors.torch")


def loaded_after(modules: list[str], then: str = "", of: tuple[str, ...] = TORCH) -> list[str]:
    """The modules named in ``of`` (each with its submodules; by default torch and
    safetensors' torch side) a fresh interpreter holds after importing ``modules`` and
    running ``then``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"{then}\n"
        f"of = {of!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if any(m == o or m.startswith(o + '.') for o in of))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return list(json.loads(out.stdout))


def test_the_coordinator_and_the_worker_daemon_import_no_torch() -> None:
    assert loaded_after(["trainfleet.coordinator.server", "trainfleet.cli.main"]) == []
    assert loaded_after(["trainfleet.worker.daemon"]) == []


def test_a_worker_detects_its_capability_without_torch() -> None:
    """Its import took 1.5-2 s of CPU in every `trainfleet join` (a third of the suite's
    worker start-ups' CPU), and on a GPU machine it would keep a CUDA context in the daemon."""
    then = "from trainfleet.capability import detect_capability; detect_capability()"
    assert loaded_after(["trainfleet.worker.daemon"], then) == []


def test_the_refs_side_of_the_feature_store_imports_no_torch_and_the_tensor_side_still_works() -> (
    None
):
    assert loaded_after(["trainfleet.features", "trainfleet.features.ref"]) == []
    from trainfleet.features import run_interleavings  # loaded on first use

    assert callable(run_interleavings)


def test_a_cli_command_starts_without_the_manifest_numpy_or_cryptography() -> None:
    """Only the commands that read a manifest, a competition or keys load them, on use: each
    command's start took 0.76 s of CPU with them, 0.44 without."""
    of = ("trainfleet.manifest", "trainfleet.verify", "numpy", "cryptography")
    assert loaded_after(["trainfleet.cli.main"], of=of) == []

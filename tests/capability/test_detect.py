"""Detecting this machine's capability."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest
import torch

import trainfleet
from trainfleet.capability import detect
from trainfleet.capability.detect import code_version, detect_capability
from trainfleet.capability.model import Capability


@pytest.fixture(scope="module")
def detected() -> Capability:
    return detect_capability()


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The probe's per-process cache emptied before and after the test."""
    detect._cuda_devices.cache_clear()
    yield monkeypatch
    detect._cuda_devices.cache_clear()


@pytest.fixture
def probe(fresh: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:
    """A driver mark that exists, so the CUDA probe runs."""
    mark = tmp_path / "nvidia-version"
    mark.write_text("NVRM version: test\n")
    fresh.setattr(detect, "DRIVER_MARKS", (str(mark),))
    return fresh


def test_hardware(detected):
    assert 1 <= detected.cores <= (os.cpu_count() or 1)
    assert detected.ram_gib > 0


def test_cuda_matches_torch(detected):
    if torch.cuda.is_available():
        assert detected.cuda is True
        assert detected.num_gpus == torch.cuda.device_count()
        assert len(detected.gpu_names) == detected.num_gpus
        assert detected.vram_gib > 0
    else:
        assert detected.cuda is False
        assert detected.num_gpus == 0
        assert detected.gpu_names == []
        assert detected.vram_gib == 0


def test_software_versions(detected):
    assert detected.python_version == platform.python_version()
    assert detected.torch_version == torch.__version__
    assert detected.code_version.startswith(trainfleet.__version__)
    assert detected.platform == f"{sys.platform}-{platform.machine()}"


def test_host_defaults_to_hostname(detected):
    assert detected.hostname == socket.gethostname()
    assert detected.host == detected.hostname


def test_host_override():
    cap = detect_capability(host="lab-box-7")
    assert cap.host == "lab-box-7"
    assert cap.hostname == socket.gethostname()


def test_code_version_without_git_is_the_package_version(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(detect.subprocess, "run", no_git)
    assert code_version() == trainfleet.__version__


def test_code_version_names_the_commit_in_a_checkout(monkeypatch):
    def fake_git(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout="0123456789ab\n", stderr="")

    monkeypatch.setattr(detect.subprocess, "run", fake_git)
    assert code_version() == f"{trainfleet.__version__}+g0123456789ab"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detection_reports_every_cuda_device_and_its_memory() -> None:
    cap = detect_capability()
    assert cap.cuda and cap.num_gpus == torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    assert cap.gpu_names[0] == props.name
    assert cap.vram_gib >= props.total_memory / 1024**3 - 0.01


def test_without_an_nvidia_driver_no_probe_runs_and_the_version_comes_from_metadata(
    fresh: pytest.MonkeyPatch,
) -> None:
    def no_child(*args, **kwargs):
        raise AssertionError("no probe should run without a driver")

    fresh.setattr(detect, "DRIVER_MARKS", ("/nonexistent/nvidia",))
    fresh.setattr(detect.subprocess, "run", no_child)
    assert detect._cuda_devices() == ((), (), torch.__version__)


def test_with_a_driver_the_real_probe_asks_torch_in_a_child(probe) -> None:
    names, vram, version = detect._cuda_devices()
    assert version == torch.__version__
    assert (
        len(names) == len(vram) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    )


def test_the_probes_devices_are_what_the_worker_reports(probe) -> None:
    reply = {"torch": "9.9.9+cu999", "devices": [["Fake H200", 150 * 1024**3], ["Fake H200", 10]]}
    probe.setattr(detect, "_PROBE", f"print({json.dumps(reply)!r})")
    cap = detect_capability()
    assert cap.cuda and cap.num_gpus == 2 and cap.gpu_names == ["Fake H200", "Fake H200"]
    assert cap.vram_gib == 150.0
    assert cap.torch_version == "9.9.9+cu999"


@pytest.mark.parametrize(
    "script, why",
    [
        ("import sys; print('boom', file=sys.stderr); sys.exit(3)", "exit status 3: boom"),
        ("print('not json')", "Expecting value"),
        ('print(\'{"torch": "2"}\')', "devices"),
        ('print(\'{"torch": "2", "devices": [["x", "many"]]}\')', "invalid literal"),
        ("pass", "list index out of range"),
    ],
)
def test_a_failed_probe_reports_no_gpu_and_says_why(
    probe, caplog: pytest.LogCaptureFixture, script: str, why: str
) -> None:
    probe.setattr(detect, "_PROBE", script)
    with caplog.at_level(logging.WARNING, logger=detect.__name__):
        cap = detect_capability()
    assert not cap.cuda and cap.num_gpus == 0 and cap.vram_gib == 0
    assert cap.torch_version == torch.__version__  # from the installed metadata
    assert why in caplog.text and "CPU jobs only" in caplog.text


def test_a_probe_that_hangs_is_killed_at_its_timeout_and_reports_no_gpu(
    probe, caplog: pytest.LogCaptureFixture
) -> None:
    probe.setattr(detect, "_PROBE", "import time; print('starting', flush=True); time.sleep(60)")
    probe.setattr(detect, "PROBE_TIMEOUT_S", 0.5)
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # other fixtures'
    with caplog.at_level(logging.WARNING, logger=detect.__name__):
        cap = detect_capability()
    assert not cap.cuda and cap.num_gpus == 0
    assert "timed out after 0.5 seconds" in caplog.text and "CPU jobs only" in caplog.text
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before  # the probe did not outlive its timeout

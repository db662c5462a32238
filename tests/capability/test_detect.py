"""Detecting this machine's capability."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys

import pytest
import torch

import trainfleet
from trainfleet.capability import detect
from trainfleet.capability.detect import code_version, detect_capability
from trainfleet.capability.model import Capability


@pytest.fixture(scope="module")
def detected() -> Capability:
    return detect_capability()


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

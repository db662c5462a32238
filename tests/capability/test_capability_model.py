"""The capability's bounds on what a worker may say: host names, printable bounded strings,
finite numbers; and detection that always produces a valid record."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetkit import make_cap
from trainfleet.capability import detect
from trainfleet.capability.model import Capability, is_host_name, is_worker_id, policy_host_name


@pytest.mark.parametrize("name", ["a", "gpu-box", "node_1.lab", "A" * 63, "7x"])
def test_valid_host_names(name: str) -> None:
    assert is_host_name(name)
    assert make_cap(name).host == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "a b", "a" * 64, "a/b", "é", "a\n", "a:b"])
def test_invalid_host_names(name: str) -> None:
    assert not is_host_name(name)
    with pytest.raises(ValidationError):
        make_cap(name)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hostname", "x" * 257),
        ("hostname", "bell\x07"),
        ("torch_version", "\x1b]0;pwned\x07"),
        ("gpu_names", ["ok", "C1\x9b"]),
        ("gpu_names", ["g"] * 1025),
        ("platform", "a\nb"),
        ("ram_gib", float("inf")),
        ("vram_gib", float("nan")),
        ("num_gpus", 10**6),
    ],
)
def test_worker_strings_and_numbers_are_bounded(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        Capability.model_validate({**make_cap().model_dump(), field: value})


def test_printable_unicode_is_fine() -> None:
    cap = Capability.model_validate({**make_cap().model_dump(), "gpu_names": ["Grafikkarte ü"]})
    assert cap.gpu_names == ["Grafikkarte ü"]


@given(st.text(max_size=300))
def test_any_hostname_becomes_a_valid_host_name(hostname: str) -> None:
    assert is_host_name(policy_host_name(hostname))


def test_detection_makes_a_valid_record_from_an_odd_hostname(monkeypatch) -> None:
    monkeypatch.setattr(detect.socket, "gethostname", lambda: "My Laptop\x1b[2J" + "x" * 300)
    cap = detect.detect_capability()
    assert is_host_name(cap.host) and cap.host.startswith("My-Laptop-")
    assert Capability.model_validate(cap.model_dump()) == cap


def test_every_worker_id_the_registry_makes_has_the_worker_id_form() -> None:
    """`workers revoke` checks a reference before it is put in a URL: the id of a worker of
    a 63-character host (70 characters) must pass, and '..' must not."""
    for host in ("a", "a" * 63, "open:" + "b" * 63, "gpu-box"):
        assert is_worker_id(f"{host}-3f2a1c")
    for ref in ("..", "gpu-box", "gpu-box-3F2A1C", "a" * 64 + "-3f2a1c", "x-3f2a1c\n"):
        assert not is_worker_id(ref)

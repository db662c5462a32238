"""Helpers of the feature-store tests: the test secret, sample tensors, exact comparison,
re-signing a ref with changed fields, and waiting on a state with a timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from trainfleet.features import FeatureStore, SampleRef, sign_ref

SECRET = b"s" * 32
StoreFactory = Callable[..., FeatureStore]


def sample(seed: int = 0, n: int = 64) -> dict[str, torch.Tensor]:
    """A sample of mixed dtypes and shapes, scalar and empty ones included."""
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": torch.randn(n, 8, generator=g),
        "idx": torch.randint(0, 1000, (n, 8), generator=g),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.int32),
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and values."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def resign(ref: SampleRef, secret: bytes = SECRET, **change: Any) -> SampleRef:
    """``ref`` with ``change`` applied, signed (validly) with ``secret``."""
    fields = ref.model_dump(exclude={"mac"})
    fields.update(change)
    return sign_ref(**fields, secret=secret)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for a state"
        time.sleep(0.005)

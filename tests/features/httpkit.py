"""A producer's store served over HTTP, seen as one FeatureStore: the contract tests' and the
interleavings' ``http`` backend.

``ServedPair`` puts, aborts and collects in the producer's own :class:`InProcessStore` (which
a :class:`FeatureServer` serves on loopback) and gets, releases and retains through an
:class:`HttpStore`, as a consumer in another process would. Its stats are the producer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trainfleet.features import InProcessStore, SampleRef, StoreStats
from trainfleet.features.http import FeatureServer, HttpStore
from trainfleet.features.store import FeatureStore


class ServedPair(FeatureStore):
    """Producer-side store + server + consumer-side client; ``close()`` ends all three."""

    def __init__(self, *, secret: bytes, **guards: Any):
        self.producer = InProcessStore(secret=secret, **guards)
        try:
            self.server = FeatureServer(self.producer, secret).start()
            self.consumer = HttpStore(self.server.address, secret, timeout_s=30)
        except BaseException:
            self.producer.close()
            raise
        self.address = self.server.address

    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        key: str | None = None,
        holders: int = 1,
        wait_s: float | None = None,
    ) -> SampleRef:
        return self.producer.put(sample_id, tensors, key=key, holders=holders, wait_s=wait_s)

    def get(self, ref: SampleRef, *, clone: bool = True) -> dict[str, torch.Tensor]:
        return self.consumer.get(ref, clone=clone)

    def release(self, ref: SampleRef) -> bool:
        return self.consumer.release(ref)

    def retain(self, ref: SampleRef) -> None:
        self.consumer.retain(ref)

    def abort(self, ref: SampleRef) -> None:
        self.producer.abort(ref)

    def collect(self, now: float | None = None) -> int:
        return self.producer.collect(now)

    def stats(self) -> StoreStats:
        return self.producer.stats()

    def close(self) -> None:
        self.consumer.close()
        self.server.stop()
        self.producer.close()

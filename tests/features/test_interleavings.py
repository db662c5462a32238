"""Randomized, model-checked interleavings of put / re-put / get / release / retain / abort /
collect on every backend: no get that should fail ever returns data, and every get that
should succeed returns exactly the tensors put."""

from __future__ import annotations

from pathlib import Path

import pytest
from featurekit import StoreFactory

from trainfleet.features import FeatureStore, InProcessStore, SharedDirStore, run_interleavings
from trainfleet.features.ref import Encoded
from trainfleet.features.store import check_state


@pytest.mark.parametrize("seed", [0, 1])
def test_no_silent_success_over_random_interleavings(
    store_factory: StoreFactory, seed: int
) -> None:
    report = run_interleavings(store_factory, 2000, seed)
    assert report.failures == []
    assert (report.silent_successes, report.wrong_errors, report.mismatches) == (0, 0, 0)
    assert report.ops == 2000
    # The mix really exercises both sides: plenty of successful and of refused gets.
    assert report.ok_gets > 200
    assert report.gets - report.ok_gets > 200
    assert set(report.op_counts) == {
        "put",
        "get",
        "forged",
        "release",
        "retain",
        "abort",
        "collect",
        "advance",
    }


def test_shared_dir_interleavings_through_a_second_handle(tmp_path: Path) -> None:
    """Gets, releases and retains through another SharedDirStore on the same directory: all
    state they see comes from the directory, none from the writer's memory."""

    def reader(store: FeatureStore, secret: bytes) -> FeatureStore:
        return SharedDirStore(tmp_path / "d", secret=secret)

    report = run_interleavings(
        lambda **kw: SharedDirStore(tmp_path / "d", **kw), 2000, 7, reader_factory=reader
    )
    assert report.failures == []
    assert report.ok and report.ok_gets > 200


class _IgnoresTombstones(InProcessStore):
    """A broken store: it serves freed samples (use after free) while bytes remain."""

    def _read(self, key: str, generation: int, size: int) -> bytes:
        entry = self._entries[key]
        check_state(key, generation, entry.generation, None)
        if entry.data is None:
            entry.data = self._last[key]
        return entry.data

    def _publish(self, key: str, data: Encoded, holders: int) -> tuple[int, str]:
        self._last = {**getattr(self, "_last", {}), key: data.to_bytes()}
        return super()._publish(key, data, holders)


def test_the_checker_catches_a_store_that_serves_freed_samples() -> None:
    report = run_interleavings(lambda **kw: _IgnoresTombstones(**kw), 2000, 0)
    assert report.silent_successes > 0
    assert not report.ok

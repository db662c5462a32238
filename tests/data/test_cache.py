"""The shard cache stays within its bounds, serves the right bytes, and evicts by next use."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import trainfleet.data.cache as cache_module
from trainfleet.data.cache import (
    TMP_SUFFIX,
    CacheStats,
    Policy,
    ShardCache,
    shard_filename,
    simulate_misses,
)
from trainfleet.errors import ShardMismatch

KEYS = [f"shard-{i}" for i in range(8)]
policies = st.sampled_from(["furthest", "lru"])
schedules = st.lists(st.sampled_from(KEYS[:6]), max_size=40)


def payload(key: str, size_bytes: int = 10) -> bytes:
    """Deterministic shard bytes of a given size, different for every key."""
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size_bytes // len(seed) + 1))[:size_bytes]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())


def optimal_misses(schedule: Sequence[str], capacity: int) -> int:
    """The fewest misses any demand-paging cache can have, by exhaustive search over states."""
    if capacity == 0:
        return len(schedule)
    best: dict[frozenset[str], int] = {frozenset(): 0}
    for key in schedule:
        following: dict[frozenset[str], int] = {}
        for resident, misses in best.items():
            if key in resident:
                options = [(resident, misses)]
            elif len(resident) < capacity:
                options = [(resident | {key}, misses + 1)]
            else:
                options = [((resident - {out}) | {key}, misses + 1) for out in resident]
            for state, count in options:
                following[state] = min(count, following.get(state, count))
        best = following
    return min(best.values())


@given(
    accesses=st.lists(st.sampled_from(KEYS), max_size=30),
    sizes=st.lists(st.integers(min_value=0, max_value=80), min_size=8, max_size=8),
    max_shards=st.integers(min_value=0, max_value=4),
    max_bytes=st.integers(min_value=0, max_value=200),
    policy=policies,
    schedule=st.none() | st.lists(st.sampled_from(KEYS), max_size=30),
    check=st.booleans(),
)
def test_bounds_hold_and_bytes_are_right_after_every_get(
    accesses: list[str],
    sizes: list[int],
    max_shards: int,
    max_bytes: int,
    policy: Policy,
    schedule: list[str] | None,
    check: bool,
) -> None:
    size_of = dict(zip(KEYS, sizes, strict=True))

    def build(key: str) -> bytes:
        return payload(key, size_of[key])

    with tempfile.TemporaryDirectory() as name:
        directory = Path(name) / "cache"
        cache = ShardCache(
            directory,
            max_bytes=max_bytes,
            max_shards=max_shards,
            build=build,
            policy=policy,
            schedule=accesses if schedule is None else schedule,
        )
        for count, key in enumerate(accesses, start=1):
            data = cache.get(key, sha(build(key)) if check else None)
            assert data == build(key)
            assert cache.num_memory_shards <= max_shards
            assert directory_bytes(directory) == cache.disk_bytes <= max_bytes
            stats = cache.stats
            assert stats.memory_hits + stats.disk_hits + stats.builds == count
        assert not [p for p in directory.iterdir() if p.name.endswith(TMP_SUFFIX)]
        # A second process on the same directory, with a tighter bound, still obeys it.
        reopened = ShardCache(directory, max_bytes=max_bytes // 2, max_shards=1, build=build)
        assert directory_bytes(directory) == reopened.disk_bytes <= max_bytes // 2
        for key in accesses:
            assert reopened.get(key) == build(key)


@given(schedules, st.integers(min_value=0, max_value=7))
def test_furthest_next_use_never_misses_more_than_lru(schedule: list[str], capacity: int) -> None:
    assert simulate_misses(schedule, capacity, "furthest") <= simulate_misses(
        schedule, capacity, "lru"
    )


@given(st.lists(st.sampled_from(KEYS[:5]), max_size=14), st.integers(min_value=0, max_value=4))
def test_furthest_next_use_is_optimal(schedule: list[str], capacity: int) -> None:
    assert simulate_misses(schedule, capacity, "furthest") == optimal_misses(schedule, capacity)


def test_cyclic_epochs_furthest_beats_lru() -> None:
    schedule = KEYS * 3  # 3 epochs over 8 shards, the same order each epoch
    # LRU always evicts the shard needed next-but-three: every one of the 24 reads misses.
    assert simulate_misses(schedule, 4, "lru") == 24
    # Furthest: 8 cold misses, then 4 per later epoch (3 shards stay put across epochs 1-2,
    # and 2 plus the last two read across epochs 2-3): 8 + 4 + 4 = 16.
    assert simulate_misses(schedule, 4, "furthest") == 16


@given(schedules, st.integers(min_value=0, max_value=5), policies)
def test_cache_builds_match_simulated_misses(
    schedule: list[str], max_shards: int, policy: Policy
) -> None:
    cache = ShardCache(
        None, max_bytes=0, max_shards=max_shards, build=payload, policy=policy, schedule=schedule
    )
    for key in schedule:
        cache.get(key)
    misses = simulate_misses(schedule, max_shards, policy)
    assert cache.stats.builds == misses
    assert cache.stats.memory_hits == len(schedule) - misses


@given(schedules, st.integers(min_value=0, max_value=5))
def test_furthest_without_a_schedule_is_lru(schedule: list[str], max_shards: int) -> None:
    cache = ShardCache(None, max_bytes=0, max_shards=max_shards, build=payload)
    for key in schedule:
        cache.get(key)
    assert cache.stats.builds == simulate_misses(schedule, max_shards, "lru")


def test_off_schedule_reads_and_set_schedule() -> None:
    a, b, c, z = KEYS[:4]
    cache = ShardCache(None, max_bytes=0, max_shards=2, build=payload, schedule=[a, b, c, a])
    for key in (a, b, z, c):  # z is not in the schedule: the cursor stays after b
        cache.get(key)
    # At z, b (never again) went; at c, z (never) went: a, needed next, survived both.
    assert cache.get(a) == payload(a)
    assert cache.stats.as_dict() == {
        **CacheStats().as_dict(),
        "memory_hits": 1,
        "builds": 4,
        "memory_evictions": 2,
        "bytes_built": 40,
    }
    cache.set_schedule([b, c, a])  # the cursor is back at the start
    cache.get(b)  # miss; residents c (next use 1) and a (2): a goes
    assert cache.get(c) == payload(c)
    assert cache.stats.memory_hits == 2
    assert cache.get(a) == payload(a)
    assert cache.stats.builds == 6


def test_corrupt_disk_file_is_detected_deleted_and_rebuilt(tmp_path: Path) -> None:
    key = KEYS[0]
    cache = ShardCache(tmp_path, max_bytes=1000, max_shards=0, build=payload)
    cache.get(key, sha(payload(key)))
    path = tmp_path / shard_filename(key)
    assert path.read_bytes() == payload(key)
    path.write_bytes(b"bit rot!!!")
    assert cache.get(key, sha(payload(key))) == payload(key)
    assert (cache.stats.corrupt_reads, cache.stats.builds, cache.stats.disk_hits) == (1, 2, 0)
    assert path.read_bytes() == payload(key)
    assert cache.get(key, sha(payload(key))) == payload(key)
    assert (cache.stats.corrupt_reads, cache.stats.builds, cache.stats.disk_hits) == (1, 2, 1)


def test_build_returning_wrong_bytes_raises_shard_mismatch(tmp_path: Path) -> None:
    key = KEYS[0]
    expected = sha(payload(key))
    cache = ShardCache(tmp_path, max_bytes=1000, max_shards=2, build=lambda k: b"wrong")
    with pytest.raises(ShardMismatch) as raised:
        cache.get(key, expected)
    message = str(raised.value)
    assert key in message and expected in message and sha(b"wrong") in message
    assert cache.num_memory_shards == 0
    assert list(tmp_path.iterdir()) == []


def test_second_cache_on_the_same_directory_serves_disk_hits(tmp_path: Path) -> None:
    first = ShardCache(tmp_path, max_bytes=1000, max_shards=1, build=payload)
    for key in KEYS[:3]:
        first.get(key)

    def refuse(key: str) -> bytes:
        raise AssertionError(f"built {key} although it is on disk")

    second = ShardCache(tmp_path, max_bytes=1000, max_shards=1, build=refuse)
    for key in KEYS[:3]:
        assert second.get(key, sha(payload(key))) == payload(key)
    assert (second.stats.disk_hits, second.stats.builds) == (3, 0)


def test_construction_removes_tmp_files_and_evicts_to_the_bound(tmp_path: Path) -> None:
    for key in KEYS[:3]:
        (tmp_path / shard_filename(key)).write_bytes(payload(key))
    stray = tmp_path / f"{shard_filename(KEYS[3])}.123{TMP_SUFFIX}"
    stray.write_bytes(b"half a shard")
    # Room for two of the three; the schedule never names KEYS[1], so furthest drops it.
    cache = ShardCache(
        tmp_path, max_bytes=25, max_shards=0, build=payload, schedule=[KEYS[2], KEYS[0]]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        shard_filename(key) for key in (KEYS[0], KEYS[2])
    )
    assert (cache.disk_bytes, cache.stats.disk_evictions) == (20, 1)


def test_disk_bound_holds_while_a_shard_is_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real_replace = os.replace

    def replace_measuring(source: Path, target: Path) -> None:
        written.append(directory_bytes(tmp_path))  # the tmp file is on disk now
        real_replace(source, target)

    monkeypatch.setattr(cache_module.os, "replace", replace_measuring)
    cache = ShardCache(tmp_path, max_bytes=25, max_shards=0, build=payload)
    for key in KEYS:
        cache.get(key)
    assert written == [10, 20] + [20] * 6  # evicted before writing: never 30 > 25
    assert cache.stats.disk_evictions == 6


def test_shard_larger_than_the_disk_bound_stays_in_memory_only(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path, max_bytes=9, max_shards=1, build=payload)
    assert cache.get(KEYS[0]) == payload(KEYS[0])
    assert list(tmp_path.iterdir()) == []
    assert cache.get(KEYS[0]) == payload(KEYS[0])
    assert (cache.stats.memory_hits, cache.stats.builds) == (1, 1)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError):
        ShardCache(None, max_bytes=0, max_shards=-1, build=payload)
    with pytest.raises(ValueError):
        ShardCache(None, max_bytes=-1, max_shards=0, build=payload)
    with pytest.raises(ValueError):
        ShardCache(None, max_bytes=0, max_shards=0, build=payload, policy="mru")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        simulate_misses(KEYS, -1, "lru")

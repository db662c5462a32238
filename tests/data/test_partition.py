"""Jump hash matches the published algorithm; partitions cover every key once and are stable."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainfleet.data.partition import assign, jump_hash, key_int, owner, partition

keys_strategy = st.lists(st.text(max_size=12), max_size=60)
consumers_strategy = st.integers(min_value=1, max_value=40)


@pytest.mark.parametrize(
    ("key", "num_buckets", "bucket"),
    [
        # Known answers of the reference C++ (Lamping & Veach 2014), as used by the
        # jump-consistent-hash (Python) and jumphash (Rust) packages' own tests.
        (1, 1, 0),
        (42, 57, 43),
        (0xDEAD10CC, 1, 0),
        (0xDEAD10CC, 666, 361),
        (256, 1024, 520),
        (123456, 1000, 984),
    ],
)
def test_jump_hash_matches_published_vectors(key: int, num_buckets: int, bucket: int) -> None:
    assert jump_hash(key, num_buckets) == bucket


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=10_000))
def test_jump_hash_is_a_bucket_and_moves_only_to_the_new_bucket(key: int, n: int) -> None:
    before, after = jump_hash(key, n), jump_hash(key, n + 1)
    assert 0 <= before < n
    assert after in (before, n)


def test_key_int_is_the_first_8_bytes_of_sha256_big_endian() -> None:
    digest = hashlib.sha256(b"shard-000017").hexdigest()
    assert key_int("shard-000017") == int(digest[:16], 16)
    assert 0 <= key_int("") < 2**64


@pytest.mark.parametrize(
    "call",
    [
        lambda: jump_hash(-1, 4),
        lambda: jump_hash(2**64, 4),
        lambda: jump_hash(1, 0),
        lambda: owner("a", 0),
        lambda: partition(["a"], 0, 0),
        lambda: partition(["a"], 2, 2),
        lambda: partition(["a"], -1, 2),
        lambda: assign(["a"], 0),
    ],
)
def test_bad_arguments_raise_value_error(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


@given(keys_strategy, consumers_strategy)
def test_every_key_is_in_exactly_one_consumers_list(keys: list[str], n: int) -> None:
    shares = assign(keys, n)
    assert len(shares) == n
    assert sorted(key for share in shares for key in share) == sorted(keys)
    for consumer, share in enumerate(shares):
        assert share == partition(keys, consumer, n)
        assert all(owner(key, n) == consumer for key in share)


@given(keys_strategy, consumers_strategy)
def test_partition_keeps_input_order(keys: list[str], n: int) -> None:
    for consumer in range(n):
        share = partition(keys, consumer, n)
        positions = [i for i, key in enumerate(keys) if owner(key, n) == consumer]
        assert share == [keys[i] for i in positions]


@given(keys_strategy, consumers_strategy)
def test_growing_by_one_moves_keys_only_onto_the_new_consumer(keys: list[str], n: int) -> None:
    before, after = assign(keys, n), assign(keys, n + 1)
    for consumer in range(n):
        # A key either stays with its consumer or goes to the new one, n; order is kept.
        assert after[consumer] == [key for key in before[consumer] if owner(key, n + 1) != n]
    newcomers = [key for share in before for key in share if owner(key, n + 1) == n]
    assert sorted(after[n]) == sorted(newcomers)


@given(keys_strategy, consumers_strategy)
def test_recomputing_gives_identical_lists(keys: list[str], n: int) -> None:
    assert assign(keys, n) == assign(list(keys), n)
    assert [partition(keys, c, n) for c in range(n)] == assign(keys, n)


def test_shares_are_balanced_and_moves_are_minimal() -> None:
    keys = [f"shard-{i:06d}" for i in range(8000)]
    shares = assign(keys, 8)
    # Each consumer's share is within 10% of 1000 (binomial sd ~30, so 3+ sd of slack).
    assert all(900 <= len(share) <= 1100 for share in shares)
    moved = sum(owner(key, 8) != owner(key, 9) for key in keys)
    # Jump hash moves a 1/9 share (~889) when going from 8 to 9; modulo hashing would move ~7/9.
    assert 780 <= moved <= 1000

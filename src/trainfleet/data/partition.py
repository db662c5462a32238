"""Stable partitioning of a pool of shards across consumers, by jump consistent hash.

A pool of shard keys is split across ``num_consumers`` consumers (workers, data-parallel
ranks). Every consumer computes its own share from the key list alone, with no coordination,
and the split must survive a change of ``num_consumers``: when a volunteer joins, nothing may
be dropped or read twice, and as little as possible should move.

Jump consistent hash (Lamping & Veach 2014, "A Fast, Minimal Memory, Consistent Hash
Algorithm", arXiv:1406.2294) gives exactly that. ``jump_hash(k, n)`` walks a 64-bit linear
congruential generator seeded by ``k``: each step names the next bucket at which key ``k``
would jump, and the walk stops at the last jump below ``n``. So going from ``n`` to ``n + 1``
buckets moves a key only if it jumps to bucket ``n`` itself (a ``1 / (n + 1)`` share of keys,
the minimum), and every other key stays where it was. The arithmetic is the paper's C++
(unsigned 64-bit multiply wrapped modulo 2**64, a double division), so bucket numbers agree
with other implementations bit for bit.

A string key enters as ``key_int``: the first 8 bytes of its sha256, big-endian, so the
assignment does not depend on Python's per-process ``hash`` seed, the machine or the order
of the keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_MASK_64 = (1 << 64) - 1
_LCG_MULTIPLIER = 2862933555777941757  # the paper's 64-bit LCG multiplier
_JUMP_SCALE = float(1 << 31)


def jump_hash(key: int, num_buckets: int) -> int:
    """The bucket in ``[0, num_buckets)`` of a 64-bit ``key`` (Lamping & Veach 2014)."""
    if not 0 <= key <= _MASK_64:
        raise ValueError(f"key must be an unsigned 64-bit integer, got {key}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    bucket, jump = -1, 0
    while jump < num_buckets:
        bucket = jump
        key = (key * _LCG_MULTIPLIER + 1) & _MASK_64
        jump = int((bucket + 1) * (_JUMP_SCALE / float((key >> 33) + 1)))
    return bucket


def key_int(key: str) -> int:
    """A string key as an unsigned 64-bit integer: the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def owner(key: str, num_consumers: int) -> int:
    """The consumer in ``[0, num_consumers)`` that owns ``key``."""
    if num_consumers < 1:
        raise ValueError(f"num_consumers must be >= 1, got {num_consumers}")
    return jump_hash(key_int(key), num_consumers)


def partition(keys: Sequence[str], consumer: int, num_consumers: int) -> list[str]:
    """The keys ``consumer`` owns out of ``num_consumers``, in their input order."""
    if num_consumers < 1:
        raise ValueError(f"num_consumers must be >= 1, got {num_consumers}")
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer must be in [0, {num_consumers}), got {consumer}")
    return [key for key in keys if owner(key, num_consumers) == consumer]


def assign(keys: Sequence[str], num_consumers: int) -> list[list[str]]:
    """Every consumer's keys at once: ``assign(keys, n)[c] == partition(keys, c, n)``."""
    if num_consumers < 1:
        raise ValueError(f"num_consumers must be >= 1, got {num_consumers}")
    shares: list[list[str]] = [[] for _ in range(num_consumers)]
    for key in keys:
        shares[owner(key, num_consumers)].append(key)
    return shares

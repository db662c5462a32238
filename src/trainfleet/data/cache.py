"""The worker's bounded shard cache: a memory tier and a disk tier, evicting by next use.

A volunteer bounds the cache it lends (``trainfleet join --max-shards N --cache-gib G``): the
memory tier holds at most ``max_shards`` shards, the disk tier at most ``max_bytes`` bytes.
``get(key)`` looks in memory, then on disk, and only then calls ``build(key)`` to materialize
the shard from its spec; a built shard is written through to disk, so that the next process
or attempt on the same worker finds it there.

Eviction. The dataset spec fixes the order in which a worker reads its shards, so the cache
knows its future: the ``"furthest"`` policy evicts the shard whose next use is furthest away,
Belady's MIN (Belady 1966, "A study of replacement algorithms for a virtual-storage computer",
IBM Systems Journal 5(2)), which no demand-paging policy beats in misses. ``"lru"`` evicts the
least recently used shard. ``simulate_misses`` counts both on a schedule, for the benchmark
and the tests; on cyclic epochs larger than the cache LRU misses every read.

Schedule semantics. The schedule is the expected sequence of ``get`` keys, read with a cursor.
``get(key)`` moves the cursor to just after the next occurrence of ``key`` at or after it (and
leaves it alone if there is none, so an off-schedule read does not derail it). A cached key's
next use is its next occurrence at or after the cursor, infinity if there is none. Ties (in
practice, among never-again keys) go to the least recently used. With no schedule every next use
is infinity, so ``"furthest"`` behaves exactly as LRU.

Bounds. After every call the memory tier holds at most ``max_shards`` shards (0 disables it),
and during a miss the cache additionally holds the one shard being built or read (it evicts
after the build), and building a shard joins its documents' bytes, a second transient copy, so
the peak is ``(max_shards + 2) * largest shard``: ``--max-shards 4`` with 256 MiB shards stays
under 1.5 GiB. ``bench/data.py`` measures it. On disk, the sum of the shard files never exceeds
``max_bytes``, not even during a write: the cache evicts until the new shard fits and only then
writes it, as a temporary file renamed over the final name (``os.replace``), so a crash never
leaves a half-written shard under a shard's name. A shard larger than ``max_bytes`` is kept in
memory only. Files are named by ``sha256(key)``; on construction the cache indexes the shard
files already there (least recently modified = least recently used), deletes stray temporary
files and evicts down to ``max_bytes``. One ``ShardCache`` may use a directory at a time.

Integrity. With ``sha256``, built bytes must match it (else ``ShardMismatch``) and a disk file
that does not is deleted, counted in ``corrupt_reads`` and rebuilt. Without it, disk bytes
are trusted.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from trainfleet.errors import ShardMismatch

log = logging.getLogger(__name__)

Policy = Literal["furthest", "lru"]
POLICIES: tuple[Policy, ...] = ("furthest", "lru")
NEVER = math.inf  # the next use of a key the schedule does not name again
TMP_SUFFIX = ".tmp"
_SHARD_FILENAME = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class CacheStats:
    """What the cache did: where reads were served from, and what it evicted and built."""

    memory_hits: int = 0
    disk_hits: int = 0
    builds: int = 0
    memory_evictions: int = 0
    disk_evictions: int = 0
    corrupt_reads: int = 0
    bytes_built: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def shard_filename(key: str) -> str:
    """The disk tier's file name for ``key``: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


class _Schedule:
    """The expected access sequence, a cursor into it, and each key's next use."""

    def __init__(self, keys: Sequence[str]):
        self._occurrences: dict[str, list[int]] = {}
        for position, key in enumerate(keys):
            self._occurrences.setdefault(key, []).append(position)
        self.cursor = 0

    @cached_property
    def _key_by_filename(self) -> dict[str, str]:
        return {shard_filename(key): key for key in self._occurrences}

    def _next_index(self, key: str) -> int | None:
        positions = self._occurrences.get(key, [])
        index = bisect.bisect_left(positions, self.cursor)
        return positions[index] if index < len(positions) else None

    def advance(self, key: str) -> None:
        position = self._next_index(key)
        if position is not None:
            self.cursor = position + 1

    def next_use(self, key: str) -> float:
        position = self._next_index(key)
        return NEVER if position is None else position

    def next_use_of_file(self, filename: str) -> float:
        key = self._key_by_filename.get(filename)
        return NEVER if key is None else self.next_use(key)


class ShardCache:
    """Shards by key: from memory, else from disk, else built; bounded in both tiers."""

    def __init__(
        self,
        directory: Path | None,
        *,
        max_bytes: int,
        max_shards: int,
        build: Callable[[str], bytes],
        policy: Policy = "furthest",
        schedule: Sequence[str] = (),
    ):
        if max_bytes < 0 or max_shards < 0:
            raise ValueError(f"max_bytes ({max_bytes}) and max_shards ({max_shards}) must be >= 0")
        _check_policy(policy)
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_shards = max_shards
        self.policy = policy
        self.stats = CacheStats()
        self._build = build
        self._schedule = _Schedule(schedule)
        self._tick = 0  # one per get: the recency clock
        self._memory: dict[str, bytes] = {}
        self._memory_tick: dict[str, int] = {}
        self._disk_size: dict[str, int] = {}  # shard file name -> size in bytes
        self._disk_tick: dict[str, int] = {}
        self._disk_bytes = 0
        if directory is not None:
            self._index_directory(directory)

    @property
    def num_memory_shards(self) -> int:
        """Shards held in the memory tier now."""
        return len(self._memory)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the shard files in the disk tier now, by the cache's own index."""
        return self._disk_bytes

    def set_schedule(self, keys: Sequence[str]) -> None:
        """Replace the expected access sequence and put the cursor back at its start."""
        self._schedule = _Schedule(keys)

    def get(self, key: str, sha256: str | None = None) -> bytes:
        """The shard's bytes: from memory, else disk, else ``build(key)`` (then cached)."""
        self._schedule.advance(key)
        self._tick += 1
        filename = shard_filename(key)
        if filename in self._disk_tick:
            self._disk_tick[filename] = self._tick
        if key in self._memory:
            self.stats.memory_hits += 1
            self._memory_tick[key] = self._tick
            return self._memory[key]
        data = self._read_file(key, filename, sha256)
        if data is not None:
            self.stats.disk_hits += 1
        else:
            data = self._build_checked(key, sha256)
            self._write_file(filename, data)
        self._remember(key, data)
        return data

    def _victim(
        self, candidates: Iterable[str], ticks: dict[str, int], next_use: Callable[[str], float]
    ) -> str:
        if self.policy == "lru":
            return min(candidates, key=ticks.__getitem__)
        return max(candidates, key=lambda c: (next_use(c), -ticks[c]))

    def _remember(self, key: str, data: bytes) -> None:
        if self.max_shards == 0:
            return
        while len(self._memory) >= self.max_shards:
            victim = self._victim(self._memory, self._memory_tick, self._schedule.next_use)
            del self._memory[victim], self._memory_tick[victim]
            self.stats.memory_evictions += 1
        self._memory[key] = data
        self._memory_tick[key] = self._tick

    def _build_checked(self, key: str, sha256: str | None) -> bytes:
        data = self._build(key)
        self.stats.builds += 1
        self.stats.bytes_built += len(data)
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise ShardMismatch(
                    f"shard {key!r}: rebuilt bytes have sha256 {actual}, expected {sha256}"
                )
        return data

    def _read_file(self, key: str, filename: str, sha256: str | None) -> bytes | None:
        if self.directory is None or filename not in self._disk_size:
            return None
        path = self.directory / filename
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed behind our back, e.g. the user cleared the cache
            self._forget_file(filename)
            return None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            log.warning("shard %r: cached file %s is corrupt; rebuilding", key, path)
            self.stats.corrupt_reads += 1
            self._delete_file(filename)
            return None
        return data

    def _write_file(self, filename: str, data: bytes) -> None:
        if self.directory is None or len(data) > self.max_bytes:
            return
        while self._disk_bytes + len(data) > self.max_bytes:
            self._evict_file()
        tmp = self.directory / f"{filename}.{os.getpid()}{TMP_SUFFIX}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.directory / filename)
        finally:
            tmp.unlink(missing_ok=True)
        self._disk_size[filename] = len(data)
        self._disk_tick[filename] = self._tick
        self._disk_bytes += len(data)

    def _evict_file(self) -> None:
        self._delete_file(
            self._victim(self._disk_size, self._disk_tick, self._schedule.next_use_of_file)
        )
        self.stats.disk_evictions += 1

    def _delete_file(self, filename: str) -> None:
        assert self.directory is not None
        (self.directory / filename).unlink(missing_ok=True)
        self._forget_file(filename)

    def _forget_file(self, filename: str) -> None:
        self._disk_bytes -= self._disk_size.pop(filename)
        del self._disk_tick[filename]

    def _index_directory(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        found: list[tuple[int, str, int]] = []  # (mtime_ns, name, size_bytes)
        for path in directory.iterdir():
            if path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)  # left by a write that crashed
            elif _SHARD_FILENAME.match(path.name) and path.is_file():
                status = path.stat()
                found.append((status.st_mtime_ns, path.name, status.st_size))
        found.sort()
        for rank, (_, filename, size_bytes) in enumerate(found):
            self._disk_size[filename] = size_bytes
            self._disk_tick[filename] = rank - len(found)  # all before the first get
            self._disk_bytes += size_bytes
        while self._disk_bytes > self.max_bytes:
            self._evict_file()


def simulate_misses(schedule: Sequence[str], capacity: int, policy: Policy) -> int:
    """Misses of a ``capacity``-slot cache reading ``schedule`` under ``policy``.

    The same rules as ``ShardCache``'s memory tier fed its own schedule: a miss always inserts
    the key, evicting the furthest next use (ties: least recently used) or the least recently
    used. Runs in O(n log n) for ``"furthest"`` and O(n) for ``"lru"``.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    _check_policy(policy)
    misses = 0
    if policy == "lru":
        resident: OrderedDict[str, None] = OrderedDict()
        for key in schedule:
            if key in resident:
                resident.move_to_end(key)
                continue
            misses += 1
            if capacity == 0:
                continue
            if len(resident) >= capacity:
                resident.popitem(last=False)
            resident[key] = None
        return misses
    next_uses: list[float] = [NEVER] * len(schedule)
    seen_at: dict[str, int] = {}
    for position in range(len(schedule) - 1, -1, -1):
        next_uses[position] = seen_at.get(schedule[position], NEVER)
        seen_at[schedule[position]] = position
    state: dict[str, tuple[float, int]] = {}  # resident key -> (next use, last use)
    heap: list[tuple[float, int, str]] = []  # (-next use, last use, key); stale entries skipped
    for position, key in enumerate(schedule):
        if key not in state:
            misses += 1
            if capacity == 0:
                continue
            if len(state) >= capacity:
                while True:
                    negated_next, last, victim = heapq.heappop(heap)
                    if state.get(victim) == (-negated_next, last):
                        break
                del state[victim]
        state[key] = (next_uses[position], position)
        heapq.heappush(heap, (-next_uses[position], position, key))
    return misses

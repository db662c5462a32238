"""The feature store interface and the guard rules every backend shares.

A producer ``put``s a sample's tensors and gets back a signed :class:`SampleRef`; only the ref
travels on the control plane; a consumer ``get``s the tensors back with it and ``release``s
it when done. :class:`FeatureStore` is that interface. :class:`GuardedStore` holds the rules,
so a backend implements only blob IO and the per-key metadata it must share (generation,
refcount, tombstone):

- every ref is checked against its HMAC (``BadRef``) and must name this store;
- a get of a released / aborted / garbage-collected sample fails (``SampleGone`` with the
  reason), never returns bytes; a ref of a key's older generation fails
  (``StaleGeneration``); bytes that do not hash to the ref's BLAKE3 digest fail
  (``HashMismatch``);
- a get returns tensors that share no memory with the store (clone on fetch);
- ``release`` is refcounted (``holders`` at put, ``retain`` adds one) and idempotent once
  freed; ``abort`` frees at once whatever the count;
- ``collect`` frees samples this store put that are held past ``max_age_s`` (injected clock);
- ``put`` applies backpressure: while the bytes this store holds plus the new sample exceed
  the high watermark, it waits until they drain to the low watermark, up to ``wait_s``, then
  raises ``Backpressure``.

The check order on get is: MAC, store, generation, tombstone, size, digest. One digest on
put and one on get; nothing is hashed twice. :meth:`GuardedStore.read_encoded` is a get
without the decode, for a server that hands the bytes on (and leaves the digest to its
client).
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.errors import (
    Backpressure,
    BadRef,
    FeatureAuthError,
    HashMismatch,
    SampleGone,
    StaleGeneration,
    StoreUnavailable,
)
from trainfleet.features.ref import (
    Encoded,
    SampleRef,
    check_key,
    check_sample_id,
    decode_tensors,
    digest_hex,
    encode_parts,
    sign_ref,
    verify_ref,
)

if TYPE_CHECKING:
    import torch

Clock = Callable[[], float]
POLL_S = 0.02  # how often a put blocked by backpressure re-reads state other processes change


class StoreStats(BaseModel):
    """Counters of one store object (this process's view)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    held_refs: int = Field(description="Samples this store put that are still live.")
    held_bytes: int = Field(description="Their encoded bytes (what the watermarks count).")
    high_watermark_bytes: int | None = Field(description="A put waits above this; None: off.")
    low_watermark_bytes: int | None = Field(description="... until held bytes drain to this.")
    puts: int = Field(description="Successful puts.")
    gets: int = Field(description="Successful gets.")
    released: int = Field(description="Samples freed by a release through this store.")
    aborted: int = Field(description="Samples freed by an abort through this store.")
    collected: int = Field(description="Samples freed by collect() (held past max_age_s).")
    waited_s: float = Field(description="Seconds puts spent blocked by backpressure.")
    waiting_puts: int = Field(default=0, description="Puts blocked by backpressure now.")


class FeatureStore(abc.ABC):
    """Where a pipeline's samples live between producer and consumer."""

    address: str

    @abc.abstractmethod
    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        key: str | None = None,
        holders: int = 1,
        wait_s: float | None = None,
    ) -> SampleRef:
        """Publish ``tensors`` under ``key`` (default: the sample id) as its next generation,
        held by ``holders`` releases; return the signed ref."""

    @abc.abstractmethod
    def get(self, ref: SampleRef, *, clone: bool = True) -> dict[str, torch.Tensor]:
        """The tensors ``ref`` names, checked against it; fresh memory when ``clone``."""

    @abc.abstractmethod
    def release(self, ref: SampleRef) -> bool:
        """Drop one hold; True if this call freed the bytes. An already freed ref: False."""

    @abc.abstractmethod
    def abort(self, ref: SampleRef) -> None:
        """Free the sample now, whatever its refcount (the producer withdraws it)."""

    @abc.abstractmethod
    def retain(self, ref: SampleRef) -> None:
        """Add one hold (another holder will release it)."""

    @abc.abstractmethod
    def collect(self, now: float | None = None) -> int:
        """Free the samples held past ``max_age_s``; return how many."""

    @abc.abstractmethod
    def stats(self) -> StoreStats: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Held:
    generation: int
    size: int
    created_at: float


def check_state(key: str, generation: int, current: int | None, gone: str | None) -> None:
    """Raise what a ref of ``generation`` meets when ``key`` is at ``current`` (None: the key
    was never put here) and that generation is freed with reason ``gone`` (None: live)."""
    if current is None:
        raise SampleGone(f"{key}: no such sample in this store", reason="unknown")
    if generation != current:
        raise StaleGeneration(
            f"{key}: ref generation {generation}, the key is at generation {current}",
            reason="stale",
        )
    if gone is not None:
        raise SampleGone(f"{key}: generation {generation} was {gone}", reason=gone)


class GuardedStore(FeatureStore):
    """The guard rules over a backend's blob IO. Subclasses implement the ``_`` methods below;
    each must be atomic with respect to the others, across every process that shares the
    backend's state."""

    def __init__(
        self,
        *,
        address: str,
        secret: bytes,
        pipeline: str = "local",
        high_watermark_bytes: int | None = None,
        low_watermark_bytes: int | None = None,
        max_age_s: float | None = None,
        clock: Clock = time.time,
    ):
        if not secret:
            raise FeatureAuthError("a feature store needs a non-empty pipeline secret")
        if high_watermark_bytes is not None:
            if low_watermark_bytes is None:
                low_watermark_bytes = high_watermark_bytes
            if not 0 <= low_watermark_bytes <= high_watermark_bytes:
                raise ValueError("want 0 <= low_watermark_bytes <= high_watermark_bytes")
        elif low_watermark_bytes is not None:
            raise ValueError("low_watermark_bytes without high_watermark_bytes")
        # Refs name this address. A store served by another process (FeatureServer) sets it
        # to the address consumers reach it at, before its first put.
        self.address = address
        self.pipeline = pipeline
        self.high_watermark_bytes = high_watermark_bytes
        self.low_watermark_bytes = low_watermark_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        self._secret = bytes(secret)
        self._cond = threading.Condition(threading.Lock())
        self._held: dict[str, _Held] = {}  # key -> the live generation this store put
        self._reserved_bytes = 0  # admitted puts not yet published
        self._closed = False
        self._puts = self._gets = self._released = self._aborted = self._collected = 0
        self._waited_s = 0.0
        self._waiting = 0

    # --- what a backend implements -------------------------------------------------------

    @abc.abstractmethod
    def _publish(self, key: str, data: Encoded, holders: int) -> tuple[int, str]:
        """Store ``data`` as the key's next generation with ``holders`` holds, freeing the
        previous generation; return (generation, content digest of the bytes)."""

    @abc.abstractmethod
    def _read(self, key: str, generation: int, size: int) -> bytes | bytearray:
        """The blob's bytes (a bytearray nobody else holds, or immutable bytes). Raise as
        :func:`check_state` says, or ``HashMismatch`` if the blob is not ``size`` bytes."""

    def _read_hashed(self, key: str, generation: int, size: int) -> tuple[bytes | bytearray, str]:
        """:meth:`_read` and the content digest of what it read (a backend may hash as it
        reads)."""
        data = self._read(key, generation, size)
        return data, digest_hex(data)

    @abc.abstractmethod
    def _unref(self, key: str, generation: int) -> bool:
        """Drop one hold; at zero free the blob (reason "released"). True if freed now.
        False, changing nothing, if that generation is not live."""

    @abc.abstractmethod
    def _retain(self, key: str, generation: int) -> None:
        """Add one hold, or raise as :func:`check_state` says."""

    @abc.abstractmethod
    def _free(self, key: str, generation: int, reason: str) -> bool:
        """Free the blob now with a tombstone saying ``reason``; False if it was not live."""

    @abc.abstractmethod
    def _is_live(self, key: str, generation: int) -> bool: ...

    def _close(self) -> None:
        """Release the backend's resources."""

    # --- the rules ---------------------------------------------------------------------

    def _check(self, ref: SampleRef) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self.address}: the store is closed", reason="closed")
        verify_ref(ref, self._secret)
        if ref.store != self.address:
            raise BadRef(
                f"sample {ref.sample_id}: ref names store {ref.store}, this is {self.address}",
                reason="other_store",
            )

    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        key: str | None = None,
        holders: int = 1,
        wait_s: float | None = None,
    ) -> SampleRef:
        if self._closed:
            raise StoreUnavailable(f"{self.address}: the store is closed", reason="closed")
        check_sample_id(sample_id)
        key = sample_id if key is None else key
        check_key(key)
        if holders < 1:
            raise ValueError(f"holders must be >= 1, got {holders}")
        data = encode_parts(tensors)
        self._admit(data.size, wait_s)
        try:
            generation, digest = self._publish(key, data, holders)
        finally:
            with self._cond:
                self._reserved_bytes -= data.size
                self._cond.notify_all()
        with self._cond:
            self._held[key] = _Held(generation, data.size, self.clock())
            self._puts += 1
        return sign_ref(
            store=self.address,
            pipeline=self.pipeline,
            sample_id=sample_id,
            key=key,
            generation=generation,
            digest=digest,
            size=data.size,
            secret=self._secret,
        )

    def get(self, ref: SampleRef, *, clone: bool = True) -> dict[str, torch.Tensor]:
        # Every backend decodes into memory of its own (a private buffer, or a copy of
        # immutable bytes), so clone=False shares nothing either: it only permits sharing.
        return decode_tensors(self.read_encoded(ref))

    def read_encoded(self, ref: SampleRef, *, verify: bool = True) -> bytes | bytearray:
        """The encoded (safetensors) bytes ``ref`` names, after every check of :meth:`get`:
        MAC, store, generation, tombstone, size and, when ``verify``, the content digest.
        ``verify=False`` leaves the digest to whoever receives the bytes (a ``FeatureServer``:
        its client hashes what arrives, one hash per transfer). Counts as a get. The result is
        a buffer nobody else holds, or immutable bytes: the caller must not write to it
        unless it is a ``bytearray``."""
        self._check(ref)
        if verify:
            data, digest = self._read_hashed(ref.key, ref.generation, ref.size)
        else:
            data, digest = self._read(ref.key, ref.generation, ref.size), ref.digest
        if len(data) != ref.size:
            raise HashMismatch(
                f"{ref.key}: read {len(data)} bytes, the ref says {ref.size}", reason="size"
            )
        if digest != ref.digest:
            raise HashMismatch(
                f"{ref.key}: bytes read do not hash to the ref's digest", reason="digest"
            )
        with self._cond:
            self._gets += 1
        return data

    def release(self, ref: SampleRef) -> bool:
        self._check(ref)
        freed = self._unref(ref.key, ref.generation)
        self._forget(ref, freed, "released")
        return freed

    def abort(self, ref: SampleRef) -> None:
        self._check(ref)
        freed = self._free(ref.key, ref.generation, "aborted")
        self._forget(ref, freed, "aborted")

    def retain(self, ref: SampleRef) -> None:
        self._check(ref)
        self._retain(ref.key, ref.generation)

    def collect(self, now: float | None = None) -> int:
        if self.max_age_s is None or self._closed:
            return 0
        now = self.clock() if now is None else now
        with self._cond:
            old = [
                (key, h.generation)
                for key, h in self._held.items()
                if now - h.created_at > self.max_age_s
            ]
        freed = 0
        for key, generation in old:
            if self._free(key, generation, "expired"):
                freed += 1
        with self._cond:
            for key, generation in old:
                held = self._held.get(key)
                if held is not None and held.generation == generation:
                    del self._held[key]
            self._collected += freed
            self._cond.notify_all()
        return freed

    def stats(self) -> StoreStats:
        with self._cond:
            self._refresh_locked()
            return StoreStats(
                held_refs=len(self._held),
                held_bytes=sum(h.size for h in self._held.values()),
                high_watermark_bytes=self.high_watermark_bytes,
                low_watermark_bytes=self.low_watermark_bytes,
                puts=self._puts,
                gets=self._gets,
                released=self._released,
                aborted=self._aborted,
                collected=self._collected,
                waited_s=self._waited_s,
                waiting_puts=self._waiting,
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        self._close()

    # --- bookkeeping -------------------------------------------------------------------

    def _forget(self, ref: SampleRef, freed: bool, how: str) -> None:
        with self._cond:
            held = self._held.get(ref.key)
            if freed and held is not None and held.generation == ref.generation:
                del self._held[ref.key]
            if freed and how == "released":
                self._released += 1
            elif freed:
                self._aborted += 1
            self._cond.notify_all()

    def _refresh_locked(self) -> None:
        """Drop held samples another process (or store object) freed or superseded."""
        for key in [k for k, h in self._held.items() if not self._is_live(k, h.generation)]:
            del self._held[key]

    def _held_bytes_locked(self) -> int:
        return sum(h.size for h in self._held.values()) + self._reserved_bytes

    def _admit(self, size: int, wait_s: float | None) -> None:
        """Reserve ``size`` bytes under the watermarks, waiting as the rules say."""
        high, low = self.high_watermark_bytes, self.low_watermark_bytes
        with self._cond:
            if high is None or low is None or self._held_bytes_locked() + size <= high:
                self._reserved_bytes += size
                return
            start = time.monotonic()
            deadline = None if wait_s is None else start + wait_s
            self._waiting += 1
            try:
                while True:
                    self._refresh_locked()
                    held = self._held_bytes_locked()
                    if held <= low:
                        break
                    if self._closed:
                        raise StoreUnavailable(
                            f"{self.address}: the store is closed", reason="closed"
                        )
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise Backpressure(
                            f"{self.address}: {held} bytes held over the high watermark "
                            f"{high}; waited {time.monotonic() - start:.3f}s for them to "
                            f"drain to {low}",
                            reason="high_watermark",
                        )
                    self._cond.wait(POLL_S if left is None else min(left, POLL_S))
            finally:
                self._waiting -= 1
                self._waited_s += time.monotonic() - start
            self._reserved_bytes += size

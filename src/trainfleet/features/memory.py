"""The in-process feature store: samples as immutable bytes in a dict.

Used when producer and consumer share a process (colocated mode, library tests) and as the
producer-side store that a ``FeatureServer`` serves over HTTP. It keeps the encoded bytes,
not the tensors, so the digest check on get means the same here as on every other backend,
and a get decodes into fresh memory (clone on fetch). Every store registers its
``mem:<id>`` address in a process-local registry, so ``open_store`` can find it again.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from trainfleet.errors import HashMismatch
from trainfleet.features.ref import Encoded, digest_hex
from trainfleet.features.store import GuardedStore, check_state

_REGISTRY: weakref.WeakValueDictionary[str, InProcessStore] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def lookup(address: str) -> InProcessStore | None:
    """The open in-process store of this process registered at ``address``."""
    with _REGISTRY_LOCK:
        return _REGISTRY.get(address)


@dataclass
class _Entry:
    generation: int
    refs: int
    gone: str | None  # None while live, else why it was freed
    data: bytes | None


class InProcessStore(GuardedStore):
    """A :class:`GuardedStore` over a dict. ``address`` defaults to its ``mem:<id>``; a store
    served over HTTP is given (or later assigned) the server's address instead."""

    def __init__(self, *, secret: bytes, address: str | None = None, **guards: Any):
        self.mem_address = f"mem:{uuid.uuid4().hex}"
        super().__init__(address=address or self.mem_address, secret=secret, **guards)
        self._entries: dict[str, _Entry] = {}
        self._mem_lock = threading.Lock()
        with _REGISTRY_LOCK:
            _REGISTRY[self.mem_address] = self

    def _publish(self, key: str, encoded: Encoded, holders: int) -> tuple[int, str]:
        data = encoded.to_bytes()  # the store's own copy: the caller may reuse its tensors
        digest = digest_hex(data)
        with self._mem_lock:
            old = self._entries.get(key)
            generation = 1 if old is None else old.generation + 1
            self._entries[key] = _Entry(generation, holders, None, data)
        return generation, digest

    def _read(self, key: str, generation: int, size: int) -> bytes:
        with self._mem_lock:
            entry = self._entries.get(key)
            if entry is None:
                check_state(key, generation, None, None)
            assert entry is not None
            check_state(key, generation, entry.generation, entry.gone)
            assert entry.data is not None
            data = entry.data
        if len(data) != size:
            raise HashMismatch(
                f"{key}: stored {len(data)} bytes, the ref says {size}", reason="size"
            )
        return data

    def _live(self, key: str, generation: int) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.generation != generation or entry.gone is not None:
            return None
        return entry

    def _unref(self, key: str, generation: int) -> bool:
        with self._mem_lock:
            entry = self._live(key, generation)
            if entry is None:
                return False
            entry.refs -= 1
            if entry.refs > 0:
                return False
            entry.gone, entry.data = "released", None
            return True

    def _retain(self, key: str, generation: int) -> None:
        with self._mem_lock:
            entry = self._entries.get(key)
            check_state(
                key,
                generation,
                None if entry is None else entry.generation,
                None if entry is None else entry.gone,
            )
            assert entry is not None
            entry.refs += 1

    def _free(self, key: str, generation: int, reason: str) -> bool:
        with self._mem_lock:
            entry = self._live(key, generation)
            if entry is None:
                return False
            entry.refs, entry.gone, entry.data = 0, reason, None
            return True

    def _is_live(self, key: str, generation: int) -> bool:
        with self._mem_lock:
            return self._live(key, generation) is not None

    def _close(self) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self.mem_address, None)
        with self._mem_lock:
            self._entries.clear()

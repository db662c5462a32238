"""The data plane of disaggregated pipelines: a feature store for producer -> consumer tensors.

A producer job ``put``s each sample's tensors into a :class:`FeatureStore` and publishes the
signed :class:`SampleRef` it gets back on the control plane; a consumer job opens the store
the ref names (:func:`open_store`), ``get``s the tensors and ``release``s the ref. The
control plane never carries tensor bytes, only refs. Backends:

- :class:`InProcessStore` (``mem:<id>``): a dict, for colocated producer and consumer;
- :class:`SharedDirStore` (``dir:<abs path>``): a directory shared by processes (tmpfs for
  one host, a shared filesystem across hosts);
- ``HttpStore`` (``http(s)://host:port``, :mod:`trainfleet.features.http`): gets from the
  producer's ``FeatureServer``.

Every backend enforces the same guards (:mod:`trainfleet.features.store`): HMAC-checked refs,
use-after-free and stale-generation refusal, content hashes, clone on fetch, refcounts, GC of
old refs, backpressure. :func:`run_interleavings` checks them against a reference model.

An RDMA backend (e.g. Mooncake's transfer engine) fits the same seam: ``put`` registers the
encoded bytes in pinned memory and returns a ref whose ``store`` is the engine's segment
address; ``get`` is a one-sided read into a local buffer followed by the same digest check;
``release`` / ``abort`` travel as small control messages to the producer, which owns the
refcount and tombstones exactly as :class:`GuardedStore` does here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainfleet.errors import StoreUnavailable
from trainfleet.features.memory import InProcessStore, lookup
from trainfleet.features.ref import SampleRef, decode_tensors, encode_tensors, sign_ref, verify_ref
from trainfleet.features.shared_dir import SharedDirStore
from trainfleet.features.store import FeatureStore, GuardedStore, StoreStats

if TYPE_CHECKING:
    from trainfleet.features.interleave import InterleaveReport, run_interleavings


def __getattr__(name: str) -> Any:
    """The interleaving checker on first use: it imports torch, which the coordinator (a
    user of the refs alone) never needs to load."""
    if name in ("InterleaveReport", "run_interleavings"):
        from trainfleet.features import interleave

        return getattr(interleave, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(address: str, secret: bytes, **kw: Any) -> FeatureStore:
    """The store at ``address`` (as a ref's ``store`` names it): "dir:PATH" opens a
    :class:`SharedDirStore`, "http(s)://..." an ``HttpStore``, "mem:<id>" finds the open
    :class:`InProcessStore` of this process. ``kw`` goes to the constructor."""
    if address.startswith("dir:"):
        return SharedDirStore(address[len("dir:") :], secret=secret, **kw)
    if address.startswith(("http://", "https://")):
        from trainfleet.features.http import HttpStore  # imports httpx only when needed

        return HttpStore(address, secret, **kw)
    if address.startswith("mem:"):
        store = lookup(address)
        if store is None:
            raise StoreUnavailable(
                f"{address}: no such in-process store here (closed, or in another process)",
                reason="not_registered",
            )
        return store
    raise StoreUnavailable(f"{address!r}: not a feature store address", reason="bad_address")


__all__ = [
    "FeatureStore",
    "GuardedStore",
    "InProcessStore",
    "InterleaveReport",
    "SampleRef",
    "SharedDirStore",
    "StoreStats",
    "decode_tensors",
    "encode_tensors",
    "open_store",
    "run_interleavings",
    "sign_ref",
    "verify_ref",
]

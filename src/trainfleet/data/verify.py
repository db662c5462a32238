"""Routers from specs, and verifiable routing: re-fit, compare digests, refuse a wrong one.

A routed dataset's router is a pure function of its spec (``router.fit_router`` is integer
arithmetic over the first ``sample_documents`` training documents), so a worker handed a
router by the coordinator need not trust it: ``verify_router`` re-fits it from the spec and
compares digests. A mismatch raises ``RoutingMismatch``, which the worker reports as a fatal,
non-retried failure. A router that cannot be re-fit here (the source is unavailable) is used
with a warning. Verification is remembered per (fit id, router digest) in a directory, so it
runs once per spec on a worker, not once per shard or per attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from trainfleet.data.router import Router, fit_router
from trainfleet.data.shards import training_tokens
from trainfleet.data.spec import DatasetSpec, canonical, content_fields
from trainfleet.errors import RoutingMismatch, SourceUnavailable

log = logging.getLogger(__name__)
Verdict = Literal["verified", "already-verified", "unverifiable"]


def router_fit_id(spec: DatasetSpec) -> str:
    """What a router is fit on: the dataset's content fields except the shard size."""
    fields = {k: v for k, v in content_fields(spec).items() if k != "shard_tokens"}
    return hashlib.sha256(canonical(fields)).hexdigest()


def fit_router_for(spec: DatasetSpec) -> Router:
    """Fit the spec's router from the spec alone (streams the first training documents)."""
    if spec.router is None:
        raise ValueError(f"dataset {spec.name!r} has no router")
    return fit_router(spec.router, router_fit_id(spec), training_tokens(spec))


def check_router_claims(spec: DatasetSpec, router: Router) -> None:
    """A router must say it was fit on this spec with these parameters (cheap, always run)."""
    if spec.router is None:
        raise RoutingMismatch(f"dataset {spec.name!r} has no router, but one was handed over")
    if router.fit_id != router_fit_id(spec):
        raise RoutingMismatch(
            f"the router handed over for dataset {spec.name!r} was fit on other data "
            f"(fit id {router.fit_id[:12]}, the spec's is {router_fit_id(spec)[:12]})"
        )
    claimed, pinned = router.spec.model_dump(), spec.router.model_dump()
    changed = sorted(k for k in pinned if claimed.get(k) != pinned[k])
    if changed:
        details = ", ".join(f"{k} {claimed.get(k)!r} != {pinned[k]!r}" for k in changed)
        raise RoutingMismatch(
            f"the router handed over for dataset {spec.name!r} has other fit parameters than "
            f"the spec: {details}"
        )


class RoutingVerifier:
    """Re-fits handed routers and refuses wrong ones; remembers what it verified."""

    def __init__(
        self, directory: Path | None, refit: Callable[[DatasetSpec], Router] | None = None
    ):
        self.directory = directory
        self.refit = refit or fit_router_for
        self._verified: set[str] = set()

    def _marker(self, spec: DatasetSpec, router: Router) -> str:
        return f"{router_fit_id(spec)}-{router.digest}"

    def verify(self, spec: DatasetSpec, router: Router) -> Verdict:
        """Check ``router`` against a re-fit of ``spec``. Raises ``RoutingMismatch``."""
        check_router_claims(spec, router)
        marker = self._marker(spec, router)
        marker_file = self.directory / marker if self.directory is not None else None
        if marker in self._verified or (marker_file is not None and marker_file.exists()):
            self._verified.add(marker)
            return "already-verified"
        try:
            refit = self.refit(spec)
        except SourceUnavailable as err:
            log.warning(
                "cannot verify the router of dataset %r (%s); using it unverified", spec.name, err
            )
            return "unverifiable"
        if refit.digest != router.digest:
            raise RoutingMismatch(
                f"routing verification failed for dataset {spec.name!r}: the router handed "
                f"over has digest {router.digest[:16]}, a re-fit from the spec gives "
                f"{refit.digest[:16]}; refusing to train on its shards"
            )
        self._verified.add(marker)
        if marker_file is not None:
            marker_file.parent.mkdir(parents=True, exist_ok=True)
            marker_file.write_text(json.dumps({"dataset": spec.name, "digest": router.digest}))
        return "verified"

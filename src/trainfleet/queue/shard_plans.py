"""The coordinator's own shard plan of a dataset: what the shard ledger checks results against.

A dataset's shards and their content hashes are a pure function of its spec (see
``data.shards``), so the coordinator need not take the first reporter's word for them: it
plans the shards itself, streaming the source once and hashing, without keeping any shard's
bytes or building a training tensor. A routed dataset's router is fit here too (it is a pure
function of the spec as well). The plan is made once per dataset digest, at the first
completion of a job on that dataset, and stored by the queue.

Planning is bounded: it runs in the caller's thread (a request's threadpool thread, never
the event loop), outside the queue's write lock, and stops at ``budget_s``. What the
coordinator cannot plan (a Hugging Face dataset, files it does not have, a pin this Python does
not meet, a dataset too large for the budget) is recorded as *unverified* with the reason:
the ledger then falls back to the first report, and flags every job checked that way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from trainfleet.data.spec import DatasetSpec, dataset_digest
from trainfleet.errors import DataError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
PlanStatus = Literal["planned", "unverified"]
MAX_ROUTER_FEATURE_BYTES = 256 << 20  # a router fit's feature matrix, at most, on the coordinator


@dataclass(frozen=True)
class ExpectedShards:
    """The coordinator's plan of one dataset: every shard's sha256 by key, or why none."""

    digest: str
    status: PlanStatus
    detail: str  # the reason when unverified; a summary when planned
    shards: dict[str, str]  # shard key -> sha256 (empty when unverified)


def _unverified(digest: str, reason: str) -> ExpectedShards:
    return ExpectedShards(digest=digest, status="unverified", detail=reason, shards={})


def plan_expected_shards(spec: DatasetSpec, budget_s: float) -> ExpectedShards:
    """Plan ``spec``'s shards here, within ``budget_s`` seconds (router fit included)."""
    digest = dataset_digest(spec)
    if spec.source == "huggingface":
        return _unverified(digest, "the coordinator does not download Hugging Face datasets")
    if spec.router is not None:
        feature_bytes = spec.router.sample_documents * spec.router.num_features * 8
        if feature_bytes > MAX_ROUTER_FEATURE_BYTES:
            return _unverified(
                digest,
                f"fitting its router needs {feature_bytes >> 20} MiB of features, more than the"
                f" coordinator's {MAX_ROUTER_FEATURE_BYTES >> 20} MiB",
            )
    # The data plane (numpy, the router) is imported only by a coordinator that plans.
    from trainfleet.data.router import fit_router
    from trainfleet.data.shards import plan_shards
    from trainfleet.data.verify import router_fit_id

    started = time.monotonic()
    deadline = started + budget_s
    try:
        router = None
        if spec.router is not None:
            router = fit_router(spec.router, router_fit_id(spec), _until(spec, deadline))
        plan = plan_shards(spec, router, deadline=deadline)
    except TimeoutError:
        return _unverified(digest, f"planning took longer than {budget_s:g}s on the coordinator")
    except DataError as err:  # a missing source, an unmet pin: what this host cannot read
        return _unverified(digest, f"the coordinator cannot read the source ({err})")
    elapsed_s = time.monotonic() - started
    log.info("planned %d shards of dataset %r in %.2fs", len(plan.shards), spec.name, elapsed_s)
    return ExpectedShards(
        digest=digest,
        status="planned",
        detail=f"{len(plan.shards)} shards planned by the coordinator in {elapsed_s:.2f}s",
        shards={s.key: s.sha256 for s in plan.shards},
    )


def _until(spec: DatasetSpec, deadline: float) -> Iterator[np.ndarray]:
    """The training tokens a router is fit on, stopping with ``TimeoutError`` at the deadline."""
    from trainfleet.data.shards import training_tokens

    for tokens in training_tokens(spec):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fitting the router of {spec.name!r} ran past its deadline")
        yield tokens

"""Get a dataset ready on a worker: its router (handed over, verified, or fit here), its shard
plan, and a bounded shard cache that rebuilds any shard from the spec on demand.

Everything lives under one cache directory on the worker (``trainfleet join --cache-dir``)::

    CACHE/routers/FIT_ID.json      routers fit here (re-used by later jobs on the same spec)
    CACHE/plans/DIGEST-ROUTER.json shard plans (document ranges and content hashes)
    CACHE/verified/FIT_ID-DIGEST   routers this worker re-fit and found equal
    CACHE/shards/                  the shard cache's disk tier, bounded by --cache-gib

The bounds are the volunteer's own (``--max-shards``, ``--cache-gib``) and never part of a
published spec: they change what is kept, not what is trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet import env
from trainfleet.data.cache import ShardCache
from trainfleet.data.router import Router
from trainfleet.data.shards import (
    ShardInfo,
    ShardPlan,
    load_plan,
    materialize_shard,
    plan_shards,
    save_plan,
    write_json,
)
from trainfleet.data.spec import DatasetSpec, dataset_digest
from trainfleet.data.verify import (
    RoutingVerifier,
    check_router_claims,
    fit_router_for,
    router_fit_id,
)

GIB = 1 << 30


@dataclass(frozen=True)
class CacheSettings:
    """Where a worker keeps data and how much: the ``join`` flags, passed to jobs by env."""

    directory: Path | None
    max_bytes: int = int(env.DEFAULT_CACHE_GIB * GIB)
    max_shards: int = env.DEFAULT_MAX_SHARDS
    verify_routing: bool = False

    def to_env(self) -> dict[str, str]:
        values = {
            env.CACHE_BYTES: str(self.max_bytes),
            env.MAX_SHARDS: str(self.max_shards),
            env.VERIFY_ROUTING: "1" if self.verify_routing else "0",
        }
        if self.directory is not None:
            values[env.CACHE_DIR] = str(self.directory)
        return values

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CacheSettings:
        environ = dict(os.environ if environ is None else environ)
        directory = environ.get(env.CACHE_DIR)
        return cls(
            directory=Path(directory) if directory else None,
            max_bytes=int(environ.get(env.CACHE_BYTES, int(env.DEFAULT_CACHE_GIB * GIB))),
            max_shards=int(environ.get(env.MAX_SHARDS, env.DEFAULT_MAX_SHARDS)),
            verify_routing=environ.get(env.VERIFY_ROUTING, "0") == "1",
        )


@dataclass
class PreparedDataset:
    spec: DatasetSpec
    router: Router | None
    routing: str  # unrouted | fit-here | trusted | verified | already-verified | unverifiable
    plan: ShardPlan
    cache: ShardCache

    def cache_key(self, shard: ShardInfo) -> str:
        return f"{self.plan.digest}/{shard.key}"

    def read(self, shard: ShardInfo) -> bytes:
        """A shard's bytes: from memory, from disk, or rebuilt from the spec (hash-checked)."""
        return self.cache.get(self.cache_key(shard), shard.sha256)

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.spec.name,
            "digest": self.plan.digest,
            "router_digest": self.plan.router_digest,
            "routing": self.routing,
        }


def obtain_router(
    spec: DatasetSpec,
    settings: CacheSettings,
    handed: dict[str, Any] | None,
    log: Callable[[str], None],
) -> tuple[Router | None, str]:
    """The router to route with and how it was obtained. Raises ``RoutingMismatch``."""
    if spec.router is None:
        return None, "unrouted"
    directory = settings.directory
    if handed is not None:
        router = Router.from_json(handed)
        check_router_claims(spec, router)
        if not settings.verify_routing:
            return router, "trusted"
        log(f"verifying the router of {spec.name!r} by re-fitting it from the spec")
        verifier = RoutingVerifier(directory / "verified" if directory else None)
        return router, verifier.verify(spec, router)
    fit_id = router_fit_id(spec)
    cached = directory / "routers" / f"{fit_id}.json" if directory else None
    if cached is not None and cached.exists():
        router = Router.from_json(json.loads(cached.read_text()))
        check_router_claims(spec, router)
        return router, "fit-here"
    log(
        f"fitting the router of {spec.name!r}: {spec.router.num_paths} paths over the first "
        f"{spec.router.sample_documents} training documents"
    )
    router = fit_router_for(spec)
    if cached is not None:
        write_json(cached, router.to_json())
    return router, "fit-here"


def prepare_dataset(
    spec: DatasetSpec,
    settings: CacheSettings,
    *,
    handed_router: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> PreparedDataset:
    """Router, plan and cache for ``spec`` on this worker (see the module doc for the layout)."""
    router, routing = obtain_router(spec, settings, handed_router, log)
    directory = settings.directory
    digest = dataset_digest(spec)
    plan_file = (
        directory / "plans" / f"{digest}-{router.digest if router else 'unrouted'}.json"
        if directory
        else None
    )
    plan = load_plan(plan_file) if plan_file is not None and plan_file.exists() else None
    if plan is None:
        log(f"planning the shards of {spec.name!r} (one streaming pass over the source)")
        plan = plan_shards(spec, router)
        if plan_file is not None:
            save_plan(plan, plan_file)
    by_key = {f"{plan.digest}/{s.key}": s for s in plan.shards}
    cache = ShardCache(
        directory / "shards" if directory else None,
        max_bytes=settings.max_bytes,
        max_shards=settings.max_shards,
        build=lambda key: materialize_shard(spec, by_key[key]),
    )
    return PreparedDataset(spec=spec, router=router, routing=routing, plan=plan, cache=cache)

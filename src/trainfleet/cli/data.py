"""``trainfleet data``: look at a dataset spec, fit and publish its router, verify what was used.

Every command takes the manifest and the dataset's name (optional when the manifest declares
one dataset); they read the source on this machine, exactly as a worker would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from trainfleet import env
from trainfleet.cli.common import (
    DEFAULT_STATE,
    JsonOpt,
    StateOpt,
    TokenOpt,
    UrlOpt,
    client,
    console,
    errors,
    fail,
    print_json,
)

app = typer.Typer(
    name="data",
    help=(
        "Dataset specs: inspect one, fit and publish its router, verify a router or a job's "
        "shard hashes against a re-materialization here."
    ),
    no_args_is_help=True,
)

ManifestArg = Annotated[Path, typer.Argument(help="The TOML manifest declaring the dataset.")]
NameArg = Annotated[
    str | None, typer.Argument(help="Dataset name ([datasets.NAME]); optional if only one.")
]
CacheOpt = Annotated[
    Path,
    typer.Option("--cache-dir", help="Where routers, plans and shards are cached here."),
]
DEFAULT_CACHE = Path(".trainfleet-data")


def _spec(manifest: Path, name: str | None) -> Any:
    from trainfleet.manifest import load_manifest

    datasets = load_manifest(manifest).datasets
    if not datasets:
        fail(f"{manifest} declares no [datasets.NAME] table")
    if name is None:
        if len(datasets) > 1:
            fail(f"{manifest} declares {len(datasets)} datasets; name one: {sorted(datasets)}")
        return next(iter(datasets.values()))
    if name not in datasets:
        fail(f"{manifest} has no dataset {name!r}; it has {sorted(datasets)}")
    return datasets[name]


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return ", ".join(f"{v:.4f}" for v in value)
    return str(value)


def _log(line: str) -> None:
    console.print(f"[dim]{line}[/]", highlight=False)


@app.command()
def inspect(
    manifest: ManifestArg,
    name: NameArg = None,
    consumers: Annotated[
        int, typer.Option(help="Also show how the training shards split across N consumers.")
    ] = 0,
    max_rows: Annotated[int, typer.Option(help="Shard rows to print (0 = all).")] = 20,
    cache_dir: CacheOpt = DEFAULT_CACHE,
    as_json: JsonOpt = False,
) -> None:
    """Documents, tokens, the loss floor (synthetic), source pins, router and shard hashes."""
    from trainfleet.data.dialects import documents_floor_nats
    from trainfleet.data.partition import assign
    from trainfleet.data.prepare import CacheSettings, prepare_dataset
    from trainfleet.data.sources import check_source
    from trainfleet.data.spec import SyntheticDataset

    with errors():
        spec = _spec(manifest, name)
        facts = check_source(spec)
        prepared = prepare_dataset(
            spec, CacheSettings(directory=cache_dir), log=_log if not as_json else lambda _: None
        )
    plan = prepared.plan
    train = plan.select("train")
    report: dict[str, Any] = {
        **prepared.describe(),
        "source": spec.source,
        "facts": facts,
        "num_documents": plan.num_documents,
        "num_tokens": plan.num_tokens,
        "num_paths": plan.num_paths,
        "shards": [
            {"key": s.key, "documents": s.num_documents, "tokens": s.num_tokens, "sha256": s.sha256}
            for s in plan.shards
        ],
    }
    if consumers > 0:
        report["consumers"] = assign([s.key for s in train], consumers)
    if isinstance(spec, SyntheticDataset) and plan.num_paths > 1:
        report["path_floors_nats"] = {
            path: documents_floor_nats(
                spec, [i for s in plan.shards if s.path == path for i in s.doc_indices()]
            )
            for path in range(plan.num_paths)
        }
    if as_json:
        print_json(report)
        return
    console.print(
        f"[bold]{spec.name}[/] ({spec.source}), digest {plan.digest[:16]}: "
        f"{plan.num_documents:,} documents, {plan.num_tokens:,} tokens, "
        f"{len(plan.shards)} shards, {plan.num_paths} path(s)",
        highlight=False,
    )
    for key, value in facts.items():
        console.print(f"  {key}: {_shown(value)}", highlight=False)
    for path, floor in report.get("path_floors_nats", {}).items():
        console.print(f"  loss floor of path {path}: {floor:.4f} nats/token", highlight=False)
    if prepared.router is not None:
        console.print(
            f"  router: {prepared.router.method}, digest {prepared.router.digest[:16]}",
            highlight=False,
        )
    table = Table("shard", "documents", "tokens", "sha256")
    rows = plan.shards if max_rows == 0 else plan.shards[:max_rows]
    for s in rows:
        table.add_row(s.key, f"{s.num_documents:,}", f"{s.num_tokens:,}", s.sha256[:16])
    console.print(table)
    if len(rows) < len(plan.shards):
        console.print(f"  ... {len(plan.shards) - len(rows)} more (--max-rows 0 for all)")
    for consumer, keys in enumerate(report.get("consumers", [])):
        console.print(f"  consumer {consumer}/{consumers}: {len(keys)} shards", highlight=False)


@app.command("fit-router")
def fit_router(
    manifest: ManifestArg,
    name: NameArg = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the router JSON here.")
    ] = None,
    publish: Annotated[
        bool, typer.Option("--publish", help="Publish it to the coordinator for workers.")
    ] = False,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    as_json: JsonOpt = False,
) -> None:
    """Fit the dataset's k-means router from its spec; print its digest; write or publish it."""
    from trainfleet.data.verify import fit_router_for

    with errors():
        spec = _spec(manifest, name)
        if spec.router is None:
            fail(f"dataset {spec.name!r} has no [datasets.{spec.name}.router] table")
        started = time.perf_counter()
        router = fit_router_for(spec)
        fit_s = time.perf_counter() - started
        body = router.to_json()
        if output is not None:
            output.write_text(json.dumps(body) + "\n")
        if publish:
            with client(url, token, state_dir) as c:
                c.publish_router(router.fit_id, body)
    summary = {
        "dataset": spec.name,
        "fit_id": router.fit_id,
        "digest": router.digest,
        "method": router.method,
        "num_paths": spec.router.num_paths,
        "num_sampled": router.num_sampled,
        "num_iterations": router.num_iterations,
        "fit_s": round(fit_s, 3),
        "output": str(output) if output else None,
        "published": publish,
    }
    if as_json:
        print_json(summary)
        return
    console.print(
        f"router of {spec.name!r}: {router.method}, {router.num_sampled} documents sampled, "
        f"{router.num_iterations} iterations, {fit_s:.2f}s\n  digest {router.digest}\n"
        f"  fit id {router.fit_id}"
        + (f"\n  written to {output}" if output else "")
        + ("\n  published to the coordinator" if publish else ""),
        highlight=False,
    )


@app.command()
def verify(
    manifest: ManifestArg,
    name: NameArg = None,
    router_file: Annotated[
        Path | None, typer.Option("--router", help="A router JSON file to check.")
    ] = None,
    published: Annotated[
        bool, typer.Option("--published", help="Check the router the coordinator hands out.")
    ] = False,
    job: Annotated[
        str | None,
        typer.Option(help="Re-materialize the shards this job reported and compare hashes."),
    ] = None,
    url: UrlOpt = env.DEFAULT_URL,
    token: TokenOpt = None,
    state_dir: StateOpt = DEFAULT_STATE,
    cache_dir: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Re-fit the router and compare digests, or re-check a job's shard hashes. Exit 1 on a
    mismatch."""
    from trainfleet.data.prepare import CacheSettings, prepare_dataset
    from trainfleet.data.router import Router
    from trainfleet.data.shards import materialize_shard
    from trainfleet.data.verify import RoutingVerifier, router_fit_id

    if not (router_file or published or job):
        fail("say what to verify: --router FILE, --published, or --job JOB")
    with errors():
        spec = _spec(manifest, name)
        handed: dict[str, Any] | None = None
        if router_file is not None:
            handed = json.loads(router_file.read_text())
        elif published:
            with client(url, token, state_dir) as c:
                handed = c.get_router(router_fit_id(spec))
            if handed is None:
                fail(f"the coordinator has no router published for {spec.name!r}")
        if handed is not None:
            verdict = RoutingVerifier(None).verify(spec, Router.from_json(handed))
            console.print(f"router of {spec.name!r}: {verdict}", highlight=False)
        if job is not None:
            with client(url, token, state_dir) as c:
                record = c.job(job)["job"]
            data = ((record.get("result") or {}).get("metrics") or {}).get("data") or {}
            reported = {s["key"]: s["sha256"] for s in data.get("shards", [])}
            if not reported:
                fail(f"job {job!r} reported no shard hashes")
            prepared = prepare_dataset(spec, CacheSettings(directory=cache_dir), log=_log)
            if data.get("digest") != prepared.plan.digest:
                fail(f"job {job!r} trained on another spec (digest {data.get('digest')})")
            by_key = {s.key: s for s in prepared.plan.shards}
            bad = []
            for key, sha in sorted(reported.items()):
                shard = by_key.get(key)
                if shard is None or shard.sha256 != sha:
                    bad.append(key)
                else:
                    materialize_shard(spec, shard)  # raises ShardMismatch if the source moved
            if bad:
                fail(f"{len(bad)} of {len(reported)} shard hashes differ: {', '.join(bad[:10])}")
            console.print(
                f"job {job}: all {len(reported)} shard hashes re-materialized and equal",
                highlight=False,
            )

"""The data plane: shard materialization, bounded streaming, shard rebuilds and routing.

    python -m bench.data            (full: one to two minutes on 2 cores)
    python -m bench.data --quick    (under a minute)

1. Materialization: MB/s and tokens/s of ``materialize_shard`` over every shard of a synthetic,
   a ``files`` jsonl (generated in a temp dir) and the ``stdlib`` dataset. Reference: reading
   the same shard bytes back from files (warm page cache: nothing is dropped). The rates of
   the first and the last full train shard alone show what a source's prefix scan costs.
2. Peak RSS of a child process streaming at least ten times the memory bound of a
   ``ShardCache`` (memory tier of N shards, disk tier of B bytes). Goal: peak - baseline <=
   N * shard + 2 * shard (the one being built, its parts and the joined bytes) + 32 MiB.
3. Shard rebuilds over 3 epochs of the trainer's schedule (``schedule_visits``): furthest next
   use (Belady 1966) against LRU, by ``simulate_misses`` and by a real ``ShardCache``.
4. The integer k-means router (DiPaCo, Douillard et al. 2024): fit time, documents routed per
   second, cluster purity against the true dialect, and the digest at 1 and 2 threads.
   Reference: float64 k-means over the same features with BLAS distances.

Timings are medians over 3 (quick) or 5 (full) repeats.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from bench.common import RESULTS, ROOT, environment, write_result
from trainfleet.data.cache import POLICIES, ShardCache, simulate_misses
from trainfleet.data.dialects import dialect_of
from trainfleet.data.router import featurize_batch
from trainfleet.data.shards import (
    ShardInfo,
    load_plan,
    materialize_shard,
    plan_shards,
    save_plan,
    shard_tokens,
    tokenized_documents,
)
from trainfleet.data.sources import iter_documents
from trainfleet.data.spec import (
    DatasetSpec,
    FilesDataset,
    RouterSpec,
    StdlibDataset,
    SyntheticDataset,
)
from trainfleet.data.verify import fit_router_for, router_fit_id

MB = 1e6
MIB = 1 << 20
FIXED_OVERHEAD_BYTES = 32 * MIB  # interpreter churn, generator work arrays, allocator slack
TOKENS_PER_STEP = 8 * 256  # batch_size * seq_len of the schedule in section 3
SPECS: TypeAdapter[DatasetSpec] = TypeAdapter(DatasetSpec)
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    repeats: int
    synthetic_documents: int
    synthetic_shard_tokens: int
    jsonl_bytes: int
    jsonl_shard_tokens: int
    stdlib_documents: int | None  # None: every file
    stdlib_shard_tokens: int
    rss_shard_tokens: int
    rss_memory_shards: int
    rss_disk_shards: int
    rss_train_shards: int
    router_documents: int
    router_sample_documents: int

    @classmethod
    def pick(cls, quick: bool, scale: float) -> Sizes:
        def s(n: int, least: int = 256) -> int:
            return max(least, int(n * scale))

        return cls(
            repeats=3 if quick else 5,
            synthetic_documents=s(8192 if quick else 32768, 16),
            synthetic_shard_tokens=s(256 * 1024 if quick else 512 * 1024),
            jsonl_bytes=s(5_000_000 if quick else 24_000_000, 20_000),
            jsonl_shard_tokens=s(256 * 1024 if quick else 1024 * 1024),
            stdlib_documents=None if scale >= 1 else s(700, 8),
            stdlib_shard_tokens=s(512 * 1024 if quick else 1024 * 1024),
            rss_shard_tokens=s(1 * MIB if quick else 4 * MIB),
            rss_memory_shards=4 if quick else 8,
            rss_disk_shards=8 if quick else 16,
            rss_train_shards=12 if quick else 24,
            router_documents=s(4096 if quick else 16384, 64),
            router_sample_documents=s(2048, 64),
        )


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def median_s(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synthetic_spec(name: str, num_documents: int, shard_tokens: int) -> SyntheticDataset:
    return SyntheticDataset(
        name=name,
        source="synthetic",
        num_documents=num_documents,
        num_dialects=8,
        alphabet_size=8,
        shard_tokens=shard_tokens,
    )


def build_shard(spec: DatasetSpec, by_key: dict[str, ShardInfo], key: str) -> bytes:
    return materialize_shard(spec, by_key[key])


def write_jsonl(directory: Path, num_bytes: int) -> None:
    """About ``num_bytes`` of jsonl records (synthetic texts), in files of ~4 MB each."""
    directory.mkdir(parents=True)
    source = synthetic_spec("jsonl-text", 10**8, 256)
    written = in_file = file_index = 0
    lines: list[str] = []
    for doc in iter_documents(source):
        lines.append(json.dumps({"text": doc.text.decode(), "id": doc.doc_id}) + "\n")
        written += len(lines[-1])
        in_file += len(lines[-1])
        if in_file >= 4_000_000 or written >= num_bytes:
            (directory / f"part-{file_index:03d}.jsonl").write_text("".join(lines))
            file_index, in_file, lines = file_index + 1, 0, []
        if written >= num_bytes:
            return


# 1. Materialization ------------------------------------------------------------------------


def materialize_rates(name: str, spec: DatasetSpec, repeats: int, work: Path) -> dict[str, Any]:
    say(f"materialize {name}: planning")
    plan = plan_shards(spec)
    train = plan.select("train")
    full = [s for s in train if s.num_tokens >= spec.shard_tokens] or train
    first, last = full[0], full[-1]  # not a remainder shard: its rate is all scan, no bytes
    (shard_dir := work / f"shards-{name}").mkdir()
    totals: list[float] = []
    per_shard: dict[str, list[float]] = {first.key: [], last.key: []}
    for repeat in range(repeats):
        totals.append(0.0)
        for shard in plan.shards:
            started = time.perf_counter()
            content = materialize_shard(spec, shard)
            totals[-1] += (elapsed := time.perf_counter() - started)
            per_shard.get(shard.key, []).append(elapsed)
            if repeat == 0:
                (shard_dir / shard.key.replace("/", "-")).write_bytes(content)
        say(f"materialize {name}: repeat {repeat + 1}/{repeats} took {totals[-1]:.2f}s")
    files = sorted(shard_dir.iterdir())
    read_s = median_s(lambda: [f.read_bytes() for f in files], repeats)
    num_bytes = sum(f.stat().st_size for f in files)
    seconds = statistics.median(totals)
    first_s, last_s = (statistics.median(per_shard[s.key]) for s in (first, last))
    return {
        f"{name}_num_shards": len(plan.shards),
        f"{name}_shard_bytes_total": num_bytes,
        f"{name}_materialize_mb_per_s": num_bytes / seconds / MB,
        f"{name}_materialize_tokens_per_s": plan.num_tokens / seconds,
        f"{name}_disk_read_mb_per_s_reference": num_bytes / read_s / MB,
        f"{name}_first_train_shard_mb_per_s": first.num_tokens / first_s / MB,
        f"{name}_last_full_train_shard_mb_per_s": last.num_tokens / last_s / MB,
    }


# 2. Peak RSS while streaming ---------------------------------------------------------------


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: now; VmHWM: peak of this image), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def stream_child(payload: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: stream ``schedule`` through a bounded cache, measure RSS."""
    spec = SPECS.validate_python(payload["spec"])
    plan = load_plan(Path(payload["plan"]))
    assert plan is not None
    by_key = {s.key: s for s in plan.shards}
    cache = ShardCache(
        Path(payload["cache_dir"]),
        max_bytes=payload["max_bytes"],
        max_shards=payload["max_shards"],
        build=functools.partial(build_shard, spec, by_key),
        schedule=payload["schedule"],
    )
    gc.collect()
    setup_peak, baseline = peak_rss_bytes(), proc_status_bytes("VmRSS")
    streamed = checksum = 0
    for key in payload["schedule"]:
        data = cache.get(key, by_key[key].sha256)
        checksum += int(shard_tokens(spec, data)[::4096].sum())  # touch it, as a reader would
        streamed += len(data)
        del data
    return {
        "baseline_rss_bytes": baseline,
        "setup_peak_rss_bytes": setup_peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "vmhwm_bytes": proc_status_bytes("VmHWM"),
        "streamed_bytes": streamed,
        "checksum": checksum,
        "stats": cache.stats.as_dict(),
    }


# ru_maxrss survives execve: a child exec'd straight from this (large) process would start
# with our peak as its own. A bare interpreter in between is the process the child is forked
# from, so the child's ru_maxrss starts near a bare interpreter's RSS, below its baseline.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
CHILD = "import sys, bench.data as b; b.child_main(sys.argv[1])"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def run_children(jobs: Sequence[tuple[str, dict[str, Any], dict[str, str]]]) -> list[Any]:
    """Run ``(task, payload, extra env)`` children side by side; their JSON results, in order."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, sys.executable, "-c", CHILD, json.dumps(payload)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for payload, env in (({"task": task, **payload}, env) for task, payload, env in jobs)
    ]
    results = []
    for (task, _, _), child in zip(jobs, children, strict=True):
        stdout, stderr = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"child {task} failed ({child.returncode}):\n{stderr}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def streaming_rss(sizes: Sizes, work: Path) -> dict[str, Any]:
    from trainfleet.train.feed import schedule_visits

    doc_tokens = 1024 + 2
    num_documents = math.ceil(sizes.rss_train_shards * sizes.rss_shard_tokens / doc_tokens / 0.9)
    spec = synthetic_spec("rss", num_documents, sizes.rss_shard_tokens)
    say(f"rss: planning {num_documents} documents in shards of {sizes.rss_shard_tokens} tokens")
    plan = plan_shards(spec)
    save_plan(plan, work / "rss-plan.json")
    train = plan.select("train")
    shard_bytes = max(s.num_tokens for s in train)  # one byte per token
    bound = sizes.rss_memory_shards * shard_bytes
    num_visits = math.ceil(10 * bound / min(s.num_tokens for s in train))
    visits = schedule_visits(train, num_visits, 10 * shard_bytes, seed=0)  # 1 step a visit
    schedule = [v.shard.key for v in visits]
    say(f"rss: streaming {len(schedule)} shards of ~{shard_bytes / MIB:.1f} MiB in a child")
    payload = {
        "spec": spec.model_dump(),
        "plan": str(work / "rss-plan.json"),
        "cache_dir": str(work / "rss-cache"),
        "max_bytes": sizes.rss_disk_shards * shard_bytes,
        "max_shards": sizes.rss_memory_shards,
        "schedule": schedule,
    }
    (child,) = run_children([("stream", payload, {})])
    growth = child["peak_rss_bytes"] - child["baseline_rss_bytes"]
    overhead = 2 * shard_bytes + FIXED_OVERHEAD_BYTES
    stats = child["stats"]
    return {
        "rss_shard_bytes": shard_bytes,
        "rss_memory_shards": sizes.rss_memory_shards,
        "rss_disk_max_bytes": sizes.rss_disk_shards * shard_bytes,
        "rss_bound_bytes": bound,
        "rss_streamed_bytes": child["streamed_bytes"],
        "rss_streamed_over_bound": child["streamed_bytes"] / bound,
        "rss_baseline_bytes": child["baseline_rss_bytes"],
        "rss_setup_peak_bytes": child["setup_peak_rss_bytes"],
        "rss_peak_bytes": child["peak_rss_bytes"],
        "rss_peak_vmhwm_bytes_crosscheck": child["vmhwm_bytes"],
        "rss_peak_minus_baseline_bytes": growth,
        "rss_claimed_overhead_bytes": overhead,
        "rss_allowed_bytes": bound + overhead,
        "rss_goal_held": growth <= bound + overhead,
        "rss_builds": stats["builds"],
        "rss_disk_hits": stats["disk_hits"],
        "rss_memory_hits": stats["memory_hits"],
    }


# 3. Rebuilds: furthest next use vs LRU -----------------------------------------------------


def rebuilds(spec: DatasetSpec) -> dict[str, Any]:
    from trainfleet.train.feed import schedule_visits

    plan = plan_shards(spec)
    train = plan.select("train")
    steps_per_epoch = sum(max(1, round(s.num_tokens / TOKENS_PER_STEP)) for s in train)
    visits = schedule_visits(train, 3 * steps_per_epoch, TOKENS_PER_STEP, seed=0)
    schedule = [v.shard.key for v in visits]
    metrics: dict[str, Any] = {
        "rebuilds_num_train_shards": len(train),
        "rebuilds_num_reads": len(schedule),
    }
    for percent in (25, 50, 75):
        capacity = max(1, len(train) * percent // 100)
        ours = simulate_misses(schedule, capacity, "furthest")
        lru = simulate_misses(schedule, capacity, "lru")
        metrics[f"rebuilds_cap{percent}_capacity_shards"] = capacity
        metrics[f"rebuilds_cap{percent}_furthest"] = ours
        metrics[f"rebuilds_cap{percent}_lru_reference"] = lru
        metrics[f"rebuilds_cap{percent}_furthest_over_lru"] = ours / lru
    capacity = metrics["rebuilds_cap50_capacity_shards"]
    by_key = {s.key: s for s in train}
    for policy in POLICIES:
        say(f"rebuilds: a real memory-only ShardCache, {policy}, capacity {capacity}")
        build = functools.partial(build_shard, spec, by_key)
        cache = ShardCache(None, max_bytes=0, max_shards=capacity, build=build, policy=policy)
        cache.set_schedule(schedule)  # as ShardFeed does
        for key in schedule:
            cache.get(key, by_key[key].sha256)
        metrics[f"rebuilds_cap50_real_{policy}_builds"] = cache.stats.builds
    metrics["rebuilds_real_matches_simulated"] = (
        metrics["rebuilds_cap50_real_furthest_builds"] == metrics["rebuilds_cap50_furthest"]
        and metrics["rebuilds_cap50_real_lru_builds"] == metrics["rebuilds_cap50_lru_reference"]
    )
    return metrics


# 4. Router ---------------------------------------------------------------------------------


def float_kmeans(features: np.ndarray, num_paths: int, max_iterations: int) -> np.ndarray:
    """Reference: float64 k-means++ (numpy RNG, seed 0) and Lloyd with BLAS distances."""
    rng = np.random.default_rng(0)
    x = features.astype(np.float64)
    norms = np.einsum("nf,nf->n", x, x)
    centroids = [x[rng.integers(len(x))]]
    d2 = np.maximum(norms - 2 * x @ centroids[0] + centroids[0] @ centroids[0], 0)
    for _ in range(num_paths - 1):
        row = rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(x))
        centroids.append(x[row])
        d2 = np.minimum(d2, np.maximum(norms - 2 * x @ x[row] + x[row] @ x[row], 0))
    c = np.array(centroids)
    assignment = float_nearest(x, c)
    for _ in range(max_iterations):
        for path in range(num_paths):
            members = x[assignment == path]
            if len(members):
                c[path] = members.mean(axis=0)
        updated = float_nearest(x, c)
        if np.array_equal(updated, assignment):
            break
        assignment = updated
    return c


def float_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmin(np.einsum("pf,pf->p", centroids, centroids) - 2 * x @ centroids.T, axis=1)


def featurize_all(tokens: Sequence[np.ndarray], spec: RouterSpec) -> np.ndarray:
    return np.concatenate(
        [
            featurize_batch(tokens[i : i + 256], spec.num_features, spec.feature_seed)
            for i in range(0, len(tokens), 256)
        ]
    )


def purity(paths: np.ndarray, truth: np.ndarray) -> float:
    """Share of documents whose path's majority dialect is their own."""
    return sum(int(np.bincount(truth[paths == p]).max()) for p in np.unique(paths)) / len(paths)


def fit_child(payload: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(payload["threads"])
    router = fit_router_for(SPECS.validate_python(payload["spec"]))
    return {"digest": router.digest, "torch_threads": torch.get_num_threads()}


def router_metrics(sizes: Sizes) -> dict[str, Any]:
    router_spec = RouterSpec(num_paths=8, sample_documents=sizes.router_sample_documents)
    spec = synthetic_spec("routed", sizes.router_documents, 64 * 1024).model_copy(
        update={"router": router_spec}
    )
    say("router: fitting from the spec (synthetic)")
    fit_s = median_s(lambda: fit_router_for(spec), sizes.repeats)
    router = fit_router_for(spec)
    docs = list(tokenized_documents(spec))
    tokens = [d.tokens for d in docs]
    indices = np.array([d.index for d in docs])
    truth = np.array([dialect_of(spec, d.index) for d in docs])
    sample = [d.tokens for d in docs if d.split == "train"][: router_spec.sample_documents]

    def fit_reference() -> np.ndarray:
        features = featurize_all(sample, router_spec)
        return float_kmeans(features[features.any(axis=1)], 8, router_spec.max_iterations)

    from trainfleet.data.router import fit_router

    fit_tokens_s = median_s(
        lambda: fit_router(router_spec, router_fit_id(spec), sample), sizes.repeats
    )
    fit_reference_s = median_s(fit_reference, sizes.repeats)
    say(f"router: routing {len(docs)} documents")
    route_s = median_s(
        lambda: router.route_features(featurize_all(tokens, router_spec), indices), sizes.repeats
    )
    one_by_one_s = median_s(
        lambda: [router.route(d.index, d.tokens) for d in docs], max(1, sizes.repeats // 2)
    )
    centroids = fit_reference()
    reference_route_s = median_s(
        lambda: float_nearest(featurize_all(tokens, router_spec).astype(np.float64), centroids),
        sizes.repeats,
    )
    features = featurize_all(tokens, router_spec)
    ours = router.route_features(features, indices)
    reference = float_nearest(features.astype(np.float64), centroids)
    stdlib = StdlibDataset(
        name="stdlib-routed",
        source="stdlib",
        max_documents=sizes.stdlib_documents,
        router=router_spec,
    )
    say("router: fitting from the spec (stdlib)")
    stdlib_fit_s = median_s(lambda: fit_router_for(stdlib), sizes.repeats)
    say("router: digests in two child processes (1 and 2 threads)")
    fits = [
        ("fit", {"spec": spec.model_dump(), "threads": n}, dict.fromkeys(THREAD_VARIABLES, str(n)))
        for n in (1, 2)
    ]
    one, two = run_children(fits)
    digests = {"inprocess": router.digest, "threads1": one["digest"], "threads2": two["digest"]}
    return {
        "router_method": router.method,
        "router_num_iterations": router.num_iterations,
        "router_fit_from_spec_s": fit_s,
        "router_fit_from_tokens_s": fit_tokens_s,
        "router_fit_from_tokens_s_float_reference": fit_reference_s,
        "router_stdlib_fit_from_spec_s": stdlib_fit_s,
        "router_docs_per_s": len(docs) / route_s,
        "router_docs_per_s_one_by_one": len(docs) / one_by_one_s,
        "router_docs_per_s_float_reference": len(docs) / reference_route_s,
        "router_purity": purity(ours, truth),
        "router_purity_float_reference": purity(reference, truth),
        "router_digest_inprocess": digests["inprocess"],
        "router_digest_threads1": digests["threads1"],
        "router_digest_threads2": digests["threads2"],
        "router_digests_equal": len(set(digests.values())) == 1,
    }


# Driver ------------------------------------------------------------------------------------


def child_main(argument: str) -> None:
    payload = json.loads(argument)
    task = payload.pop("task")
    result = stream_child(payload) if task == "stream" else fit_child(payload)
    print(json.dumps(result))


def table(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows of (measure, trainfleet, reference) from the metrics."""

    def num(digits: int) -> Callable[[Any], str]:
        return lambda value: f"{value:,.{digits}f}"

    def mib(value: Any) -> str:
        return f"{value / MIB:,.1f}"

    def verdict(held: Any) -> str:
        return "PASS" if held else "FAIL"

    rows: list[tuple[str, str, str | None, Callable[[Any], str]]] = []
    # fmt: off
    for n in ("synthetic", "files_jsonl", "stdlib"):
        rows += [
            (f"{n}: materialize every shard | read the shard files, MB/s",
             f"{n}_materialize_mb_per_s", f"{n}_disk_read_mb_per_s_reference", num(1)),
            (f"{n}: materialize every shard, tokens/s", f"{n}_materialize_tokens_per_s", None,
             num(0)),
            (f"{n}: first | last full train shard alone, MB/s",
             f"{n}_first_train_shard_mb_per_s", f"{n}_last_full_train_shard_mb_per_s", num(1)),
        ]
    rows += [
        ("RSS streaming >= 10x the bound: peak - baseline | allowed, MiB",
         "rss_peak_minus_baseline_bytes", "rss_allowed_bytes", mib),
        ("  bound (N x shard) | claimed overhead (2 shards + 32 MiB), MiB",
         "rss_bound_bytes", "rss_claimed_overhead_bytes", mib),
        ("  goal: peak - baseline <= allowed", "rss_goal_held", None, verdict),
    ]
    rows.append(("train shards (each built once in every count) | reads in 3 epochs",
                 "rebuilds_num_train_shards", "rebuilds_num_reads", str))
    for percent in (25, 50, 75):
        key = f"rebuilds_cap{percent}"
        rows += [
            (f"shard builds in 3 epochs, cache {percent}% = {m[f'{key}_capacity_shards']} "
             "shards: furthest | LRU", f"{key}_furthest", f"{key}_lru_reference", str),
            ("  furthest / LRU", f"{key}_furthest_over_lru", None, num(2)),
        ]
    rows += [
        ("  the same, by a real ShardCache at 50%", "rebuilds_cap50_real_furthest_builds",
         "rebuilds_cap50_real_lru_builds", str),
        ("router fit from the spec, s: synthetic | stdlib", "router_fit_from_spec_s",
         "router_stdlib_fit_from_spec_s", num(2)),
        ("router fit from tokens, s | float64 BLAS k-means", "router_fit_from_tokens_s",
         "router_fit_from_tokens_s_float_reference", num(2)),
        ("documents featurized + routed per s, batched | float64", "router_docs_per_s",
         "router_docs_per_s_float_reference", num(0)),
        ("  one at a time (Router.route, as plan_shards does)", "router_docs_per_s_one_by_one",
         None, num(0)),
        ("cluster purity against the true dialect | float64", "router_purity",
         "router_purity_float_reference", num(3)),
        ("router digests equal: in process, 1 thread, 2 threads", "router_digests_equal", None,
         str),
    ]
    # fmt: on
    return [
        (label, show(m[ours]), "" if reference is None else show(m[reference]))
        for label, ours, reference, show in rows
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS / "data.json", help="result JSON")
    args = parser.parse_args(argv)
    sizes = Sizes.pick(args.quick, args.scale)
    metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthetic = synthetic_spec(
            "synthetic", sizes.synthetic_documents, sizes.synthetic_shard_tokens
        )
        say(f"writing ~{sizes.jsonl_bytes / MB:.0f} MB of jsonl")
        write_jsonl(work / "jsonl", sizes.jsonl_bytes)
        jsonl = FilesDataset(
            name="jsonl",
            source="files",
            root=str(work / "jsonl"),
            paths=["*.jsonl"],
            format="jsonl",
            shard_tokens=sizes.jsonl_shard_tokens,
        )
        stdlib = StdlibDataset(
            name="stdlib",
            source="stdlib",
            max_documents=sizes.stdlib_documents,
            shard_tokens=sizes.stdlib_shard_tokens,
        )
        for name, spec in (("synthetic", synthetic), ("files_jsonl", jsonl), ("stdlib", stdlib)):
            metrics.update(materialize_rates(name, spec, sizes.repeats, work))
        metrics.update(streaming_rss(sizes, work))
        say("rebuilds: 3 epochs of the trainer's schedule")
        metrics.update(rebuilds(synthetic))
    metrics.update(router_metrics(sizes))
    result = {
        "benchmark": "data",
        "params": {
            "quick": args.quick,
            "scale": args.scale,
            **asdict(sizes),
            "rss_goal": "peak - baseline <= memory_shards * shard + 2 * shard + 32 MiB",
            "rebuild_schedule": f"schedule_visits, 3 epochs, {TOKENS_PER_STEP} tokens/step",
        },
        "env": environment(numpy=np.__version__, page_cache="warm (nothing dropped)"),
        "metrics": metrics,
    }
    write_result(result, args.out)
    rows = table(metrics)
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':<{width}} | {'trainfleet':>12} | reference")
    for name, ours, reference in rows:
        print(f"{name:<{width}} | {ours:>12} | {reference}")
    print(f"router digest: {metrics['router_digest_inprocess']}")
    print(f"(written to {args.out})")
    return result


if __name__ == "__main__":
    main()

"""The link model of ``bench.diloco``, checked once for real through ``--max-mbps``.

    python -m bench.diloco_link            (about 100 seconds)
    python -m bench.diloco_link --quick    (a few seconds: 50 Mbit/s, the small model)

``bench.diloco`` models a replica's communication time as link bytes x 8 / bandwidth: the
fp32 global weights down and the encoded pseudo-gradient up, once per round (DiLoCo:
Douillard et al. 2023, arXiv 2311.08105). This benchmark times those same transfers over
real HTTP instead: a real coordinator (``trainfleet.testing.LiveFleet``: the Starlette app
under uvicorn, on localhost) holds a real ``[[runs]]`` run, so round 0's weights exist in
its store; a worker client built as ``trainfleet join --max-mbps N`` builds it
(``Client(url, token, max_mbps=N)``, its token bucket pacing every bulk transfer) registers,
claims a replica task, downloads the round's weights (``GET /v1/weights/{sha256}``, sha256
checked) and uploads a real pseudo-gradient (``pseudograd.encode`` of the weights against
perturbed end weights, codecs none and int8) through the worker's artifact upload
(``PUT /v1/jobs/{id}/artifacts/{sha}``; a repeat of the same bytes is streamed again and
is idempotent).

Each transfer is timed twice, median of 3 each: *paced*, on a client whose bucket was just
drained (as inside a long transfer), and *after idle*, on a fresh client (a new connection
and a full bucket, as after a round's compute). Both are printed beside the modelled time,
bytes x 8 / rate. The bucket lets its burst (64 KiB) through at once, so after idle a
transfer takes about (bytes - 64 KiB) x 8 / rate: the model overstates small payloads.

Models: the README's byte GPT (2 layers, width 64, context 64; 0.48 MB of fp32 weights) and,
for a longer transfer, the same at width 256 (6.7 MB). Caps: 10 and 50 Mbit/s (10^6 bits).
Goal: paced measured within 10% of modelled. What this checks is the worker's own pacing
and the protocol's overhead; on localhost nothing else limits the link (a real WAN adds
round trips and TCP slow start, which the model leaves out too).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from bench.common import RESULTS, environment, write_result
from trainfleet.capability.detect import detect_capability
from trainfleet.client import THROTTLED_CHUNK_BYTES as BURST_BYTES
from trainfleet.client import Client
from trainfleet.manifest.runs import CompressionSpec
from trainfleet.testing import LiveFleet, wait_until
from trainfleet.train import pseudograd

GOAL_TOLERANCE = 0.10  # measured / modelled within 1 +- this
REPEATS = 3
CODECS = {"none": CompressionSpec(kind="none"), "int8": CompressionSpec(kind="int8")}
DATASET = """
[datasets.syn]
source = "synthetic"
num_documents = 20
doc_tokens = 256
shard_tokens = 4096
"""


@dataclass(frozen=True)
class Model:
    name: str
    d_model: int
    n_heads: int


SMALL = Model("small", 64, 4)  # the README's model: 120,576 params
WIDE = Model("wide", 256, 4)


@dataclass(frozen=True)
class Transfer:
    model: str
    what: str  # "weights_down", "upload_none", "upload_int8"
    mbps: float
    num_bytes: int
    times_s: tuple[float, ...]  # paced: the bucket drained at the start
    idle_times_s: tuple[float, ...]  # after idle: a fresh client, the bucket full

    @property
    def idle_s(self) -> float:
        return statistics.median(self.idle_times_s)

    @property
    def idle_ratio(self) -> float:
        return self.idle_s / self.modelled_s

    @property
    def burst_modelled_s(self) -> float:
        """The bucket's own bound: its burst passes at once, the rest at the rate."""
        return max(0, self.num_bytes - BURST_BYTES) * 8 / (self.mbps * 1e6)

    @property
    def key(self) -> str:
        return f"{self.model}_{self.what}_{self.mbps:g}mbps"

    @property
    def measured_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def modelled_s(self) -> float:
        return self.num_bytes * 8 / (self.mbps * 1e6)  # bench.diloco's link model

    @property
    def ratio(self) -> float:
        return self.measured_s / self.modelled_s


def run_toml(model: Model) -> str:
    hyper = (
        f"{{ n_layers = 2, d_model = {model.d_model}, n_heads = {model.n_heads}, seq_len = 64,"
        " batch_size = 8, seed = 1, eval_batches = 1 }"
    )
    return (
        DATASET
        + f'\n[[runs]]\nname = "link-{model.name}"\ndataset = "syn"\nreplicas = 1\n'
        + f"inner_steps = 1\nrounds = 1\nhyper = {hyper}\n"
    )


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(action: Callable[[Client], None], client: Client) -> float:
    t0 = time.perf_counter()
    action(client)
    return time.perf_counter() - t0


def worker_client(fleet: LiveFleet, host: str, mbps: float | None) -> tuple[Client, str]:
    """Register as the daemon does (``Worker.register``): join token, then the worker's own
    token, each in a ``Client`` capped at ``mbps``. The capped client and the worker id."""
    with Client(fleet.url, fleet.worker_token(host), max_mbps=mbps) as joining:
        reply = joining.register(detect_capability(host).model_dump(mode="json"))
    return Client(fleet.url, reply["token"], max_mbps=mbps), str(reply["worker_id"])


def claim_task(fleet: LiveFleet, model: Model) -> tuple[str, int, dict[str, Any], Client]:
    """Load the model's run and claim its round-0 replica task with an uncapped worker."""
    fleet.reload(run_toml(model))
    client, _ = worker_client(fleet, f"link-{model.name}", None)
    got = wait_until(client.claim, 120, f"run link-{model.name}'s replica task", interval_s=0.2)
    job = got["job"]
    assert job["spec"]["kind"] == "replica", job
    return job["id"], int(got["epoch"]), job["spec"]["task"], client


def measure_model(fleet: LiveFleet, model: Model, caps: list[float], work: Path) -> list[Transfer]:
    job_id, epoch, task, owner = claim_task(fleet, model)
    sha = task["weights"]
    dest = work / f"{model.name}.safetensors"
    owner.get_weights(sha, dest)
    owner.close()
    data = dest.read_bytes()
    start = safetensors.torch.load(data)
    g = torch.Generator().manual_seed(0)
    end = {k: v - 1e-3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    payloads: dict[str, Path] = {}
    for codec, spec in CODECS.items():
        path = work / f"{model.name}-{codec}" / "pseudograd.safetensors"
        path.parent.mkdir()
        path.write_bytes(pseudograd.encode(start, end, spec).data)
        payloads[codec] = path
    say(
        f"{model.name}: {sum(t.numel() for t in start.values()):,} params, weights"
        f" {len(data):,} B, none {payloads['none'].stat().st_size:,} B,"
        f" int8 {payloads['int8'].stat().st_size:,} B"
    )

    def down(client: Client) -> None:
        client.get_weights(sha, work / "down.safetensors", len(data))

    def up(path: Path) -> Callable[[Client], None]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return lambda client: client.upload(job_id, epoch, path, digest, path.name)

    actions: dict[str, tuple[Callable[[Client], None], int]] = {"weights_down": (down, len(data))}
    actions |= {f"upload_{c}": (up(p), p.stat().st_size) for c, p in payloads.items()}
    # The claim is the registering worker's: its token, in a client capped at each rate.
    token = owner.token
    out: list[Transfer] = []
    for mbps in caps:
        for what, (action, size) in actions.items():
            # paced: back to back on one client, each starting with the bucket drained
            with Client(fleet.url, token, max_mbps=mbps) as client:
                assert client.bucket is not None
                client.bucket.take(int(client.bucket.burst))  # drain the burst
                paced = tuple(timed(action, client) for _ in range(REPEATS))
            # idle: a fresh client each time, as after a round's compute: full bucket, new
            # connection
            idle = []
            for _ in range(REPEATS):
                with Client(fleet.url, token, max_mbps=mbps) as client:
                    idle.append(timed(action, client))
            t = Transfer(model.name, what, mbps, size, paced, tuple(idle))
            say(
                f"  {t.key}: {t.measured_s:.3f} s paced, {t.idle_s:.3f} s after idle,"
                f" {t.modelled_s:.3f} s modelled"
            )
            out.append(t)
    return out


def table(transfers: list[Transfer]) -> str:
    lines = [
        "| model | transfer | Mbit/s | bytes | modelled s | measured s, paced | ratio"
        " | measured s, after idle | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in transfers:
        lines.append(
            f"| {t.model} | {t.what} | {t.mbps:g} | {t.num_bytes:,} | {t.modelled_s:.3f} |"
            f" {t.measured_s:.3f} | {t.ratio:.3f} | {t.idle_s:.3f} | {t.idle_ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="50 Mbit/s and the small model")
    parser.add_argument("--out", type=Path, default=RESULTS / "diloco_link.json")
    parser.add_argument(
        "--caps", type=float, nargs="+", help="Mbit/s caps (default 10 50; quick: 50)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    caps: list[float] = args.caps or ([50.0] if args.quick else [10.0, 50.0])
    models = [SMALL] if args.quick else [SMALL, WIDE]
    started = time.perf_counter()
    transfers: list[Transfer] = []
    with tempfile.TemporaryDirectory(prefix="diloco-link-") as tmp:
        work = Path(tmp)
        with LiveFleet(work / "fleet", heartbeat_timeout_s=600.0) as fleet:
            for model in models:
                model_dir = work / model.name
                model_dir.mkdir()
                transfers += measure_model(fleet, model, caps, model_dir)
    worst = max(abs(t.ratio - 1) for t in transfers)
    metrics: dict[str, Any] = {}
    for t in transfers:
        metrics[f"{t.key}_bytes"] = t.num_bytes
        metrics[f"{t.key}_modelled_s"] = t.modelled_s
        metrics[f"{t.key}_measured_s"] = t.measured_s
        metrics[f"{t.key}_ratio"] = t.ratio
        metrics[f"{t.key}_idle_measured_s"] = t.idle_s
        metrics[f"{t.key}_idle_ratio"] = t.idle_ratio
        metrics[f"{t.key}_idle_ratio_to_burst_model"] = t.idle_s / t.burst_modelled_s
    metrics["max_ratio"] = max(t.ratio for t in transfers)
    metrics["min_ratio"] = min(t.ratio for t in transfers)
    metrics["min_idle_ratio"] = min(t.idle_ratio for t in transfers)
    metrics["goal_paced_within_10pct"] = worst <= GOAL_TOLERANCE
    metrics["wall_s"] = time.perf_counter() - started
    result = {
        "benchmark": "diloco_link",
        "params": {
            "quick": args.quick,
            "caps_mbps": caps,
            "models": [{"name": m.name, "n_layers": 2, "d_model": m.d_model} for m in models],
            "codecs": list(CODECS),
            "repeats": REPEATS,
            "goal_tolerance": GOAL_TOLERANCE,
            "burst_bytes": BURST_BYTES,
        },
        "env": environment(transport="http over localhost (uvicorn, LiveFleet)"),
        "metrics": metrics,
        "transfers": [
            {
                "key": t.key,
                "bytes": t.num_bytes,
                "paced_s": list(t.times_s),
                "idle_s": list(t.idle_times_s),
            }
            for t in transfers
        ],
    }
    write_result(result, args.out)
    print(table(transfers))
    print(
        f"\npaced: measured/modelled in [{metrics['min_ratio']:.3f},"
        f" {metrics['max_ratio']:.3f}] (goal: within {GOAL_TOLERANCE:.0%}:"
        f" {'met' if worst <= GOAL_TOLERANCE else 'not met'}); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Queue throughput: jobs claimed and completed per second, in process and over HTTP.

    python -m bench.queue            (full: 2000 jobs in process, 600 over HTTP)
    python -m bench.queue --quick    (under a minute)

Anchor: the storage engine's own ceiling on this machine, i.e. the rate of bare SQLite write
transactions (WAL, synchronous=NORMAL, two per job, as a claim and a completion need). Our
figure beside it shows what the queue's logic (matching, fencing, events) costs on top.
Over HTTP the coordinator runs as a real `trainfleet serve` process and workers are
concurrent HTTP clients doing claim -> heartbeat -> complete.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import RESULTS, environment, write_result
from trainfleet.client import Client
from trainfleet.manifest import parse_manifest
from trainfleet.queue.sqlite import SQLiteQueue


def manifest_text(n: int) -> str:
    return "\n".join(f'[[jobs]]\nname = "j{i}"\nhyper = {{ steps = 5 }}' for i in range(n))


def bare_sqlite_txn_per_s(path: Path, n: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT, epoch INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, 'pending', 0)", [(i,) for i in range(n)])
    started = time.perf_counter()
    for i in range(n):
        for state in ("claimed", "completed"):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE t SET state = ?, epoch = epoch + 1 WHERE id = ?", (state, i))
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return n / elapsed


def in_process_jobs_per_s(path: Path, n: int, num_threads: int) -> float:
    from trainfleet.capability.model import Capability

    queue = SQLiteQueue(path)
    queue.apply_manifest(parse_manifest(manifest_text(n)))
    # Each worker joins as the coordinator's API makes it: with its host's enrollment token.
    workers = [
        queue.register_enrolled(
            Capability(host=f"h{i}", hostname=f"h{i}", cores=4, ram_gib=8, cuda=False),
            queue.enroll_host(f"h{i}"),
        )[0].id
        for i in range(num_threads)
    ]

    def drain(worker: str) -> None:
        while (claim := queue.claim(worker)) is not None:
            queue.complete(claim.job.id, worker, claim.epoch, {})

    started = time.perf_counter()
    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    assert queue.counts() == {"completed": n}
    queue.close()
    return n / elapsed


def http_jobs_per_s(state: Path, n: int, num_clients: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    manifest = state / "bench.toml"
    state.mkdir(parents=True, exist_ok=True)
    manifest.write_text(manifest_text(n))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainfleet.cli.main",
            "serve",
            str(manifest),
            "--port",
            str(port),
            "--state-dir",
            str(state),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(url) as probe:
            probe.wait_healthy()
        operator_token = (state / "operator.token").read_text().strip()
        with Client(url, operator_token) as operator:
            join = {i: operator.enroll_host(f"h{i}")["token"] for i in range(num_clients)}
        latencies: list[float] = []
        lock = threading.Lock()

        def work(i: int) -> None:
            with Client(url, join[i]) as joiner:
                cap = {
                    "host": f"h{i}",
                    "hostname": f"h{i}",
                    "cores": 4,
                    "ram_gib": 8.0,
                    "cuda": False,
                }
                token = joiner.register(cap)["token"]
            with Client(url, token) as client:
                while True:
                    t0 = time.perf_counter()
                    claim = client.claim()
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                    if claim is None:
                        return
                    client.heartbeat(claim["job"]["id"], claim["epoch"])
                    client.complete(claim["job"]["id"], claim["epoch"], {"metrics": {}})

        started = time.perf_counter()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(num_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        latencies.sort()
        return {
            "http_jobs_per_s": n / elapsed,
            "http_claim_p50_ms": 1000 * statistics.median(latencies),
            "http_claim_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    args = parser.parse_args()
    n_local, n_http, clients = (500, 200, 4) if args.quick else (2000, 600, 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ceiling = bare_sqlite_txn_per_s(root / "bare.db", n_local)
        one = in_process_jobs_per_s(root / "one.db", n_local, 1)
        four = in_process_jobs_per_s(root / "four.db", n_local, 4)
        http = http_jobs_per_s(root / "http", n_http, clients)
    metrics = {
        "sqlite_bare_jobs_per_s_reference": ceiling,
        "inprocess_jobs_per_s_1_worker": one,
        "inprocess_jobs_per_s_4_workers": four,
        "inprocess_vs_bare_ratio": one / ceiling,
        **http,
    }
    result = {
        "benchmark": "queue",
        "params": {
            "quick": args.quick,
            "jobs_in_process": n_local,
            "jobs_http": n_http,
            "http_clients": clients,
        },
        "env": environment(),
        "metrics": metrics,
    }
    write_result(result, RESULTS / "queue.json")
    rows = [
        ("bare SQLite, 2 write txns per job (reference ceiling)", ceiling, "jobs/s"),
        ("queue in process, 1 worker (claim + complete)", one, "jobs/s"),
        ("queue in process, 4 worker threads", four, "jobs/s"),
        (
            f"coordinator over HTTP, {clients} clients (claim+heartbeat+complete)",
            http["http_jobs_per_s"],
            "jobs/s",
        ),
        ("HTTP claim latency p50", http["http_claim_p50_ms"], "ms"),
        ("HTTP claim latency p99", http["http_claim_p99_ms"], "ms"),
    ]
    print(f"{'measure':<70} {'value':>10}")
    for name, value, unit in rows:
        print(f"{name:<70} {value:>10.1f} {unit}")
    print(f"in-process / bare ratio: {one / ceiling:.2f}   (written to {RESULTS / 'queue.json'})")


if __name__ == "__main__":
    main()

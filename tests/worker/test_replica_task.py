"""The worker's replica branch: the weights cache, the link cap, argv/env, the reported result."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fakecoord import JOB_ID, FakeClient, make_attempt
from safetensors.torch import save_file

import trainfleet.worker.attempt as attempt_module
from trainfleet import env
from trainfleet.client import Client, DownloadMismatch, TokenBucket, TransferAborted
from trainfleet.errors import NotFound
from trainfleet.testing import wait_until
from trainfleet.worker.attempt import Attempt
from trainfleet.worker.launch import ReplicaFiles, build_argv, build_env
from trainfleet.worker.replica_task import WeightsCache, contribution, replica_task, state_dir

RUN_ID = "ab" * 32


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def task_json(weights: bytes = b"w" * 100, **changes: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "run": "collab",
        "run_id": RUN_ID,
        "round": 2,
        "replica": 1,
        "num_replicas": 2,
        "weights": sha(weights),
        "weights_size": len(weights),
        "inner_steps": 5,
        "global_step": 10,
        "total_steps": 15,
        "params": {"n_layers": 1, "d_model": 16},
        "dataset": {"name": "syn", "source": "synthetic", "num_documents": 20},
        "compression": {"kind": "int8"},
    }
    return {**task, **changes}


def replica_spec(weights: bytes = b"w" * 100, **changes: Any) -> dict[str, Any]:
    return {
        "kind": "replica",
        "hyper": {},
        "mode": "full",
        "timeout_s": 60.0,
        "task": task_json(weights, **changes),
    }


# -- the link cap -------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_token_bucket_lets_a_burst_through_then_paces_at_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=100, clock=clock, sleep=clock.sleep)
    assert bucket.take(100) == 0.0  # the full bucket
    assert bucket.take(500) == pytest.approx(0.5)  # 500 bytes at 1000 B/s
    clock.now += 10.0  # idle: the bucket refills, but only up to its burst
    assert bucket.take(100) == 0.0
    assert bucket.take(100) == pytest.approx(0.1)
    assert clock.sleeps == pytest.approx([0.5, 0.1])


def test_token_bucket_never_passes_more_than_burst_plus_rate_times_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket.from_mbps(8.0, burst=65536, clock=clock, sleep=clock.sleep)
    assert bucket.rate == 1e6  # 8 Mbit/s = 10^6 bytes/s
    start, sent = clock.now, 0
    for _ in range(200):
        bucket.take(65536)
        sent += 65536
        assert sent <= 65536 + bucket.rate * (clock.now - start) + 1e-6
    assert clock.now - start == pytest.approx((sent - 65536) / 1e6)


def served(body: bytes, status: int = 200) -> httpx.MockTransport:
    """A coordinator that answers every GET with ``body`` and takes every PUT."""
    seen: dict[str, Any] = {"paths": [], "uploaded": b""}

    def handle(request: httpx.Request) -> httpx.Response:
        seen["paths"].append(request.url.path)
        if request.method == "PUT":
            seen["uploaded"] = request.read()
            return httpx.Response(200, json={"size": len(seen["uploaded"])})
        if status != 200:
            return httpx.Response(status, json={"error": "not_found", "message": "no weights"})
        return httpx.Response(200, content=body)

    transport = httpx.MockTransport(handle)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


def test_capped_client_paces_uploads_and_downloads_by_its_bucket(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    clock = FakeClock()
    bucket = TokenBucket.from_mbps(1.0, clock=clock, sleep=clock.sleep)  # 125000 B/s
    client = Client("http://coord", "t", transport=served(data), bucket=bucket)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    client.upload(JOB_ID, 1, src, sha(data), "pseudograd.safetensors")
    up_s = clock.now - 100.0
    assert up_s == pytest.approx((len(data) - bucket.burst) / 125000)  # ~8.4 s of modelled link
    client.get_weights(sha(data), tmp_path / "w.safetensors")
    assert clock.now - 100.0 - up_s == pytest.approx(len(data) / 125000)
    assert (tmp_path / "w.safetensors").read_bytes() == data


def test_uncapped_client_never_waits(tmp_path: Path) -> None:
    client = Client("http://coord", "t", transport=served(b"x" * 1000))
    assert client.bucket is None
    client.get_weights(sha(b"x" * 1000), tmp_path / "w")
    assert (tmp_path / "w").stat().st_size == 1000


# -- verified downloads and the weights cache ----------------------------------------------


def test_get_weights_asks_for_the_hash_and_renames_only_verified_bytes(tmp_path: Path) -> None:
    transport = served(b"weights")
    client = Client("http://coord", "t", transport=transport)
    assert client.get_weights(sha(b"weights"), tmp_path / "w") == 7
    assert transport.seen["paths"] == [f"/v1/weights/{sha(b'weights')}"]  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == [tmp_path / "w"]


@pytest.mark.parametrize(
    ("body", "max_bytes", "why"),
    [(b"tampered", None, "hash to"), (b"weights and more", 7, "more than the 7 bytes")],
)
def test_a_corrupt_or_oversized_download_is_refused_and_nothing_is_kept(
    tmp_path: Path, body: bytes, max_bytes: int | None, why: str
) -> None:
    client = Client("http://coord", "t", transport=served(body))
    with pytest.raises(DownloadMismatch, match=why):
        client.get_weights(sha(b"weights"), tmp_path / "w", max_bytes=max_bytes)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_download_given_up_half_way_keeps_nothing(tmp_path: Path) -> None:
    data = b"x" * (3 * 65536)
    asked: list[int] = []
    bucket = TokenBucket(1e12)  # capped: small chunks
    client = Client("http://coord", "t", transport=served(data), bucket=bucket)

    def give_up() -> bool:
        asked.append(1)
        return len(asked) > 1  # after the first chunk

    with pytest.raises(TransferAborted, match="after 65536 bytes"):
        client.get_weights(sha(data), tmp_path / "w", give_up=give_up)
    assert list(tmp_path.iterdir()) == []


def test_missing_weights_are_the_coordinators_refusal(tmp_path: Path) -> None:
    client = Client("http://coord", "t", transport=served(b"", status=404))
    with pytest.raises(NotFound):
        client.get_weights(sha(b"weights"), tmp_path / "w")
    assert list(tmp_path.iterdir()) == []


class Source:
    """Serves weights from a dict; counts downloads."""

    def __init__(self, *blobs: bytes) -> None:
        self.blobs = {sha(b): b for b in blobs}
        self.asked: list[str] = []

    def get_weights(
        self, sha256: str, dest: Path, max_bytes: int | None = None, give_up: Any = None
    ) -> int:
        self.asked.append(sha256)
        dest.write_bytes(self.blobs[sha256])
        return len(self.blobs[sha256])


def test_a_cached_hash_needs_no_download(tmp_path: Path) -> None:
    source, cache = Source(b"round0"), WeightsCache(tmp_path / "weights")
    first = cache.get(source, sha(b"round0"), 6)
    second = cache.get(source, sha(b"round0"), 6)
    assert first == second and first.read_bytes() == b"round0"
    assert source.asked == [sha(b"round0")]
    assert (cache.hits, cache.downloads) == (1, 1)


def test_a_cached_file_of_the_wrong_size_is_fetched_again(tmp_path: Path) -> None:
    source, cache = Source(b"round0"), WeightsCache(tmp_path / "weights")
    cache.path(sha(b"round0")).parent.mkdir(parents=True)
    cache.path(sha(b"round0")).write_bytes(b"trunc")
    assert cache.get(source, sha(b"round0"), 6).read_bytes() == b"round0"
    assert source.asked == [sha(b"round0")]


def test_the_cache_keeps_four_files_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    blobs = [f"round{i}".encode() for i in range(6)]
    source, cache = Source(*blobs), WeightsCache(tmp_path / "weights")
    for blob in blobs[:4]:
        cache.get(source, sha(blob))
    cache.get(source, sha(blobs[0]))  # a hit: round0 is now the most recently used
    cache.get(source, sha(blobs[4]))  # evicts round1, the least recently used
    kept = {p.name.split(".")[0] for p in cache.files()}
    assert kept == {sha(blobs[i]) for i in (0, 2, 3, 4)}
    cache.get(source, sha(blobs[5]))  # evicts round2
    assert len(cache.files()) == 4 and not cache.path(sha(blobs[2])).exists()
    assert cache.files()[-1] == cache.path(sha(blobs[5]))


def test_a_corrupt_download_leaves_the_cache_as_it_was(tmp_path: Path) -> None:
    cache = WeightsCache(tmp_path / "weights")
    client = Client("http://coord", "t", transport=served(b"tampered"))
    with pytest.raises(DownloadMismatch):
        cache.get(client, sha(b"weights"), 7)
    assert cache.files() == [] and list(cache.directory.iterdir()) == []


# -- argv and environment ------------------------------------------------------------------


def test_a_replica_job_runs_the_replica_program_on_its_prepared_files(tmp_path: Path) -> None:
    files = ReplicaFiles(tmp_path / "task.json", tmp_path / "w.safetensors", tmp_path / "state")
    argv = build_argv(replica_spec(), tmp_path / "out", files)
    assert argv[:4] == [sys.executable, "-u", "-m", "trainfleet.train.replica"]
    assert argv[4:] == [
        "--task",
        str(files.task),
        "--weights",
        str(files.weights),
        "--state-dir",
        str(files.state_dir),
        "--output",
        str(tmp_path / "out"),
    ]
    with pytest.raises(ValueError, match="prepared files"):
        build_argv(replica_spec(), tmp_path / "out")


def test_the_link_cap_reaches_replica_programs_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(env.MAX_MBPS, "999")  # inherited by the worker: not passed on as is
    claim = {"attempt": 1, "job": {"id": JOB_ID, "name": "r", "spec": replica_spec()}}
    assert build_env(claim, tmp_path, 1, max_mbps=2.5)[env.MAX_MBPS] == "2.5"
    assert env.MAX_MBPS not in build_env(claim, tmp_path, 1)
    train = {"kind": "train", "mode": "full"}
    claim = {"attempt": 1, "job": {"id": JOB_ID, "name": "t", "spec": train}}
    assert env.MAX_MBPS not in build_env(claim, tmp_path, 1, max_mbps=2.5)


def test_the_state_dir_is_per_run_and_replica_and_outlives_attempts(tmp_path: Path) -> None:
    task = replica_task(replica_spec())
    assert state_dir(tmp_path, task) == tmp_path / "runs" / RUN_ID / "replica1"
    with pytest.raises(ValueError):
        replica_task({"kind": "replica"})


def test_contribution_falls_back_to_the_task_and_the_files_header(tmp_path: Path) -> None:
    path = tmp_path / "pg.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"codec": "topk"})
    task = replica_task(replica_spec())
    got = contribution(task, {"compute_s": 1.5}, path, 123)
    assert got == {
        "codec": "topk",
        "payload_bytes": 123,
        "inner_steps_done": 5,
        "compute_s": 1.5,
        "round": 2,
        "replica": 1,
    }
    assert contribution(task, {"codec": "int8", "inner_steps_done": 3}, path, 1)["codec"] == "int8"


# -- the attempt ---------------------------------------------------------------------------

# Stands in for ``python -m trainfleet.train.replica``: checks its files, writes its outputs.
FAKE_REPLICA = """
import argparse, json, os, pathlib
p = argparse.ArgumentParser()
for a in ("--task", "--weights", "--state-dir", "--output"):
    p.add_argument(a)
a = p.parse_args()
task = json.loads(pathlib.Path(a.task).read_text())
assert pathlib.Path(a.weights).read_bytes() == b"w" * 100
assert pathlib.Path(a.state_dir).is_dir()
out = pathlib.Path(a.output)
(out / "pseudograd.safetensors").write_bytes(b"PG" * 50)
(out / "other.bin").write_bytes(b"not uploaded")
(out / "metrics.json").write_text(json.dumps({
    "codec": "int8", "inner_steps_done": task["inner_steps"], "compute_s": 0.25,
    "max_mbps": os.environ.get("TRAINFLEET_MAX_MBPS"), "exit": 0}))
raise SystemExit(int(os.environ.get("FAKE_EXIT", "0")))
"""


class ReplicaClient(FakeClient):
    def __init__(self, weights: bytes = b"w" * 100, error: Exception | None = None) -> None:
        super().__init__()
        self.weights, self.error = weights, error
        self.stall = False
        self.uploads: list[tuple[str, bytes, str]] = []

    def get_weights(
        self, sha256: str, dest: Path, max_bytes: int | None = None, give_up: Any = None
    ) -> int:
        self.record("get_weights", sha256)
        if self.stall:  # a long download: until the attempt gives up on it
            wait_until(give_up, 30, "the attempt to give up on its download")
            raise TransferAborted("download abandoned")
        if self.error is not None:
            raise self.error
        dest.write_bytes(self.weights)
        return len(self.weights)

    def upload(self, job_id: str, epoch: int, path: Path, sha256: str, name: str) -> None:
        self.uploads.append((sha256, path.read_bytes(), name))
        super().upload(job_id, epoch, path, sha256, name)


@pytest.fixture
def fake_program(monkeypatch) -> None:
    real = attempt_module.build_argv

    def argv(spec: dict[str, Any], output: Path, files: ReplicaFiles | None = None) -> list[str]:
        built = real(spec, output, files)
        assert built[2:4] == ["-m", "trainfleet.train.replica"]
        return [built[0], "-c", FAKE_REPLICA, *built[4:]]

    monkeypatch.setattr(attempt_module, "build_argv", argv)


def replica_attempt(
    client: Any, workdir: Path, cache: WeightsCache, attempt: int = 1, **task: Any
) -> Attempt:
    return make_attempt(
        client,
        workdir,
        "collab.r2.k1",
        replica_spec(**task),
        attempt=attempt,
        max_mbps=4.0,
        weights=cache,
    )


def test_a_replica_uploads_its_pseudogradient_and_reports_its_contribution(
    tmp_path: Path, fake_program: None
) -> None:
    client, cache = ReplicaClient(), WeightsCache(tmp_path / "cache" / "weights")
    outcome = replica_attempt(client, tmp_path, cache).run()
    assert outcome.status == "completed", outcome.detail
    assert client.uploads == [(sha(b"PG" * 50), b"PG" * 50, "pseudograd.safetensors")]
    result = outcome.result
    assert (result["artifact"], result["artifact_size"]) == (sha(b"PG" * 50), 100)
    assert result["metrics"]["max_mbps"] == "4"  # the volunteer's cap reached the program
    assert result["contribution"] == {
        "codec": "int8",
        "payload_bytes": 100,
        "inner_steps_done": 5,
        "compute_s": 0.25,
        "round": 2,
        "replica": 1,
    }
    assert (tmp_path / "runs" / RUN_ID / "replica1").is_dir()
    # A second attempt on the same weights: no second download.
    again = replica_attempt(client, tmp_path, cache, attempt=2).run()
    assert again.status == "completed"
    assert client.kinds().count("get_weights") == 1 and cache.hits == 1


def test_a_replica_exiting_3_is_failed_and_not_retried(
    tmp_path: Path, fake_program: None, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_EXIT", "3")
    client = ReplicaClient()
    outcome = replica_attempt(client, tmp_path, WeightsCache(tmp_path / "w")).run()
    assert outcome.status == "failed"
    fails = [v for k, v in client.calls if k == "fail"]
    assert fails and fails[0]["retryable"] is False and "exit code 3" in fails[0]["error"]
    assert client.uploads == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (DownloadMismatch("the bytes received hash to 00, not ab; refused"), "refused"),
        (NotFound("no weights"), "coordinator refused the weights: no weights"),
    ],
)
def test_weights_that_cannot_be_had_fail_the_attempt_retryably(
    tmp_path: Path, fake_program: None, error: Exception, expected: str
) -> None:
    client = ReplicaClient(error=error)
    outcome = replica_attempt(client, tmp_path, WeightsCache(tmp_path / "w")).run()
    assert outcome.status == "failed" and expected in outcome.detail
    fails = [v for k, v in client.calls if k == "fail"]
    assert fails[0]["retryable"] is True
    assert "complete" not in client.kinds()


def test_a_malformed_task_is_failed_for_good(tmp_path: Path, fake_program: None) -> None:
    client = ReplicaClient()
    outcome = replica_attempt(client, tmp_path, WeightsCache(tmp_path / "w"), round=-1).run()
    assert outcome.status == "failed" and "malformed replica task" in outcome.detail
    assert next(v for k, v in client.calls if k == "fail")["retryable"] is False
    assert "get_weights" not in client.kinds()


def test_an_attempt_cancelled_during_its_download_stops_and_reports_nothing(
    tmp_path: Path, fake_program: None
) -> None:
    client = ReplicaClient()
    client.stall = True
    client.on_heartbeat = lambda: {"cancel": True, "state": "cancelled"}
    outcome = replica_attempt(client, tmp_path, WeightsCache(tmp_path / "w")).run()
    assert outcome.status == "cancelled"
    assert client.kinds() == ["get_weights"]  # no failure, no upload, no result

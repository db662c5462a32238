"""End to end: a live coordinator (uvicorn), real worker processes, the real CLI."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
from urllib.parse import urlparse

import pytest

from fleetkit import make_cap
from livefleet import Fleet, kill_tree, slow_job, wait_until
from trainfleet.client import Client
from trainfleet.errors import IntegrityError, StaleEpoch

pytestmark = pytest.mark.slow

TINY = (
    "hyper = { steps = 5, n_layers = 1, d_model = 16, n_heads = 2, seq_len = 16, batch_size = 4,"
    " corpus_bytes = 20000, eval_batches = 2 }"
)


def test_train_and_command_jobs_complete_with_artifacts(fleet: Fleet, tmp_path) -> None:
    fleet.reload(f'[[jobs]]\nname = "tiny-gpt"\nmode = "smoke"\n{TINY}\n' + slow_job("cmd", 0.3))
    worker = fleet.start_worker("cpu-a", "--exit-when-idle-s", "0.5")
    for name in ("tiny-gpt", "cmd"):
        job = fleet.wait_state(name, {"completed", "failed"})
        assert job["state"] == "completed", job["error"]
        assert job["host"] == "cpu-a" and job["attempt"] == 1
    assert worker.wait(timeout=60) == 0  # exits by itself once idle, after deregistering

    gpt = fleet.job("tiny-gpt")
    metrics = gpt["job"]["result"]["metrics"]
    assert (
        metrics["steps"] == 5 and 0 < metrics["heldout_loss"] < 10 and metrics["tokens_per_s"] > 0
    )
    [artifact] = gpt["artifacts"]
    assert artifact["sha256"] == gpt["job"]["result"]["artifact"]
    assert artifact["capability"]["host"] == "cpu-a" and artifact["attempt"] == 1
    # The stored bytes are what the worker hashed, and they unpack to the checkpoint.
    out = fleet.cli("download", "tiny-gpt", "-o", str(tmp_path / "dl"), check=True)
    assert "files from artifact" in out.stdout
    assert (tmp_path / "dl" / "tiny-gpt" / "model.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "dl" / "tiny-gpt" / "metrics.json").read_text()) == metrics

    logs = fleet.cli("logs", "tiny-gpt", check=True).stdout
    assert "held-out loss" in logs
    followed = fleet.cli("logs", "cmd", "--follow", check=True).stdout  # returns: job is done
    assert followed.splitlines()[0] == "started attempt 1" and "finished" in followed
    listing = json.loads(fleet.cli("list", "--json", check=True).stdout)
    assert {j["name"]: j["state"] for j in listing} == {"tiny-gpt": "completed", "cmd": "completed"}
    workers = json.loads(fleet.cli("workers", "--json", check=True).stdout)
    assert [w["state"] for w in workers] == ["stopped"]


def test_killed_worker_job_is_requeued_and_completed_elsewhere(fleet: Fleet) -> None:
    fleet.reload(slow_job("long", 4.0, max_failures=3))
    first = fleet.start_worker("host-a")
    fleet.wait_state("long", {"running"})
    wait_until(lambda: fleet.operator.logs("long")["lines"], 30, "the job's first log lines")
    kill_tree(first)  # the worker and its job die without a word
    first.wait(timeout=10)
    # Back in the queue once its beats stop (3 s here); only then may a worker that leaves
    # after 2 s idle start, or it could find nothing to do and go.
    fleet.wait_state("long", {"pending"}, timeout_s=30)
    second = fleet.start_worker("host-b", "--exit-when-idle-s", "2")
    job = fleet.wait_state("long", {"completed", "failed"}, timeout_s=120)
    assert job["state"] == "completed"
    assert job["host"] == "host-b" and job["attempt"] == 2 and job["num_failures"] == 1
    kinds = [e["kind"] for e in fleet.job("long")["events"]]
    assert kinds.index("lost") < kinds.index("completed")
    assert (
        "no heartbeat"
        in next(e for e in fleet.job("long")["events"] if e["kind"] == "lost")["detail"]
    )
    assert second.wait(timeout=60) == 0


def test_stale_epoch_is_refused_after_the_job_moved_on(fleet: Fleet) -> None:
    fleet.reload(slow_job("j", 0.2))
    # A worker that claims and then goes silent, played by the test over real HTTP.
    with Client(fleet.url, fleet.worker_token("ghost")) as joiner:
        token = joiner.register(make_cap("ghost").model_dump(mode="json"))["token"]
    with Client(fleet.url, token) as ghost:
        claim = ghost.claim()
        assert claim is not None and claim["epoch"] == 1
        fleet.wait_state("j", {"pending"}, timeout_s=30)  # requeued after 3 s of silence
        real = fleet.start_worker("real", "--exit-when-idle-s", "2")
        job = fleet.wait_state("j", {"completed"}, timeout_s=60)
        assert job["host"] == "real" and job["epoch"] == 2
        with pytest.raises(StaleEpoch):
            ghost.complete(claim["job"]["id"], 1, {"metrics": {"heldout_loss": 0.0}})
        with pytest.raises(StaleEpoch):
            ghost.heartbeat(claim["job"]["id"], 1)
    assert fleet.job("j")["job"]["result"]["metrics"]["heldout_loss"] == 1.5
    real.wait(timeout=60)


def test_wrong_tokens_are_refused_with_clear_errors(fleet: Fleet) -> None:
    worker = fleet.start_worker("intruder", token="not-the-join-token")
    assert worker.wait(timeout=60) == 1
    assert "unknown join token" in worker.log_text()
    out = fleet.cli("list", "--token", "nope")
    assert out.returncode == 1 and "wrong operator token" in out.stderr
    assert "Traceback" not in out.stderr


def test_corrupted_and_truncated_uploads_are_refused(fleet: Fleet) -> None:
    fleet.reload(slow_job("j", 0.2))
    with Client(fleet.url, fleet.worker_token("w")) as joiner:
        token = joiner.register(make_cap("w").model_dump(mode="json"))["token"]
    worker = Client(fleet.url, token)
    claim = worker.claim()
    assert claim is not None
    job_id, epoch = claim["job"]["id"], claim["epoch"]
    payload = b"checkpoint bytes " * 1000
    good = hashlib.sha256(payload).hexdigest()
    path = fleet.tmp / "payload.bin"
    path.write_bytes(payload[:-1] + b"X")  # one byte flipped after hashing
    with pytest.raises(IntegrityError):
        worker.upload(job_id, epoch, path, good, "outputs.tar.zst")

    # Truncated: promise the full length, send half, hang up.
    url = urlparse(fleet.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        head = (
            f"PUT /v1/jobs/{job_id}/artifacts/{good}?epoch={epoch}&size={len(payload)} HTTP/1.1\r\n"
            f"Host: {url.hostname}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        sock.sendall(head + payload[: len(payload) // 2])
        sock.shutdown(socket.SHUT_WR)
        sock.recv(4096)
    assert fleet.job("j")["artifacts"] == []
    assert not fleet.coord.store.exists(good)

    path.write_bytes(payload)  # the honest upload still goes through afterwards
    record = worker.upload(job_id, epoch, path, good, "outputs.tar.zst")
    assert record["sha256"] == good and fleet.coord.store.read_bytes(good) == payload
    worker.close()


def test_cancelled_job_is_stopped_and_its_completion_refused(fleet: Fleet) -> None:
    fleet.reload(slow_job("doomed", 30.0) + slow_job("next", 0.2, priority=-1))
    worker = fleet.start_worker("cpu-a", "--exit-when-idle-s", "0.5")
    fleet.wait_state("doomed", {"running"})
    out = fleet.cli("cancel", "doomed", check=True)
    assert "cancelled doomed" in out.stdout
    # The worker sees the cancel at its next heartbeat, stops the job, moves on.
    fleet.wait_state("next", {"completed"}, timeout_s=60)
    detail = fleet.job("doomed")
    assert detail["job"]["state"] == "cancelled" and detail["artifacts"] == []
    assert "completed" not in [e["kind"] for e in detail["events"]]
    assert worker.wait(timeout=60) == 0
    assert "cancelled by the operator" in worker.log_text()


def test_reload_changes_nothing_that_already_ran(fleet: Fleet) -> None:
    manifest = slow_job("a", 0.2) + slow_job("b", 0.2)
    manifest_path = fleet.tmp / "fleet.toml"
    manifest_path.write_text(manifest)
    fleet.cli("reload", str(manifest_path), check=True)
    worker = fleet.start_worker("cpu-a", "--exit-when-idle-s", "0.5")
    fleet.wait_state("a", {"completed"})
    fleet.wait_state("b", {"completed"})
    worker.wait(timeout=60)
    before = {n: fleet.job(n)["job"] for n in ("a", "b")}

    again = json.loads(fleet.cli("reload", str(manifest_path), "--json", check=True).stdout)
    assert (len(again["added"]), len(again["kept"]), len(again["changed"])) == (0, 2, 0)
    manifest_path.write_text(
        manifest.replace('name = "b"', 'name = "b"\npriority = 7') + slow_job("c", 0.2)
    )
    preview = fleet.cli("reload", str(manifest_path), "--dry-run", check=True).stdout
    assert "dry run" in preview and "added" in preview and "priority: 0 -> 7" in preview
    assert len(fleet.operator.jobs()) == 2  # the preview changed nothing
    fleet.cli("reload", str(manifest_path), check=True)
    after = {n: fleet.job(n)["job"] for n in ("a", "b")}
    for name in ("a", "b"):
        for key in ("state", "result", "attempt", "epoch", "host", "finished_at"):
            assert after[name][key] == before[name][key], (name, key)
    assert after["b"]["priority"] == 7
    assert fleet.job("c")["job"]["state"] == "pending"


def test_sigterm_hands_the_running_job_back(fleet: Fleet) -> None:
    fleet.reload(slow_job("long", 30.0))
    worker = fleet.start_worker("cpu-a")
    fleet.wait_state("long", {"running"})
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    job = fleet.job("long")
    assert job["job"]["state"] == "pending" and job["job"]["num_failures"] == 0
    assert job["events"][-1]["kind"] == "released"
    workers = fleet.operator.workers()
    assert workers[0]["state"] == "stopped" and workers[0]["current_job"] is None


def test_explain_says_why_a_job_waits(fleet: Fleet) -> None:
    fleet.reload(
        "[hosts.cpu-a]\ncuda = false\n[hosts.gpu-box]\ncuda = true\nvram_gib = 80\n"
        '[[jobs]]\nname = "big"\nrequire_cuda = true\nmin_vram_gib = 40\n' + TINY
    )
    worker = fleet.start_worker("cpu-a")
    wait_until(lambda: fleet.operator.workers(), 30, "the worker to register")
    out = fleet.cli("explain", "big", check=True).stdout
    assert "needs CUDA >= 40 GiB" in out and "eligible hosts: none online" in out
    assert "gpu-box (offline): could run it once a worker joins" in out
    kill_tree(worker, signal.SIGTERM)

"""Fleet identity against live processes: per-host enrollment, revocation, rotation, TLS
with a certificate made here, read auth, and tokens kept off command lines."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from livefleet import (
    REPO,
    Fleet,
    LiveFleet,
    free_port,
    serve_argv,
    slow_job,
    trainfleet_argv,
    wait_until,
)
from tlskit import self_signed
from trainfleet import env
from trainfleet.client import Client

pytestmark = pytest.mark.slow


def test_an_enrolled_host_joins_as_itself_and_nobody_else_can(fleet: Fleet) -> None:
    fleet.reload(
        "[hosts.gpu-box]\ncores = 1\n\n" + slow_job("pinned", 0.2, allowed_hosts=["gpu-box"])
    )
    token_file = fleet.tmp / "gpu-box.token"
    out = fleet.cli("hosts", "enroll", "gpu-box", "--token-file", str(token_file), check=True)
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token and token not in out.stdout + out.stderr  # written once, to the file only
    assert "trainfleet join" in out.stderr and "--token-file" in out.stderr
    assert "127.0.0.1 is this machine: from another one, use the coordinator's" in out.stderr

    # The shared join token (no open mode) and a different --host are refused, clearly.
    impostor = fleet.start_worker("gpu-box", token=fleet.coord.join_token)
    renamer = fleet.start_worker("laptop", token=token)
    real = fleet.start_worker("gpu-box", "--max-jobs", "1", token=token)
    assert impostor.wait(timeout=60) == 1 and renamer.wait(timeout=60) == 1
    assert "shared join token is refused" in impostor.log_text()
    assert "this token is enrolled for host gpu-box" in renamer.log_text()
    assert "Traceback" not in impostor.log_text() + renamer.log_text()
    job = fleet.wait_state("pinned", {"completed"}, timeout_s=60)
    assert job["host"] == "gpu-box"
    assert real.wait(timeout=60) == 0
    listing = fleet.cli("hosts", "list", check=True).stdout
    assert "gpu-box" in listing and "active" in listing and token not in listing


def test_revoking_a_host_requeues_its_job_at_once_and_keeps_it_out(fleet: Fleet) -> None:
    fleet.reload(slow_job("long", 60))
    worker = fleet.start_worker("cpu-a")
    fleet.wait_state("long", {"running"}, timeout_s=60)
    out = fleet.cli("workers", "revoke", "cpu-a", check=True)
    assert "revoked host cpu-a" in out.stdout and "requeued long" in out.stdout
    job = fleet.job("long")  # at once: no heartbeat timeout in between
    assert job["job"]["state"] == "pending"
    assert any(e["kind"] == "revoked" for e in job["events"])
    # The daemon's next request is refused; it stops the job; re-registering is refused.
    assert worker.wait(timeout=30) == 1
    assert "revoked" in worker.log_text()
    wait_until(lambda: not worker.job_pids(), 10, "the revoked worker's job to be stopped")
    assert fleet.job("long")["job"]["state"] == "pending"
    hosts = fleet.operator.hosts()
    assert [(h["name"], h["state"]) for h in hosts] == [("cpu-a", "revoked")]


def test_rotation_refuses_the_old_token_and_join_refuses_tokens_in_argv(fleet: Fleet) -> None:
    old = fleet.worker_token("cpu-a")
    rotated = fleet.cli("hosts", "rotate", "cpu-a", check=True)
    new = rotated.stdout.strip()  # without --token-file: the token alone on stdout, once
    assert len(new) >= 40 and "\n" not in new and new not in rotated.stderr
    stale = fleet.start_worker("cpu-a", token=old)
    fresh = fleet.start_worker("cpu-a", "--max-jobs", "0", token=new)
    argv = fleet.cli("join", fleet.url, "--token", new)
    assert argv.returncode != 0 and "visible to every user" in argv.stderr
    assert stale.wait(timeout=60) == 1
    assert "unknown join token" in stale.log_text()
    assert fresh.wait(timeout=60) == 0
    # A token file that other users can read still works, with a warning that says so.
    loose = fleet.tmp / "loose.token"
    loose.write_text(new + "\n")
    loose.chmod(0o644)
    work = str(fleet.tmp / "work-loose")
    joined = fleet.cli(
        "join", fleet.url, "--token-file", str(loose), "--max-jobs", "0", "--workdir", work
    )
    assert joined.returncode == 0, joined.stderr
    assert f"{loose} holds a token and other users can read it; chmod 600" in joined.stderr


def test_open_mode_admits_the_shared_token_as_a_new_policy_less_host(tmp_path: Path) -> None:
    with LiveFleet(tmp_path, open_join=True, public_reads=True) as fleet:
        fleet.reload(
            "[hosts.gpu-box]\nram_gib = 0.5\n\n"
            + slow_job("pinned", 0.2, allowed_hosts=["gpu-box"])
            + slow_job("anyone", 0.2)
        )
        worker = fleet.start_worker("gpu-box", "--max-jobs", "1", token=fleet.coord.join_token)
        assert worker.wait(timeout=60) == 0
        public = httpx.get(f"{fleet.url}/v1/jobs", timeout=30)  # --public-reads: no token
        assert public.status_code == 200
        jobs = {j["name"]: j for j in public.json()["jobs"]}
        # Neither gpu-box's pinned job nor gpu-box's policy (its RAM cap) apply.
        assert jobs["anyone"]["state"] == "completed" and jobs["anyone"]["host"] == "open:gpu-box"
        assert jobs["pinned"]["state"] == "pending"
        (joined,) = httpx.get(f"{fleet.url}/v1/workers", timeout=30).json()["workers"]
        assert joined["host"] == "open:gpu-box" and joined["notes"] == []
        assert joined["effective"] == joined["capability"]


# TLS ----------------------------------------------------------------------------------


def run_cli(*args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    return cli_in(REPO, *args, **env_vars)


def clean_env() -> dict[str, str]:
    """This environment without any TRAINFLEET_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}


@pytest.fixture
def tls_coordinator(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """``trainfleet serve --tls-cert/--tls-key`` as a process: (url, CA file, serve log)."""
    cert, key = self_signed(tmp_path)
    port, log = free_port(), tmp_path / "serve.log"
    (tmp_path / "op.token").write_text("operator-secret\n")
    with log.open("w") as out:
        server = subprocess.Popen(
            serve_argv(
                port,
                tmp_path / "state",
                "--operator-token-file",
                str(tmp_path / "op.token"),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
        url = f"https://127.0.0.1:{port}"
        try:
            with Client(url, ca_cert=cert) as probe:
                probe.wait_healthy(30)
            yield url, cert, log
        finally:
            server.terminate()
            server.wait(timeout=30)


def test_a_worker_joins_over_tls_and_a_client_without_the_ca_is_refused(
    tls_coordinator: tuple[str, Path, Path], tmp_path: Path
) -> None:
    url, ca, serve_log = tls_coordinator
    op = {env.URL: url, env.TOKEN: "operator-secret"}
    refused = run_cli("status", **op)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "certificate is not trusted" in refused.stderr and "--ca-cert" in refused.stderr
    with_ca = {**op, env.CA_CERT: str(ca)}
    manifest = tmp_path / "fleet.toml"
    manifest.write_text(slow_job("secure", 0.2))
    run_cli("reload", str(manifest), **with_ca).check_returncode()
    token_file = tmp_path / "tls-box.token"
    enrolled = run_cli("hosts", "enroll", "tls-box", "--token-file", str(token_file), **with_ca)
    assert enrolled.returncode == 0, enrolled.stderr
    assert f"join {url} --token-file {token_file} --ca-cert" in enrolled.stderr  # the hint
    worker = run_cli(
        "join",
        url,
        "--token-file",
        str(token_file),
        "--ca-cert",
        str(ca),
        "--workdir",
        str(tmp_path / "work"),
        "--poll-interval-s",
        "0.2",
        "--max-jobs",
        "1",
    )
    assert worker.returncode == 0, worker.stderr
    with Client(url, "operator-secret", ca_cert=ca) as operator:
        job = operator.job("secure")["job"]
        assert job["state"] == "completed" and job["host"] == "tls-box"
        # Reads and /metrics need the operator token; /health does not.
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
            assert http.get(f"{url}/metrics").status_code == 401
            assert http.get(f"{url}/v1/jobs").status_code == 401
            assert http.get(f"{url}/health").status_code == 200
    printed = serve_log.read_text()
    shared = (tmp_path / "state" / "join.token").read_text().strip()
    assert "https://" in printed and "hosts enroll" in printed and shared not in printed


def test_the_cli_checks_host_names_and_lists_a_revoked_worker_as_revoked(fleet: Fleet) -> None:
    # A name the policy refuses is refused here, by the policy: '..' would otherwise change
    # the URL it is sent in (the old reply was a bare "Not Found").
    for argv in (("hosts", "enroll", ".."), ("workers", "revoke", "..")):
        out = fleet.cli(*argv)
        assert out.returncode == 1 and "invalid host name" in out.stderr, (argv, out.stderr)
        assert "Traceback" not in out.stderr
    worker = fleet.start_worker("cpu-a")
    first = wait_until(lambda: fleet.operator.workers(), 30, "the worker to register")[0]["id"]
    fleet.cli("workers", "revoke", first, check=True)
    # Its daemon registers again with its host's token, as a new worker; the old id stays
    # listed, revoked, holding nothing.
    wait_until(lambda: len(fleet.operator.workers()) == 2, 30, "the daemon to register again")
    listed = {w["id"]: w for w in json.loads(fleet.cli("workers", "--json", check=True).stdout)}
    assert listed[first]["state"] == "revoked" and listed[first]["current_job"] is None
    assert [w["state"] for i, w in listed.items() if i != first] == ["online"]
    table = fleet.cli("workers", check=True).stdout
    assert "revoked" in table and "online" in table
    assert worker.proc.poll() is None  # one worker revoked alone: the machine is not locked out


# What `serve` prints, followed as printed ----------------------------------------------


def cli_in(cwd: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """``trainfleet ARGS`` in ``cwd``, as a user's shell there would run it (no TRAINFLEET_*
    but ``env_vars``)."""
    return subprocess.run(
        trainfleet_argv(*args),
        capture_output=True,
        text=True,
        env={**clean_env(), **env_vars},
        cwd=cwd,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_serve_prints_commands_that_work_as_printed_and_join_names_its_token_and_host(
    tmp_path: Path,
) -> None:
    # Every interface, a port and a state dir other than the defaults: the printed enroll
    # command must carry --url and --state-dir, and the join command a reachable address.
    port, log = free_port(), tmp_path / "serve.log"
    serve_args = ["--host", "0.0.0.0", "--port", str(port), "--state-dir", "state"]
    with log.open("w") as out:
        server = subprocess.Popen(
            trainfleet_argv("serve", *serve_args),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
        )
    try:
        printed = wait_until(
            lambda: "trainfleet join" in (text := log.read_text()) and text, 60, "serve's hints"
        )
        enroll = next(line for line in printed.splitlines() if "trainfleet hosts enroll" in line)
        join = next(line for line in printed.splitlines() if "trainfleet join" in line)
        assert "0.0.0.0" not in join and f":{port} " in join, printed
        assert "in another shell, in this directory" in printed
        # The enroll command, run as printed, in another shell in the same directory.
        words = enroll.replace("NAME", "cpu-a").split()
        assert words[:3] == ["trainfleet", "hosts", "enroll"]
        enrolled = cli_in(tmp_path, *words[1:])
        assert enrolled.returncode == 0, (enroll, enrolled.stderr)
        url, work = (
            f"http://127.0.0.1:{port}",
            ("--workdir", str(tmp_path / "w"), "--max-jobs", "0"),
        )
        # No --host: the name comes from the token, and every log line says so.
        joined = cli_in(tmp_path, "join", url, "--token-file", "cpu-a.token", *work)
        assert joined.returncode == 0, joined.stderr
        assert "[worker cpu-a] registered as" in joined.stderr, joined.stderr
        assert f"[worker {os.uname().nodename}]" not in joined.stderr
        # No token given: join says it tries the state dir's shared token, and the
        # coordinator (enrolled hosts only) refuses it in one clear message.
        shared = cli_in(tmp_path, "join", url, "--state-dir", "state", *work)
        assert shared.returncode == 1 and "Traceback" not in shared.stderr
        said = f"no --token-file or {env.JOIN_TOKEN}: trying the shared open-mode join token in"
        assert said in shared.stderr and "shared join token is refused" in shared.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)

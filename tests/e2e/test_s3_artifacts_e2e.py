"""End to end on object storage: a real ``trainfleet serve --artifacts s3://...`` process on a
live S3 API server (moto), a real worker and the real CLI. The job's artifact (11 MiB,
incompressible) lands in the bucket as a multipart upload of 5 MiB parts and comes back
byte-identical through the coordinator, by the CLI and over HTTP. Neither the worker nor the
CLI has any bucket credentials: downloads are proxied by the coordinator."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from livefleet import REPO, command_job, free_port, serve_argv, trainfleet_argv, wait_until
from trainfleet import env
from trainfleet.client import Client
from trainfleet.queue.sqlite import SQLiteQueue
from trainfleet.testing.s3 import MotoServer

pytestmark = pytest.mark.slow

SIZE = 11 * 1024 * 1024 + 5  # three 5 MiB parts once packed
WRITE = (
    "import os, pathlib, random; out = pathlib.Path(os.environ['TRAINFLEET_OUTPUT_DIR']);"
    f" (out / 'blob.bin').write_bytes(random.Random(7).randbytes({SIZE}))"
)


def no_aws_env() -> dict[str, str]:
    """This process's environment without any AWS variable: what a worker or CLI gets."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def test_artifact_lands_in_the_bucket_and_downloads_back(tmp_path: Path) -> None:
    expected = random.Random(7).randbytes(SIZE)
    port, state = free_port(), tmp_path / "state"
    url = f"http://127.0.0.1:{port}"
    queue = SQLiteQueue(state / "queue.db")
    join_token = queue.enroll_host("s3-host")
    queue.close()
    procs: list[subprocess.Popen[bytes]] = []
    operator = Client(url, "op")
    with MotoServer(tmp_path) as s3, (tmp_path / "procs.log").open("wb") as log:
        bucket = s3.create_bucket()

        def start(argv: list[str], environ: dict[str, str]) -> None:
            procs.append(
                subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                    stdin=subprocess.DEVNULL, env=environ,
                )
            )  # fmt: skip

        try:
            start(
                serve_argv(
                    port, state, "--artifacts", f"s3://{bucket}/fleet", "--artifact-part-mib", "5"
                ),
                {**no_aws_env(), **s3.env(), env.TOKEN: "op"},
            )
            operator.wait_healthy(60)
            operator.reload(command_job("to-s3", [sys.executable, "-c", WRITE]), "m.toml")
            start(
                trainfleet_argv(
                    "join", url, "--host", "s3-host", "--workdir", str(tmp_path / "work"),
                    "--poll-interval-s", "0.2",
                    # A short long poll: the coordinator's graceful stop at the end waits
                    # for the claim in flight (the default 20 s one ends at its recheck).
                    "--claim-wait-s", "1",
                ),
                {**no_aws_env(), env.JOIN_TOKEN: join_token},
            )  # fmt: skip
            wait_until(
                lambda: operator.job("to-s3")["job"]["state"] in ("completed", "failed"),
                120,
                "the job to finish",
            )
            detail = operator.job("to-s3")
            assert detail["job"]["state"] == "completed", detail["job"]["error"]
            sha = detail["job"]["result"]["artifact"]
            [artifact] = detail["artifacts"]
            assert artifact["sha256"] == sha

            # In the bucket, under the prefix, as a multipart object; not on local disk.
            head = s3.client().head_object(Bucket=bucket, Key=f"fleet/sha256/{sha[:2]}/{sha}")
            assert head["ContentLength"] == artifact["size"] > 2 * 5 * 1024 * 1024
            assert int(head["ETag"].strip('"').rsplit("-", 1)[1]) >= 3
            assert not (state / "artifacts").exists()
            in_bucket = s3.client().get_object(Bucket=bucket, Key=f"fleet/sha256/{sha[:2]}/{sha}")
            bucket_bytes = in_bucket["Body"].read()
            assert hashlib.sha256(bucket_bytes).hexdigest() == sha

            # Back over HTTP (streamed by the coordinator) and by the CLI, byte-identical.
            got = tmp_path / "over-http.tar.zst"
            assert operator.download(sha, got) == artifact["size"]
            assert got.read_bytes() == bucket_bytes
            cli = subprocess.run(
                trainfleet_argv("download", "to-s3", "-o", str(tmp_path / "out"), "--url", url),
                capture_output=True, cwd=REPO, env={**no_aws_env(), env.TOKEN: "op"},
                timeout=120,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr.decode()
            assert (tmp_path / "out" / "to-s3" / "blob.bin").read_bytes() == expected
        finally:
            operator.close()
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)

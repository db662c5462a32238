"""A real S3 API server for tests: moto in server mode, a subprocess on a free port.

Tests of the object-storage backend talk HTTP to a live S3 endpoint, exactly as the
coordinator talks to AWS S3, MinIO or any S3-compatible store: same client (s3fs over
aiobotocore), same signatures, same multipart protocol. ``moto[server]`` (the dev extra) is
that endpoint. The server is found through the standard AWS environment variables
(:meth:`MotoServer.env`), so a ``trainfleet serve`` subprocess started with them needs no
other configuration, which is how an operator configures it too.

::

    with MotoServer() as s3:
        bucket = s3.create_bucket()
        with s3.environment():  # AWS_ENDPOINT_URL_S3 and test credentials, restored after
            store = ArtifactStore(f"s3://{bucket}/artifacts")
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from trainfleet.testing.wait import wait_until
from trainfleet.worker.shepherd import set_parent_death_signal

__all__ = ["MotoServer"]


class MotoServer:
    """``with MotoServer(log_dir) as s3:`` an S3 API server on 127.0.0.1, killed on exit."""

    def __init__(self, log_dir: Path | None = None, start_timeout_s: float = 60.0):
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point any AWS SDK (and s3fs) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "trainfleet-test",
            "AWS_SECRET_ACCESS_KEY": "trainfleet-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @contextlib.contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """Set :meth:`env` in ``os.environ`` for the block (an ambient AWS profile or
        endpoint is hidden), restoring the previous values after."""
        names = [*self.env(), "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"]
        saved = {name: os.environ.get(name) for name in names}
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(self.env())
        try:
            yield self.env()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def start(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_dir is not None:
            self._log = (self.log_dir / f"moto-{self.port}.log").open("wb")
            out = self._log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=functools.partial(set_parent_death_signal, signal.SIGKILL),
        )
        wait_until(self._answers, self.start_timeout_s, f"moto S3 server on {self.endpoint}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {self.proc.returncode}")
        try:
            return httpx.get(f"{self.endpoint}/moto-api/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def client(self) -> Any:
        """A boto3 S3 client on this server (for test set-up and inspection)."""
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"tf-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MotoServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

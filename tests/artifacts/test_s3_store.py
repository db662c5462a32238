"""What the S3 backend adds to the store contract (tests/artifacts/test_store.py runs the
contract itself on S3 too), against a live S3 API server: explicit multipart uploads, an
aborted upload leaves nothing visible, bounded reads, grace-period refresh, presigned URLs,
configuration by storage options or AWS environment, and a clear error for a missing bucket."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from s3kit import PART
from trainfleet.artifacts import ArtifactStore, IngestBuffer
from trainfleet.artifacts import s3 as s3mod
from trainfleet.artifacts.gc import collect_garbage
from trainfleet.errors import StorageUnavailable
from trainfleet.testing.s3 import MotoServer


def staged(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / f"upload-{len(data)}.part"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def head(server: MotoServer, store: ArtifactStore, sha: str) -> dict[str, Any]:
    bucket, key = s3mod.split(store._path(sha))
    reply: dict[str, Any] = server.client().head_object(Bucket=bucket, Key=key)
    return reply


def test_large_artifact_is_a_multipart_upload_of_explicit_parts(
    s3_server: MotoServer, s3_store: ArtifactStore, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART + 12345)  # three parts: 5 MiB, 5 MiB, the rest
    with IngestBuffer(tmp_path / "staging", max_bytes=len(data)) as buf:
        for start in range(0, len(data), 1 << 20):
            buf.write(data[start : start + (1 << 20)])
        assert s3_store.commit_ingested(buf, buf.digest, len(data)) is True
    sha = hashlib.sha256(data).hexdigest()
    assert head(s3_server, s3_store, sha)["ETag"].endswith('-3"')  # S3's multipart ETag
    assert s3_store.size(sha) == len(data)
    assert s3_store.read_bytes(sha) == data


def test_artifact_up_to_one_part_is_a_single_put(
    s3_server: MotoServer, s3_store: ArtifactStore, tmp_path: Path
) -> None:
    path, sha = staged(tmp_path, os.urandom(PART))
    assert s3_store.commit_file(path, sha, PART) is True
    assert "-" not in head(s3_server, s3_store, sha)["ETag"]


def test_part_size_grows_past_ten_thousand_parts() -> None:
    assert s3mod.part_size(10_000 * PART, PART) == PART
    grown = s3mod.part_size(10_000 * PART + 1, PART)
    assert grown > PART and grown % (1 << 20) == 0 and 10_000 * grown >= 10_000 * PART + 1
    with pytest.raises(ValueError, match="at least"):
        s3mod.part_size(1, PART - 1)


def test_failed_multipart_upload_is_aborted_and_invisible(
    s3_server: MotoServer, s3_store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 * PART + 1)
    path, sha = staged(tmp_path, data)
    real_call = s3_store.fs.call_s3

    def flaky(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part" and kwargs["PartNumber"] == 2:
            raise ConnectionError("network dropped during part 2")
        return real_call(method, *args, **kwargs)

    monkeypatch.setattr(s3_store.fs, "call_s3", flaky)
    with pytest.raises(ConnectionError, match="part 2"):
        s3_store.commit_file(path, sha, len(data))
    monkeypatch.undo()
    assert not s3_store.exists(sha)
    assert list(s3_store.stored()) == []
    bucket, _ = s3mod.split(s3_store.root)
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3_store.commit_file(path, sha, len(data)) is True  # a retry then succeeds
    assert s3_store.read_bytes(sha) == data


def test_recommit_refreshes_the_object_for_the_gc_grace_period(
    s3_server: MotoServer, s3_store: ArtifactStore, tmp_path: Path
) -> None:
    path, sha = staged(tmp_path, b"same bytes, a second upload")
    assert s3_store.commit_file(path, sha, path.stat().st_size) is True
    assert "trainfleet-refreshed" not in head(s3_server, s3_store, sha).get("Metadata", {})
    assert s3_store.commit_file(path, sha, path.stat().st_size) is False
    assert "trainfleet-refreshed" in head(s3_server, s3_store, sha)["Metadata"]
    assert s3_store.read_bytes(sha) == b"same bytes, a second upload"


def test_reads_hold_at_most_about_one_block(s3_store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(2 * PART + 7)
    path, sha = staged(tmp_path, data)
    s3_store.commit_file(path, sha, len(data))
    got = hashlib.sha256()
    largest = 0
    with s3_store.open(sha) as f:
        while chunk := f.read(1 << 20):  # as the download route streams it
            got.update(chunk)
            largest = max(largest, len(f.cache.cache))  # type: ignore[attr-defined]
    assert got.hexdigest() == sha
    assert 0 < largest <= PART + (1 << 20)


def test_gc_collects_unbound_objects(s3_store: ArtifactStore, tmp_path: Path) -> None:
    kept_path, kept = staged(tmp_path, b"bound")
    gone_path, gone = staged(tmp_path, b"unbound")
    s3_store.commit_file(kept_path, kept, 5)
    s3_store.commit_file(gone_path, gone, 7)

    class Queue:
        def is_bound(self, sha256: str) -> bool:
            return sha256 == kept

    assert collect_garbage(s3_store, Queue(), grace_s=-60) == [gone]  # type: ignore[arg-type]
    assert s3_store.exists(kept) and not s3_store.exists(gone)


def test_presigned_url_downloads_without_credentials(
    s3_store: ArtifactStore, tmp_path: Path
) -> None:
    path, sha = staged(tmp_path, b"fetched by a worker with no bucket credentials")
    s3_store.commit_file(path, sha, path.stat().st_size)
    url = s3_store.presigned_url(sha, expires_s=60)
    assert url is not None and "Signature" in url
    reply = httpx.get(url)  # plain HTTP: no AWS credentials involved
    assert reply.status_code == 200 and reply.content == path.read_bytes()
    assert ArtifactStore(tmp_path / "local").presigned_url(sha) is None


def test_storage_options_instead_of_environment(
    s3_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.create_bucket()
    env = s3_server.env()
    for name in env:
        monkeypatch.delenv(name)
    store = ArtifactStore(
        f"s3://{bucket}/by-options",
        endpoint_url=s3_server.endpoint,
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"region_name": env["AWS_DEFAULT_REGION"]},
    )
    path, sha = staged(tmp_path, b"configured by fsspec storage options")
    assert store.commit_file(path, sha, path.stat().st_size) is True
    assert store.read_bytes(sha) == path.read_bytes()


def test_missing_bucket_is_a_clear_error_at_start(s3_server: MotoServer) -> None:
    with pytest.raises(StorageUnavailable, match="does not exist"):
        ArtifactStore("s3://no-such-bucket-trainfleet/artifacts", part_bytes=PART)


def test_serve_on_a_missing_bucket_exits_with_one_clear_line(
    s3_server: MotoServer, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from trainfleet.cli.main import app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", "--port", str(port), "--state-dir", str(tmp_path / "s")]
    result = CliRunner().invoke(app, [*argv, "--artifacts", "s3://no-such-bucket-tf/fleet"])
    assert result.exit_code == 1, result.output
    assert "artifact bucket 'no-such-bucket-tf' does not exist" in result.output
    assert "Traceback" not in result.output and "coordinator on" not in result.output

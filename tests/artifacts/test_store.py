"""Contract tests for ArtifactStore, run once against every backend (local dir, memory://,
s3:// on a live S3 API server)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from trainfleet.artifacts import ArtifactStore, IngestBuffer, sha256_file
from trainfleet.errors import BadRequest, IntegrityError, NotFound


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield ArtifactStore(tmp_path / "artifacts")
        return
    if request.param == "s3":  # a real S3 API server (moto), one bucket per test
        yield request.getfixturevalue("s3_store")
        return
    s = ArtifactStore(f"memory://trainfleet-test-{uuid.uuid4().hex}/artifacts")
    try:
        yield s
    finally:
        s.fs.rm(s.root, recursive=True)


def staged(tmp_path: Path, data: bytes, name: str = "upload.part") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def stored_files(store: ArtifactStore) -> list[str]:
    return list(store.fs.find(store.root))


def test_commit_then_read_back(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # spans several hashing chunks
    path, sha = staged(tmp_path, data)
    assert not store.exists(sha)
    assert store.commit_file(path, sha, len(data)) is True
    assert store.exists(sha)
    assert store.size(sha) == len(data)
    assert store.read_bytes(sha) == data
    with store.open(sha) as f:
        assert f.read(10) == data[:10]
    assert stored_files(store) == [f"{store.root}/sha256/{sha[:2]}/{sha}"]
    with fsspec.open(store.url_for(sha), "rb") as f:
        assert f.read() == data


def test_empty_artifact(store: ArtifactStore, tmp_path: Path) -> None:
    path, sha = staged(tmp_path, b"")
    assert store.commit_file(path, sha, 0) is True
    assert store.read_bytes(sha) == b""


def test_identical_bytes_stored_once(store: ArtifactStore, tmp_path: Path) -> None:
    first, sha = staged(tmp_path, b"same bytes", "a.part")
    second, _ = staged(tmp_path, b"same bytes", "b.part")
    assert store.commit_file(first, sha, 10) is True
    assert store.commit_file(second, sha, 10) is False
    assert len(stored_files(store)) == 1
    assert store.read_bytes(sha) == b"same bytes"


def test_wrong_digest_refused_and_nothing_stored(store: ArtifactStore, tmp_path: Path) -> None:
    path, real = staged(tmp_path, b"payload")
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(IntegrityError, match="sha256 mismatch") as info:
        store.commit_file(path, claimed, 7)
    assert claimed in str(info.value) and real in str(info.value)
    assert info.value.status_code == 422
    assert stored_files(store) == []
    assert not store.exists(claimed) and not store.exists(real)


def test_truncated_upload_refused_and_nothing_stored(store: ArtifactStore, tmp_path: Path) -> None:
    data = b"0123456789"
    full_sha = hashlib.sha256(data).hexdigest()
    path, _ = staged(tmp_path, data[:6])
    with pytest.raises(IntegrityError, match="declared 10 bytes, received 6"):
        store.commit_file(path, full_sha, len(data))
    assert stored_files(store) == []


@pytest.mark.parametrize(
    "digest",
    ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65, " " + "0" * 63, "0" * 64 + "\n"],
)
def test_malformed_digest_refused(store: ArtifactStore, tmp_path: Path, digest: str) -> None:
    path, _ = staged(tmp_path, b"x")
    with pytest.raises(BadRequest, match="malformed sha256"):
        store.commit_file(path, digest, 1)
    with pytest.raises(BadRequest):
        store.exists(digest)
    with pytest.raises(BadRequest):
        store.open(digest)
    assert stored_files(store) == []


def test_negative_size_refused(store: ArtifactStore, tmp_path: Path) -> None:
    path, sha = staged(tmp_path, b"x")
    with pytest.raises(BadRequest, match="size"):
        store.commit_file(path, sha, -1)


def test_missing_artifact_not_found(store: ArtifactStore) -> None:
    sha = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(sha)
    with pytest.raises(NotFound):
        store.open(sha)
    with pytest.raises(NotFound):
        store.read_bytes(sha)
    with pytest.raises(NotFound) as info:
        store.size(sha)
    assert info.value.status_code == 404


def test_ingest_buffer_then_commit(store: ArtifactStore, tmp_path: Path) -> None:
    chunks = [os.urandom(n) for n in (1, 65536, 0, 1000)]
    data = b"".join(chunks)
    with IngestBuffer(tmp_path / "staging", max_bytes=len(data)) as buf:
        for chunk in chunks:
            buf.write(chunk)
        buf.close()
        assert (buf.digest, buf.size) == (hashlib.sha256(data).hexdigest(), len(data))
        assert sha256_file(buf.path) == (buf.digest, buf.size)
        assert store.commit_file(buf.path, buf.digest, buf.size) is True
    assert not buf.path.exists()
    assert store.read_bytes(buf.digest) == data


# Local backend only.


def test_ingest_buffer_refuses_more_than_declared(tmp_path: Path) -> None:
    buf = IngestBuffer(tmp_path, max_bytes=4)
    buf.write(b"abc")
    with pytest.raises(IntegrityError, match="exceeds its declared size of 4"):
        buf.write(b"de")
    assert buf.size == 3
    buf.discard()
    buf.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("form", ["path", "str", "file-url"])
def test_local_root_forms(tmp_path: Path, form: str) -> None:
    root = tmp_path / "root"
    forms: dict[str, str | Path] = {"path": root, "str": str(root), "file-url": root.as_uri()}
    url = forms[form]
    store = ArtifactStore(url)
    path, sha = staged(tmp_path, b"hello")
    store.commit_file(path, sha, 5)
    assert (root / "sha256" / sha[:2] / sha).read_bytes() == b"hello"
    assert store.url_for(sha) == (root / "sha256" / sha[:2] / sha).as_uri()


def test_local_commit_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path / "root")
    path, sha = staged(tmp_path, b"will crash before rename")

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.commit_file(path, sha, path.stat().st_size)
    monkeypatch.undo()
    assert not store.exists(sha)
    assert [p for p in (tmp_path / "root").rglob("*") if p.is_file()] == []
    assert store.commit_file(path, sha, path.stat().st_size) is True
    assert [p.name for p in (tmp_path / "root").rglob("*") if p.is_file()] == [sha]

"""Content-addressed artifact storage on any fsspec filesystem.

An artifact is named by the sha256 of its bytes and stored once, at
``<root>/sha256/<first 2 hex>/<64 hex>``. The root is a local directory by default
(``ArtifactStore("/var/lib/tf/artifacts")``) or any fsspec URL (``memory://``, ``s3://`` ...),
so one coordinator keeps artifacts on disk and many replicas share an object store.

Uploads arrive in two steps. The coordinator streams the request body into an
:class:`IngestBuffer` (a staging file, hashed and counted as it is written), then calls
:meth:`ArtifactStore.commit_file` with the digest and size the client declared.
``commit_file`` re-hashes the staged file itself rather than trusting a precomputed digest:
one extra sequential read buys a single code path that verifies whatever is about to be
stored. Nothing is stored unless size and digest both match (:class:`IntegrityError`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from trainfleet.errors import BadRequest, IntegrityError, NotFound

CHUNK_BYTES = 1 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_digest(sha256: str) -> str:
    """Return ``sha256`` if it is a lowercase 64-hex digest, else raise :class:`BadRequest`."""
    if not isinstance(sha256, str) or not _DIGEST.fullmatch(sha256):
        raise BadRequest(f"malformed sha256 digest {sha256!r}: expected 64 lowercase hex digits")
    return sha256


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Return ``(sha256 hex digest, size in bytes)`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class ArtifactStore:
    """Artifacts named by sha256, stored once under a local directory or fsspec URL."""

    def __init__(self, url: str | os.PathLike[str], **storage_options: Any):
        self.url = os.fspath(url)
        fs, root = url_to_fs(self.url, **storage_options)
        self.fs = fs
        self.root: str = root.rstrip("/") or "/"
        self._local = isinstance(fs, LocalFileSystem)
        fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def _path(self, sha256: str) -> str:
        check_digest(sha256)
        return f"{self.root}/sha256/{sha256[:2]}/{sha256}"

    def commit_file(self, tmp_path: str | os.PathLike[str], sha256: str, size: int) -> bool:
        """Verify a staged file against its declared digest and size, then store it.

        Returns True when the bytes were newly stored, False when an identical object
        already existed (nothing is written again). Raises :class:`BadRequest` for a
        malformed digest or negative size and :class:`IntegrityError` when the file does not
        match; in both cases nothing is stored. ``tmp_path`` is left in place for the caller
        to delete.
        """
        check_digest(sha256)
        if size < 0:
            raise BadRequest(f"declared size must be >= 0, got {size}")
        actual_size = os.path.getsize(tmp_path)
        if actual_size != size:
            raise IntegrityError(
                f"size mismatch: declared {size} bytes, received {actual_size}",
                expected_size=size,
                actual_size=actual_size,
            )
        actual_sha, _ = sha256_file(tmp_path)
        if actual_sha != sha256:
            raise IntegrityError(
                f"sha256 mismatch: declared {sha256}, received {actual_sha}",
                expected_sha256=sha256,
                actual_sha256=actual_sha,
            )
        final = self._path(sha256)
        if self.fs.exists(final):
            return False
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self._local:
            _atomic_copy(Path(tmp_path), Path(final))
        else:
            self.fs.put_file(os.fspath(tmp_path), final)
        return True

    def exists(self, sha256: str) -> bool:
        """Whether the artifact is stored."""
        return bool(self.fs.exists(self._path(sha256)))

    def size(self, sha256: str) -> int:
        """Size in bytes of a stored artifact; :class:`NotFound` if absent."""
        try:
            return int(self.fs.size(self._path(sha256)))
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}", sha256=sha256) from None

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored artifact for binary reading; :class:`NotFound` if absent."""
        try:
            return cast(BinaryIO, self.fs.open(self._path(sha256), "rb"))
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}", sha256=sha256) from None

    def read_bytes(self, sha256: str) -> bytes:
        """All bytes of a stored artifact; :class:`NotFound` if absent."""
        with self.open(sha256) as f:
            return f.read()

    def url_for(self, sha256: str) -> str:
        """The artifact's fsspec URL (``file:///...``, ``memory:///...``, ``s3://...``)."""
        return str(self.fs.unstrip_protocol(self._path(sha256)))


def _atomic_copy(src: Path, final: Path) -> None:
    """Copy ``src`` to ``final`` through a temp name in the same directory, then rename.

    A crash leaves at most a dot-prefixed temp file, never a partial object under its final
    name. Two racing commits of the same digest both rename identical bytes into place.
    """
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK_BYTES)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class IngestBuffer:
    """A staging file for one upload, hashed and counted as chunks are written.

    ::

        with IngestBuffer(staging_dir, max_bytes=declared_size) as buf:
            async for chunk in request.stream():
                buf.write(chunk)
            buf.close()
            store.commit_file(buf.path, declared_sha256, declared_size)

    Leaving the ``with`` block (or calling :meth:`discard`) deletes the staging file.
    ``max_bytes`` stops an upload that sends more than it declared before it fills the disk.
    """

    def __init__(self, staging_dir: str | os.PathLike[str], max_bytes: int | None = None):
        os.makedirs(staging_dir, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=staging_dir)
        self.path = Path(name)
        self.max_bytes = max_bytes
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, chunk: bytes) -> None:
        """Append a chunk; :class:`IntegrityError` if it takes the total past ``max_bytes``."""
        assert self._file is not None, "write after close()"
        if self.max_bytes is not None and self._size + len(chunk) > self.max_bytes:
            raise IntegrityError(
                f"upload exceeds its declared size of {self.max_bytes} bytes",
                expected_size=self.max_bytes,
            )
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    @property
    def digest(self) -> str:
        """sha256 hex digest of the bytes written so far."""
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        """Number of bytes written so far."""
        return self._size

    def close(self) -> None:
        """Flush and close the staging file so it can be committed. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Close and delete the staging file. Idempotent."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> IngestBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()

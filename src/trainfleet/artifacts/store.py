"""Content-addressed artifact storage on any fsspec filesystem.

An artifact is named by the sha256 of its bytes and stored once, at
``<root>/sha256/<first 2 hex>/<64 hex>``. The root is a local directory by default
(``ArtifactStore("/var/lib/tf/artifacts")``) or any fsspec URL (``memory://``, ``s3://`` ...),
so one coordinator keeps artifacts on disk and many replicas share an object store. On S3
(``s3://bucket/prefix``) objects are written by :mod:`trainfleet.artifacts.s3`: a single PUT
up to ``part_bytes``, a multipart upload of ``part_bytes`` parts above it, and read back in
blocks of ``part_bytes`` at most, so neither direction holds a whole artifact in memory.

Uploads arrive in two steps. The coordinator streams the request body into an
:class:`IngestBuffer` (a staging file, hashed and counted as it is written), then calls
:meth:`ArtifactStore.commit_ingested` with the digest and size the client declared: the
digest computed while streaming is compared, with no second pass over the bytes, and a
local store moves the staged file into place (a rename), so committing a large artifact
takes no longer than a small one. :meth:`ArtifactStore.commit_file` is the verified path for
a file staged by anyone else: it re-hashes the file before storing it. Either way nothing is
stored unless size and digest both match (:class:`IntegrityError`).

Blobs that no artifact record binds (a fenced upload, an upload whose record never came) are
removed by :func:`trainfleet.artifacts.gc.collect_garbage` after a grace period.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from trainfleet.artifacts import s3
from trainfleet.errors import BadRequest, IntegrityError, NotFound, StorageUnavailable

CHUNK_BYTES = 1 << 20
_LOCK_STRIPES = 64
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

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        part_bytes: int = s3.DEFAULT_PART_BYTES,
        **storage_options: Any,
    ):
        """``storage_options`` go to the fsspec filesystem (for S3: s3fs's ``key``,
        ``secret``, ``endpoint_url``, ``client_kwargs`` ...); without them s3fs finds
        credentials and endpoint the way every AWS SDK does (``AWS_*`` variables, profile,
        instance role). ``part_bytes``: S3's single-PUT limit, multipart part size and read
        block size (at least 5 MiB)."""
        self.url = os.fspath(url)
        try:
            fs, root = url_to_fs(self.url, **s3.default_options(self.url, storage_options))
        except ImportError as err:  # fsspec names the missing package (s3fs, gcsfs ...)
            raise StorageUnavailable(
                f"cannot open artifact store {self.url}: {err} (for s3://, install the s3"
                " extra: pip install 'trainfleet[s3]')"
            ) from None
        self.fs = fs
        self.root: str = root.rstrip("/") or "/"
        self._local = isinstance(fs, LocalFileSystem)
        self._s3 = s3.is_s3(fs)
        self.part_bytes = s3.part_size(0, part_bytes) if self._s3 else part_bytes
        if self._s3:
            s3.probe(fs, self.root)  # fail at start, not at the first upload
        else:
            fs.makedirs(self.root, exist_ok=True)
        # Commits and guarded deletes of a digest take its lock (never held while an upload
        # streams in; striped by digest, so a long S3 upload delays only commits of digests
        # that share its stripe); pins mark digests an upload in this process is storing or
        # about to bind (_pin_lock only guards the counter, so the event loop may take it).
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._pin_lock = threading.Lock()
        self._pins: Counter[str] = Counter()

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
        _check_declared(sha256, size)
        actual_sha, actual_size = sha256_file(tmp_path)
        _check_match(sha256, size, actual_sha, actual_size)
        return self._store(Path(tmp_path), sha256, move=False)

    def commit_ingested(self, buf: IngestBuffer, sha256: str, size: int) -> bool:
        """Store a closed :class:`IngestBuffer` whose bytes match the declared digest and size.

        The digest is the one the buffer computed while the bytes streamed in (no second
        read); a local store moves the staged file into place. Returns and raises as
        :meth:`commit_file`; on refusal the staged file stays for the buffer to delete.
        """
        _check_declared(sha256, size)
        buf.close()
        _check_match(sha256, size, buf.digest, buf.size)
        return self._store(buf.path, sha256, move=True)

    @contextmanager
    def pinned(self, sha256: str) -> Iterator[None]:
        """Keep :meth:`delete_unbound` off ``sha256`` while an upload stores and binds it.

        An upload pins its digest before it streams and unpins after the artifact record is
        written (or refused), so another upload of the same bytes that is fenced, or the
        garbage collector, never deletes a blob between this upload's commit and its binding.
        """
        check_digest(sha256)
        with self._pin_lock:
            self._pins[sha256] += 1
        try:
            yield
        finally:
            with self._pin_lock:
                self._pins[sha256] -= 1
                if self._pins[sha256] <= 0:
                    del self._pins[sha256]

    def delete_unbound(
        self, sha256: str, is_bound: Callable[[str], bool], older_than: float | None = None
    ) -> bool:
        """Delete a blob unless an upload pins it, ``is_bound(sha256)``, or (with
        ``older_than``, a time) it was stored or re-committed after ``older_than``.

        Checked and deleted under the commit lock, so a concurrent commit of the same digest
        either finds the blob still there (and the checks see its fresh time or pin) or stores
        it again. Returns whether it was deleted.
        """
        with self._lock_for(sha256):
            with self._pin_lock:
                if self._pins[sha256] > 0:
                    return False
            if older_than is not None and self._modified(sha256) > older_than:
                return False
            if is_bound(sha256):
                return False
            return self.delete(sha256)

    def _modified(self, sha256: str) -> float:
        try:
            return _mtime(self.fs.info(self._path(sha256)))
        except FileNotFoundError:
            return 0.0

    def _lock_for(self, sha256: str) -> threading.Lock:
        return self._locks[int(check_digest(sha256)[:4], 16) % _LOCK_STRIPES]

    def _store(self, staged: Path, sha256: str, *, move: bool) -> bool:
        with self._lock_for(sha256):
            return self._store_locked(staged, sha256, move=move)

    def _store_locked(self, staged: Path, sha256: str, *, move: bool) -> bool:
        final = self._path(sha256)
        if self.fs.exists(final):
            # A fresh binding is coming: restart its GC grace period.
            if self._local:
                os.utime(final)
            elif self._s3:
                s3.refresh(self.fs, staged, final, sha256, self.part_bytes)
            return False
        if self._s3:
            s3.upload(self.fs, staged, final, sha256, self.part_bytes)
            return True
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self._local:
            self.fs.put_file(os.fspath(staged), final)
        elif move:
            try:
                os.replace(staged, final)  # staged was fsynced by IngestBuffer.close()
            except OSError:  # another filesystem: copy instead
                _atomic_copy(staged, Path(final))
        else:
            _atomic_copy(staged, Path(final))
        return True

    def delete(self, sha256: str) -> bool:
        """Remove a stored artifact; False when it was not there."""
        try:
            self.fs.rm_file(self._path(sha256))
        except FileNotFoundError:
            return False
        return True

    def stored(self) -> Iterator[tuple[str, float]]:
        """``(sha256, modified time)`` of every stored artifact (the GC's listing)."""
        base = f"{self.root}/sha256"
        if not self.fs.exists(base):
            return
        for info in self.fs.find(base, detail=True).values():
            name = str(info["name"]).rsplit("/", 1)[-1]
            if _DIGEST.fullmatch(name):
                yield name, _mtime(info)

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
        # Remote reads fetch blocks of part_bytes at most (s3fs's default is 50 MiB), so a
        # download streamed through the coordinator holds about one block.
        options: dict[str, Any] = {} if self._local else {"block_size": self.part_bytes}
        try:
            return cast(BinaryIO, self.fs.open(self._path(sha256), "rb", **options))
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}", sha256=sha256) from None

    def read_bytes(self, sha256: str) -> bytes:
        """All bytes of a stored artifact; :class:`NotFound` if absent."""
        with self.open(sha256) as f:
            return f.read()

    def presigned_url(self, sha256: str, expires_s: int = 3600) -> str | None:
        """A URL that downloads the artifact straight from S3 for ``expires_s`` seconds with
        no credentials, or None for a store that cannot presign (local, memory)."""
        if not self._s3:
            return None
        if not self.exists(sha256):
            raise NotFound(f"no artifact {sha256}", sha256=sha256)
        return s3.presign(self.fs, self._path(sha256), expires_s)

    def url_for(self, sha256: str) -> str:
        """The artifact's fsspec URL (``file:///...``, ``memory:///...``, ``s3://...``)."""
        return str(self.fs.unstrip_protocol(self._path(sha256)))


def _check_declared(sha256: str, size: int) -> None:
    check_digest(sha256)
    if size < 0:
        raise BadRequest(f"declared size must be >= 0, got {size}")


def _check_match(sha256: str, size: int, actual_sha: str, actual_size: int) -> None:
    if actual_size != size:
        raise IntegrityError(
            f"size mismatch: declared {size} bytes, received {actual_size}",
            expected_size=size,
            actual_size=actual_size,
        )
    if actual_sha != sha256:
        raise IntegrityError(
            f"sha256 mismatch: declared {sha256}, received {actual_sha}",
            expected_sha256=sha256,
            actual_sha256=actual_sha,
        )


def _mtime(info: dict[str, Any]) -> float:
    """Modified time from an fsspec listing entry (keys differ between filesystems)."""
    for key in ("mtime", "created", "LastModified", "last_modified"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        timestamp = getattr(value, "timestamp", None)  # a datetime
        if callable(timestamp):
            return float(timestamp())
    return time.time()  # unknown: treat as new, so the grace period protects it


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
            store.commit_ingested(buf, declared_sha256, declared_size)

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
        """Flush, sync and close the staging file so it can be committed. Idempotent."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
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

"""The shared-directory feature store: one directory that several processes use at once.

Put it on tmpfs (``/dev/shm``) for the processes of one host, or on a shared filesystem that
honours ``flock`` and ``rename``. Any process that knows the directory and the pipeline
secret can get and release what another put. Layout, per key::

    <key>.gen           the sidecar: "<generation> <refcount> <state>\\n", state "live" or
                        the tombstone's reason ("released", "aborted", "expired")
    <key>.<gen>.bin     the blob of a live generation (safetensors bytes)
    <key>.<hex>.tmp     a blob being written
    <key>.gen.tmp       a sidecar being written (under the lock)
    .lock               flock'd around every change of a sidecar

A put writes its blob to a private ``.tmp`` straight from the tensors' memory, then, under
the lock, bumps the generation, ``os.replace``s the blob into place and replaces the sidecar
(tmp + ``os.replace``), so a reader sees either the old generation or the new one complete.
Freeing writes the tombstone first and unlinks the blob second, so a reader that finds the
blob gone finds the reason. Readers take no lock: they read the sidecar, then the blob with
``readinto`` into one buffer that becomes the tensors' memory. A reader that opened the blob
before a release reads it whole (POSIX keeps an unlinked file's bytes for open descriptors):
its get happened first.

A writer that crashed mid-put leaves its ``.tmp`` behind. Opening a store and ``collect()``
delete the ``.tmp`` files not modified for ``tmp_max_age_s`` (a live writer keeps its own
fresh); sidecar tmps are swept under the lock, since their writers reuse the name.

Cost per sample: one copy and one digest pass (BLAKE3) on each side, nothing else. Data
moves in 1 MiB chunks; from ``OVERLAP_MIN_BYTES`` on, and when a core is idle
(``hash_thread``), a second thread hashes chunk i while the caller copies chunk i+1, so a put
or get costs about max(copy, hash), not the sum. On a busy machine the thread would only add
switching, so the default (``hash_thread=None``) decides per call from the load average.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from trainfleet.errors import HashMismatch, SampleGone, StoreUnavailable
from trainfleet.features.ref import Encoded, content_hasher
from trainfleet.features.store import GuardedStore, check_state

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # hashed and copied together while in cache
TMP_MAX_AGE_S = 3600.0  # a .tmp file untouched this long belongs to a crashed writer
# From this size on, the digest may run on a second thread. With BLAKE3 it still pays on a
# quiet 2-core machine: a 16 MiB put 6.8 ms with it against 10.2 ms without, a get 4.5 ms
# against 6.7 ms (writing to tmpfs costs about twice the hash, so the overlap hides the hash).
OVERLAP_MIN_BYTES = 4 << 20


def _idle_core() -> bool:
    """Whether this process's CPUs have spare capacity (1-minute load average below their
    count): then the hash thread overlaps the copy instead of queueing behind other work."""
    return os.getloadavg()[0] < len(os.sched_getaffinity(0))


class _Digest:
    """The content digest (BLAKE3) of the chunks fed to it, in order. For a large blob it
    runs on a second thread (blake3 and file IO both release the GIL), so hashing a chunk
    overlaps copying the next one; the chunks must stay unchanged until :meth:`hexdigest`
    returns."""

    def __init__(self, background: bool):
        self._hasher = content_hasher()
        self._queue: queue.SimpleQueue[memoryview | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="digest", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while (chunk := self._queue.get()) is not None:
            self._hasher.update(chunk)

    def feed(self, chunk: memoryview) -> None:
        if self._queue is None:
            self._hasher.update(chunk)
        else:
            self._queue.put(chunk)

    def stop(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def hexdigest(self) -> str:
        self.stop()
        return self._hasher.hexdigest()


class _Sidecar(NamedTuple):
    generation: int
    refs: int
    gone: str | None


class SharedDirStore(GuardedStore):
    """A :class:`GuardedStore` over a directory shared by processes. ``durable=True`` fsyncs
    blobs and sidecars (for a disk; pointless on tmpfs). ``hash_thread``: hash large blobs on
    a second thread beside the copy (True), never (False), or when a core is idle (None).
    ``tmp_max_age_s``: on open and in :meth:`collect`, delete ``.tmp`` files (a crashed
    writer's) not modified for this long. The watermarks count the live blobs this store
    object put."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        secret: bytes,
        durable: bool = False,
        hash_thread: bool | None = None,
        tmp_max_age_s: float = TMP_MAX_AGE_S,
        **guards: Any,
    ):
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreUnavailable(f"dir:{self.root}: cannot open the store: {e}") from e
        super().__init__(address=f"dir:{self.root}", secret=secret, **guards)
        self.durable = durable
        self.hash_thread = hash_thread
        self.tmp_max_age_s = tmp_max_age_s
        self._thread_lock = threading.Lock()  # flock excludes processes, not our threads
        self.sweep_tmp()

    def sweep_tmp(self, now: float | None = None) -> int:
        """Delete the ``.tmp`` files not modified for ``tmp_max_age_s`` before ``now`` (wall
        clock, as file times are); return how many."""
        cutoff = (time.time() if now is None else now) - self.tmp_max_age_s
        removed = 0
        try:
            names = [e.name for e in os.scandir(self.root) if e.name.endswith(".tmp")]
        except OSError as e:
            raise self._unavailable(e) from e
        blobs = [n for n in names if not n.endswith(".gen.tmp")]
        sidecars = [n for n in names if n.endswith(".gen.tmp")]
        for name in blobs:
            removed += self._unlink_if_older(name, cutoff)
        if sidecars:
            with self._locked():  # no writer is between writing and renaming one
                for name in sidecars:
                    removed += self._unlink_if_older(name, cutoff)
        if removed:
            log.info("%s: deleted %d stale .tmp files (crashed writers)", self.address, removed)
        return removed

    def _unlink_if_older(self, name: str, cutoff: float) -> int:
        path = self.root / name
        try:
            if path.stat().st_mtime >= cutoff:
                return 0
            path.unlink()
        except FileNotFoundError:
            return 0  # renamed into place or swept by another process meanwhile
        return 1

    def collect(self, now: float | None = None) -> int:
        """Free the samples held past ``max_age_s`` (see :class:`GuardedStore`), and sweep
        stale ``.tmp`` files; return how many samples were freed."""
        if not self._closed:
            self.sweep_tmp()
        return super().collect(now)

    # --- metadata ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _blob(self, key: str, generation: int) -> Path:
        return self.root / f"{key}.{generation}.bin"

    def _unavailable(self, e: OSError) -> StoreUnavailable:
        return StoreUnavailable(f"{self.address}: {e}", reason="dir_gone")

    def _sidecar(self, key: str) -> _Sidecar | None:
        try:
            with open(self.root / f"{key}.gen", "rb") as f:
                text = f.read().decode()
        except FileNotFoundError as e:
            if not self.root.is_dir():
                raise self._unavailable(e) from e
            return None
        generation, refs, state = text.split()
        return _Sidecar(int(generation), int(refs), None if state == "live" else state)

    def _write_sidecar(self, key: str, side: _Sidecar) -> None:
        path = self.root / f"{key}.gen"
        tmp = self.root / f"{key}.gen.tmp"
        line = f"{side.generation} {side.refs} {side.gone or 'live'}\n".encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, line)
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _tombstone(self, key: str, side: _Sidecar, reason: str) -> None:
        self._write_sidecar(key, _Sidecar(side.generation, 0, reason))
        with contextlib.suppress(FileNotFoundError):
            self._blob(key, side.generation).unlink()

    # --- blob IO -----------------------------------------------------------------------

    def _write_blob(self, path: Path, data: Encoded) -> str:
        """Write ``data`` to a new file at ``path``; return its content digest. Each chunk is hashed
        and then written while it is still in the CPU's cache: one pass over the tensors'
        memory for both, and one copy (into the file)."""
        digest = _Digest(background=self._overlap(data.size))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for chunk in data.chunks(CHUNK_BYTES):
                    digest.feed(chunk)
                    while chunk:
                        chunk = chunk[os.write(fd, chunk) :]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            digest.stop()
        return digest.hexdigest()

    def _overlap(self, size: int) -> bool:
        if size < OVERLAP_MIN_BYTES:
            return False
        return _idle_core() if self.hash_thread is None else self.hash_thread

    def _publish(self, key: str, data: Encoded, holders: int) -> tuple[int, str]:
        tmp = self.root / f"{key}.{uuid.uuid4().hex}.tmp"
        try:
            digest = self._write_blob(tmp, data)
            with self._locked():
                old = self._sidecar(key)
                generation = 1 if old is None else old.generation + 1
                os.replace(tmp, self._blob(key, generation))
                self._write_sidecar(key, _Sidecar(generation, holders, None))
                if old is not None and old.gone is None:
                    with contextlib.suppress(FileNotFoundError):
                        self._blob(key, old.generation).unlink()
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise self._unavailable(e) from e
            raise
        return generation, digest

    def _read(self, key: str, generation: int, size: int) -> bytearray:
        return self._read_hashed(key, generation, size, hash_it=False)[0]

    def _read_hashed(
        self, key: str, generation: int, size: int, *, hash_it: bool = True
    ) -> tuple[bytearray, str]:
        """Read the blob into a new buffer (the tensors' memory after decoding), hashing each
        chunk just after it lands, while it is still in the CPU's cache."""
        side = self._sidecar(key)
        check_state(key, generation, side and side.generation, side and side.gone)
        try:
            fd = os.open(self._blob(key, generation), os.O_RDONLY)
        except FileNotFoundError:
            # Freed or superseded since the sidecar was read: the sidecar now says which.
            side = self._sidecar(key)
            check_state(key, generation, side and side.generation, side and side.gone)
            raise SampleGone(
                f"{key}: generation {generation} has no blob", reason="unknown"
            ) from None
        with open(fd, "rb", buffering=0, closefd=True) as f:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise HashMismatch(
                    f"{key}: the blob has {actual} bytes, the ref says {size}", reason="size"
                )
            buf = bytearray(size)
            view = memoryview(buf)
            digest = _Digest(background=hash_it and self._overlap(size))
            filled = 0
            try:
                while filled < size:
                    n = f.readinto(view[filled : filled + CHUNK_BYTES])
                    if not n:
                        raise HashMismatch(f"{key}: the blob ended early", reason="size")
                    if hash_it:
                        digest.feed(view[filled : filled + n])
                    filled += n
            finally:
                digest.stop()
        return buf, digest.hexdigest()

    def _unref(self, key: str, generation: int) -> bool:
        with self._locked():
            side = self._sidecar(key)
            if side is None or side.generation != generation or side.gone is not None:
                return False
            if side.refs > 1:
                self._write_sidecar(key, side._replace(refs=side.refs - 1))
                return False
            self._tombstone(key, side, "released")
            return True

    def _retain(self, key: str, generation: int) -> None:
        with self._locked():
            side = self._sidecar(key)
            check_state(key, generation, side and side.generation, side and side.gone)
            assert side is not None
            self._write_sidecar(key, side._replace(refs=side.refs + 1))

    def _free(self, key: str, generation: int, reason: str) -> bool:
        with self._locked():
            side = self._sidecar(key)
            if side is None or side.generation != generation or side.gone is not None:
                return False
            self._tombstone(key, side, reason)
            return True

    def _is_live(self, key: str, generation: int) -> bool:
        side = self._sidecar(key)
        return side is not None and side.generation == generation and side.gone is None

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

"""Deterministic directory archives (tar + zstandard) and safe extraction.

A job's output directory travels as one artifact: :func:`pack_dir` writes it as a tar
stream compressed with zstandard, normalized so that the same tree always gives the same
bytes, and therefore the same sha256 (entries sorted by path, mtime 0, uid/gid 0, empty
owner names, modes 0o644 or 0o755). :func:`unpack` extracts only regular files and
directories that land inside the destination; anything else refuses the whole archive.
Both stream through zstandard, so an archive is never held in memory.

:func:`unpack` also bounds what an archive may expand to, counted as it decompresses: the
total bytes (``MAX_UNPACK_BYTES``), the number of members (``MAX_MEMBERS``) and the
compression ratio (``MAX_RATIO`` once past ``RATIO_FLOOR_BYTES``), so a small "zip bomb"
is refused after writing at most the floor, never its full expansion.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

import zstandard

from trainfleet.artifacts.store import sha256_file
from trainfleet.errors import IntegrityError

logger = logging.getLogger(__name__)

ZSTD_LEVEL = 3
MAX_UNPACK_BYTES = 64 * 1024**3  # decompressed tar stream, headers included
MAX_MEMBERS = 100_000
MAX_RATIO = 1000  # decompressed / compressed bytes
RATIO_FLOOR_BYTES = 64 * 1024**2  # small archives may compress better than MAX_RATIO
# Writing a member failed because of its name or a clash with what DEST already holds.
_UNWRITABLE = (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.EINVAL)


MAX_HEADER_BYTES = 1024 * 1024  # a pax or GNU long-name header (pack_dir's: a path or two)
_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedInfo(tarfile.TarInfo):
    """A member header that refuses an extended header (pax records, a GNU long name) over
    ``MAX_HEADER_BYTES`` before tarfile reads it whole into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise IntegrityError(
                f"unsafe archive: an extended header of {self.size} bytes (over {MAX_HEADER_BYTES})"
            )
        return super()._proc_member(tar)  # type: ignore[misc]


class _Bounded:
    """A decompressed stream that refuses to grow past a total or a ratio to its source."""

    def __init__(
        self, reader: Any, raw: BinaryIO, name: str, max_bytes: int, max_ratio: float
    ) -> None:
        self.reader, self.raw, self.name = reader, raw, name
        self.max_bytes, self.max_ratio = max_bytes, max_ratio
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.reader.read(size)
        self.total += len(data)
        if self.total > self.max_bytes:
            raise IntegrityError(
                f"cannot unpack {self.name}: it expands past {self.max_bytes} bytes"
            )
        compressed = max(self.raw.tell(), 1)
        if self.total > RATIO_FLOOR_BYTES and self.total > self.max_ratio * compressed:
            raise IntegrityError(
                f"cannot unpack {self.name}: {compressed} compressed bytes expand past"
                f" {self.total} (ratio over {self.max_ratio:g}); refusing a decompression bomb"
            )
        return data


def pack_dir(src_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> tuple[str, int]:
    """Archive every file and directory under ``src_dir`` into ``dest`` (``.tar.zst``).

    Returns ``(sha256, size)`` of ``dest``. Packing the same tree twice gives identical
    bytes. Symlinks and special files (sockets, fifos, devices) are skipped with a warning:
    :func:`unpack` would refuse them, and following a link could leak files from outside
    ``src_dir``.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise NotADirectoryError(f"cannot pack {src}: not a directory")
    entries = sorted(_walk(src))
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    with (
        open(dest, "wb") as raw,
        cctx.stream_writer(raw, closefd=False) as zw,
        tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, path, is_dir in entries:
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if is_dir:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            st = path.stat()
            info.size = st.st_size
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return sha256_file(dest)


def _walk(src: Path) -> list[tuple[str, Path, bool]]:
    """``(relative posix path, path, is_dir)`` for every directory and regular file."""

    def fail(err: OSError) -> None:
        raise err

    out: list[tuple[str, Path, bool]] = []
    for root, dirnames, filenames in os.walk(src, onerror=fail):
        for name in [*dirnames, *filenames]:
            path = Path(root, name)
            mode = path.lstat().st_mode
            rel = path.relative_to(src).as_posix()
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                out.append((rel, path, stat.S_ISDIR(mode)))
            else:
                logger.warning("pack %s: skipping %s (not a regular file or directory)", src, rel)
    return out


def unpack(
    archive: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_UNPACK_BYTES,
    max_members: int = MAX_MEMBERS,
    max_ratio: float = MAX_RATIO,
) -> list[str]:
    """Extract a :func:`pack_dir` archive into ``dest_dir``; return the files' relative paths.

    Refuses, with :class:`IntegrityError`, an archive that is corrupt or holds an absolute
    path, a ``..`` component, a path that would resolve outside ``dest_dir``, a symlink, a
    hard link, a device/fifo, a name given twice or one that passes through a file member,
    an extended header over ``MAX_HEADER_BYTES``, or a member that cannot be written there
    (a name too long, a directory in the way). Members are checked one by one as the
    archive streams; on refusal, every file and directory this call created is removed
    again (files it overwrote stay overwritten), and nothing is ever written outside
    ``dest_dir``. Also refused: more than ``max_members`` members, files declaring more
    than ``max_bytes`` in all, or a stream that decompresses past ``max_bytes`` or
    ``max_ratio`` times its compressed size (checked while it streams).
    """
    root = Path(dest_dir)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    created: list[Path] = []
    files: list[str] = []
    try:
        with (
            open(archive, "rb") as raw,
            zstandard.ZstdDecompressor().stream_reader(raw) as reader,
            tarfile.open(
                fileobj=cast(BinaryIO, _Bounded(reader, raw, str(archive), max_bytes, max_ratio)),
                mode="r|",
                tarinfo=_BoundedInfo,
            ) as tar,
        ):
            declared = 0
            seen: dict[str, bool] = {}  # normalized member name -> is a directory
            for count, member in enumerate(tar, start=1):
                declared += member.size
                if count > max_members:
                    raise IntegrityError(f"cannot unpack {archive}: over {max_members} members")
                if declared > max_bytes:
                    raise IntegrityError(
                        f"cannot unpack {archive}: its files declare over {max_bytes} bytes"
                    )
                target = _check_member(member, root)
                _check_unique(member, seen)
                for path in [*reversed(target.parents), target]:
                    if root in path.parents and not path.exists():
                        created.append(path)
                # The data filter repeats our checks and clears setuid and group/other write.
                try:
                    tar.extract(member, root, filter="data")
                except OSError as err:
                    if err.errno not in _UNWRITABLE:
                        raise  # the destination's own trouble (a full disk): not the archive's
                    raise IntegrityError(
                        f"cannot unpack {os.fspath(archive)}: member {member.name!r} cannot be"
                        f" written in {root}: {err.strerror}"
                    ) from None
                if member.isfile():
                    files.append(member.name)
    except (tarfile.TarError, zstandard.ZstdError) as e:
        _remove(created)
        raise IntegrityError(f"cannot unpack {os.fspath(archive)}: {e}") from e
    except BaseException:
        _remove(created)
        raise
    return files


def _check_member(member: tarfile.TarInfo, root: Path) -> Path:
    """The path ``member`` would be written to, or :class:`IntegrityError` if it is unsafe."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise IntegrityError(f"unsafe archive member {name!r}: {kind} not allowed")
    if not name or PurePosixPath(name).is_absolute() or os.path.isabs(name):
        raise IntegrityError(f"unsafe archive member {name!r}: absolute path")
    if ".." in PurePosixPath(name).parts:
        raise IntegrityError(f"unsafe archive member {name!r}: '..' in path")
    target = Path(os.path.realpath(root / name))
    if target != root and root not in target.parents:
        raise IntegrityError(f"unsafe archive member {name!r}: resolves outside {root}")
    return target


def _check_unique(member: tarfile.TarInfo, seen: dict[str, bool]) -> None:
    """Refuse a member named twice (``a`` and ``./a`` too), a file named ``.``, or a path
    through a member that is a file: :func:`pack_dir` writes none of these, and extracting
    them would overwrite earlier members or fail half-way."""
    key = PurePosixPath(member.name).as_posix()
    if key == "." and not member.isdir():
        raise IntegrityError(f"unsafe archive member {member.name!r}: not a file name")
    if key in seen:
        raise IntegrityError(f"unsafe archive member {member.name!r}: duplicate name")
    for parent in PurePosixPath(key).parents:
        if seen.get(parent.as_posix()) is False:
            raise IntegrityError(
                f"unsafe archive member {member.name!r}: {parent.as_posix()!r} is a file"
            )
    seen[key] = member.isdir()


def _remove(created: list[Path]) -> None:
    """Undo a partial extraction: delete what was created, deepest first."""
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError:
            logger.warning("unpack: could not remove %s after refusal", path)

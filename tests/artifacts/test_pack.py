"""pack_dir / unpack: exact round trips, byte-identical repacks, malicious archives refused."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from trainfleet.artifacts import pack_dir, sha256_file, unpack
from trainfleet.errors import IntegrityError


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


TREE = {
    "metrics.json": b'{"loss": 1.0}',
    "ckpt/model.safetensors": os.urandom(200_000),
    "ckpt/deep/er/notes.txt": b"nested",
    "empty.bin": b"",
}


def test_round_trip_preserves_bytes_and_paths(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", TREE)
    (tmp_path / "src" / "empty-dir").mkdir()
    sha, size = pack_dir(tmp_path / "src", tmp_path / "out.tar.zst")
    assert (sha, size) == sha256_file(tmp_path / "out.tar.zst")
    files = unpack(tmp_path / "out.tar.zst", tmp_path / "dest")
    assert sorted(files) == sorted(TREE)
    assert read_tree(tmp_path / "dest") == TREE
    assert (tmp_path / "dest" / "empty-dir").is_dir()


def test_packing_twice_is_byte_identical(tmp_path: Path) -> None:
    write_tree(tmp_path / "a", TREE)
    first = pack_dir(tmp_path / "a", tmp_path / "1.tar.zst")
    # Same content written in another order, at another time, with other modes.
    write_tree(tmp_path / "b", dict(reversed(TREE.items())))
    os.utime(tmp_path / "b" / "metrics.json", (1e9, 1e9))
    (tmp_path / "b" / "empty.bin").chmod(0o600)
    second = pack_dir(tmp_path / "b", tmp_path / "2.tar.zst")
    assert first == second
    assert (tmp_path / "1.tar.zst").read_bytes() == (tmp_path / "2.tar.zst").read_bytes()


def test_members_are_normalized(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"run.sh": b"#!/bin/sh\n", "data.txt": b"x"})
    (tmp_path / "src" / "run.sh").chmod(0o700)
    pack_dir(tmp_path / "src", tmp_path / "out.tar.zst")
    raw = (
        zstandard.ZstdDecompressor()
        .decompressobj()
        .decompress((tmp_path / "out.tar.zst").read_bytes())
    )
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["data.txt", "run.sh"]
    assert [m.mode for m in members] == [0o644, 0o755]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_symlinks_are_not_packed(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"outside")
    write_tree(tmp_path / "src", {"real.txt": b"in"})
    (tmp_path / "src" / "leak").symlink_to(tmp_path / "secret")
    (tmp_path / "src" / "dirlink").symlink_to(tmp_path)
    pack_dir(tmp_path / "src", tmp_path / "out.tar.zst")
    assert unpack(tmp_path / "out.tar.zst", tmp_path / "dest") == ["real.txt"]
    assert read_tree(tmp_path / "dest") == {"real.txt": b"in"}


def test_pack_missing_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        pack_dir(tmp_path / "nope", tmp_path / "out.tar.zst")


def malicious_archive(path: Path, members: list[tarfile.TarInfo]) -> None:
    with (
        open(path, "wb") as raw,
        zstandard.ZstdCompressor().stream_writer(raw, closefd=False) as zw,
        tarfile.open(fileobj=zw, mode="w|") as tar,
    ):
        for info in members:
            data = b"pwned" if info.isfile() else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("dotdot", "'..' in path"),
        ("nested-dotdot", "'..' in path"),
        ("absolute", "absolute path"),
        ("symlink", "link not allowed"),
        ("symlink-then-write-through", "link not allowed"),
        ("hardlink", "link not allowed"),
        ("device", "special file not allowed"),
    ],
)
def test_malicious_archive_refused(tmp_path: Path, case: str, match: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    members = {
        "dotdot": [regular("ok.txt"), regular("../outside/evil")],
        "nested-dotdot": [regular("a/b/../../../outside/evil")],
        "absolute": [regular(str(outside / "evil"))],
        "symlink": [symlink("link", str(outside))],
        "symlink-then-write-through": [symlink("link", str(outside)), regular("link/evil")],
        "hardlink": [regular("ok.txt"), hardlink("evil", str(outside / "evil"))],
        "device": [device("evil")],
    }[case]
    archive = tmp_path / "bad.tar.zst"
    malicious_archive(archive, members)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match=match):
        unpack(archive, dest)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.zst", "dest", "outside"]
    # Members extracted before the bad one are removed again.
    assert list(dest.iterdir()) == []


def test_corrupt_archive_refused(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", TREE)
    pack_dir(tmp_path / "src", tmp_path / "out.tar.zst")
    data = bytearray((tmp_path / "out.tar.zst").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.tar.zst").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="cannot unpack"):
        unpack(tmp_path / "bad.tar.zst", tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


SAFE_NAME = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=8).filter(
    lambda s: s not in {".", ".."}
)
TREES = st.dictionaries(
    st.lists(SAFE_NAME, min_size=1, max_size=3).map("/".join),
    st.binary(max_size=512),
    max_size=8,
)


def without_conflicts(files: dict[str, bytes]) -> dict[str, bytes]:
    """Drop any file whose path is also a directory of another file."""
    dirs = {rel.rsplit("/", 1)[0] for rel in files if "/" in rel}
    prefixes = {"/".join(d.split("/")[: i + 1]) for d in dirs for i in range(d.count("/") + 1)}
    return {rel: data for rel, data in files.items() if rel not in prefixes}


@settings(max_examples=50, deadline=None)
@given(TREES)
def test_random_trees_round_trip(files: dict[str, bytes]) -> None:
    files = without_conflicts(files)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root / "src", files)
        (root / "src").mkdir(exist_ok=True)
        sha, _ = pack_dir(root / "src", root / "a.tar.zst")
        assert sorted(unpack(root / "a.tar.zst", root / "dest")) == sorted(files)
        assert read_tree(root / "dest") == files
        assert pack_dir(root / "dest", root / "b.tar.zst")[0] == sha


# decompression bounds -------------------------------------------------------------------------


class _Zeros:
    """A file of ``size`` zero bytes that is never held in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~32 KB .tar.zst holding one file of 1 GiB of zeros (built streaming)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.zst"
    cctx = zstandard.ZstdCompressor(level=19)
    with (
        open(path, "wb") as raw,
        cctx.stream_writer(raw, closefd=False) as zw,
        tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        info = tarfile.TarInfo("zeros.bin")
        info.size = 1024**3
        tar.addfile(info, _Zeros(info.size))  # type: ignore[arg-type]
    return path


def test_a_decompression_bomb_is_refused_before_it_is_written(bomb: Path, tmp_path: Path) -> None:
    assert bomb.stat().st_size < 64 * 1024
    with pytest.raises(IntegrityError, match="decompression bomb") as info:
        unpack(bomb, tmp_path / "dest")
    # Refused after expanding past the ratio floor, far short of the whole GiB.
    expanded = int(str(info.value).split("expand past ")[1].split(" ")[0])
    assert expanded < 128 * 1024**2
    assert list((tmp_path / "dest").iterdir()) == []


def test_unpack_bounds_total_size_and_member_count(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {f"f{i}.txt": b"x" * 1000 for i in range(20)})
    pack_dir(tmp_path / "src", tmp_path / "a.tar.zst")
    with pytest.raises(IntegrityError, match="over 10 members"):
        unpack(tmp_path / "a.tar.zst", tmp_path / "d1", max_members=10)
    with pytest.raises(IntegrityError, match="5000 bytes"):
        unpack(tmp_path / "a.tar.zst", tmp_path / "d2", max_bytes=5000)
    assert list((tmp_path / "d1").iterdir()) == list((tmp_path / "d2").iterdir()) == []
    assert len(unpack(tmp_path / "a.tar.zst", tmp_path / "d3", max_members=20)) == 20


def directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([regular("a"), regular("a")], "duplicate name"),
        ([regular("a"), regular("./a")], "duplicate name"),
        ([directory("a"), regular("a")], "duplicate name"),
        ([regular("a"), directory("a")], "duplicate name"),
        ([regular("a"), regular("a/b")], "'a' is a file"),
        ([regular(".")], "not a file name"),
        ([regular("d/" + "n" * 300)], "cannot be written"),  # over NAME_MAX
    ],
    ids=[
        "twice",
        "dot-slash-twice",
        "dir-then-file",
        "file-then-dir",
        "through-a-file",
        "dot",
        "name-too-long",
    ],
)
def test_clashing_or_unwritable_members_are_an_integrity_error(
    tmp_path: Path, members: list[tarfile.TarInfo], match: str
) -> None:
    """Never a raw OSError half-way (the CLI would print a traceback), never an earlier
    member silently overwritten, and nothing left behind."""
    archive = tmp_path / "bad.tar.zst"
    malicious_archive(archive, members)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match=match):
        unpack(archive, dest)
    assert list(dest.iterdir()) == []


def test_a_destination_entry_in_the_way_is_an_integrity_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.zst"
    malicious_archive(archive, [regular("taken")])
    dest = tmp_path / "dest"
    (dest / "taken").mkdir(parents=True)
    with pytest.raises(IntegrityError, match="cannot be written"):
        unpack(archive, dest)
    assert [p.name for p in dest.iterdir()] == ["taken"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_an_oversized_extended_header_is_refused_before_it_is_read(
    tmp_path: Path, fmt: int
) -> None:
    """tarfile reads a pax header or a GNU long name whole into memory: one of gigabytes
    (incompressible, so the ratio bound never fires) would exhaust the downloader's memory."""
    info = tarfile.TarInfo("d/" + "n" * 2_000_000)  # a long name: a pax or GNU header
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(info, io.BytesIO(b""))
    archive = tmp_path / "big-header.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    with pytest.raises(IntegrityError, match="extended header of"):
        unpack(archive, tmp_path / "dest")


def test_a_long_path_still_round_trips(tmp_path: Path) -> None:
    deep = "/".join(["segment-of-a-long-path"] * 20) + "/file.txt"  # pax path record
    write_tree(tmp_path / "src", {deep: b"deep"})
    pack_dir(tmp_path / "src", tmp_path / "out.tar.zst")
    assert unpack(tmp_path / "out.tar.zst", tmp_path / "dest") == [deep]

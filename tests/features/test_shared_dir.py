"""SharedDirStore specifics: its on-disk layout, state shared through the directory by
separate handles and separate processes, corruption and a vanished directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest
import torch
from featurekit import SECRET, same, sample

from trainfleet.errors import HashMismatch, SampleGone, StaleGeneration, StoreUnavailable
from trainfleet.features import SampleRef, SharedDirStore, encode_tensors, open_store

CHILD = r"""
import json, sys
from featurekit import SECRET, same, sample
from trainfleet.errors import FeatureError
from trainfleet.features import SampleRef, SharedDirStore

store = SharedDirStore(sys.argv[1], secret=SECRET)
out = []
for op, arg in json.loads(sys.argv[2]):
    try:
        if op == "put":
            out.append(store.put(arg, sample(int(arg))).model_dump_json())
        else:
            ref = SampleRef.model_validate_json(arg)
            if op == "get":
                out.append("same" if same(store.get(ref), sample(int(ref.sample_id))) else "differ")
            elif op == "release":
                out.append(str(store.release(ref)))
            elif op == "retain":
                store.retain(ref)
                out.append("retained")
    except FeatureError as e:
        out.append(f"{type(e).__name__} {e.reason}")
print(json.dumps(out))
"""


def in_child(root: Path, *ops: tuple[str, str]) -> list[str]:
    """Run ``ops`` on a SharedDirStore over ``root`` in a fresh Python process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), json.dumps(ops)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_put_in_a_child_get_and_release_in_the_parent(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = SharedDirStore(root, secret=SECRET)
    kept = store.put("000007", sample(7))
    [ref_json] = in_child(root, ("put", "000042"))
    ref = SampleRef.model_validate_json(ref_json)
    assert ref.store == store.address
    assert same(store.get(ref), sample(42))
    assert store.release(ref) is True
    store.abort(kept)
    seen = in_child(root, ("get", ref_json), ("release", ref_json), ("get", kept.model_dump_json()))
    assert seen == ["SampleGone released", "False", "SampleGone aborted"]
    store.close()


def test_put_in_the_parent_get_and_release_in_a_child(tmp_path: Path) -> None:
    store = SharedDirStore(tmp_path / "d", secret=SECRET)
    ref = store.put("000005", sample(5), holders=2)
    old = store.put("000009", sample(8), key="k")
    new = store.put("000009", sample(9), key="k")
    r = ref.model_dump_json()
    assert in_child(
        tmp_path / "d",
        ("get", r),
        ("retain", r),
        ("release", r),
        ("release", r),
        ("get", new.model_dump_json()),
        ("get", old.model_dump_json()),
        ("release", r),
        ("release", r),
        ("get", r),
    ) == [
        "same",
        "retained",
        "False",
        "False",
        "same",
        "StaleGeneration stale",
        "True",
        "False",
        "SampleGone released",
    ]
    with pytest.raises(SampleGone) as e:
        store.get(ref)
    assert e.value.reason == "released"
    assert store.release(ref) is False
    assert store.stats().held_refs == 1  # the child's release reached this handle too
    store.close()


def test_two_handles_share_generations_refcounts_and_tombstones(tmp_path: Path) -> None:
    a = SharedDirStore(tmp_path / "d", secret=SECRET)
    b = open_store(f"dir:{tmp_path / 'd'}", SECRET)
    assert isinstance(b, SharedDirStore) and b.address == a.address
    first = a.put("s", sample(1), holders=2)
    second = b.put("s", sample(2))  # the other handle bumps the same key's generation
    assert second.generation == 2
    with pytest.raises(StaleGeneration):
        a.get(first)
    assert same(a.get(second), sample(2))
    assert b.release(second) is True
    with pytest.raises(SampleGone):
        a.get(second)
    assert a.stats().held_refs == 0
    a.close()
    b.close()


def test_layout_publishes_atomically_and_frees_blobs(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = SharedDirStore(root, secret=SECRET)
    ref = store.put("s", sample(), key="k")
    assert (root / "k.1.bin").read_bytes() == encode_tensors(sample())
    assert (root / "k.gen").read_text() == "1 1 live\n"
    assert not list(root.glob("*.tmp"))
    store.put("s", sample(1), key="k")
    assert not (root / "k.1.bin").exists() and (root / "k.2.bin").exists()
    store.abort(ref)  # a stale ref: the live generation stays
    assert (root / "k.gen").read_text() == "2 1 live\n"
    store.release(ref.model_copy())  # same
    store.close()
    again = SharedDirStore(root, secret=SECRET)
    newest = again.put("s", sample(2), key="k")
    assert newest.generation == 3
    assert again.release(newest) is True
    assert (root / "k.gen").read_text() == "3 0 released\n"
    assert not list(root.glob("k.*.bin"))
    again.close()


def test_corrupted_blobs_fail_the_hash_check(tmp_path: Path) -> None:
    root = tmp_path / "d"
    store = SharedDirStore(root, secret=SECRET)
    ref = store.put("s", sample())
    blob = root / "s.1.bin"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(data)
    with pytest.raises(HashMismatch) as e:
        store.get(ref)
    assert e.value.reason == "digest"
    blob.write_bytes(data[:-1])
    with pytest.raises(HashMismatch) as e:
        store.get(ref)
    assert e.value.reason == "size"
    store.close()


def test_a_vanished_directory_is_unavailable(tmp_path: Path) -> None:
    store = SharedDirStore(tmp_path / "d", secret=SECRET)
    ref = store.put("s", sample())
    shutil.rmtree(tmp_path / "d")
    with pytest.raises(StoreUnavailable):
        store.get(ref)
    with pytest.raises(StoreUnavailable):
        store.put("t", sample())
    store.close()


def test_a_release_through_another_handle_unblocks_a_put(tmp_path: Path) -> None:
    size = len(encode_tensors(sample()))
    producer = SharedDirStore(tmp_path / "d", secret=SECRET, high_watermark_bytes=size)
    consumer = SharedDirStore(tmp_path / "d", secret=SECRET)
    ref = producer.put("a", sample())
    done = threading.Event()

    def blocked_put() -> None:
        producer.put("b", sample(), wait_s=30)
        done.set()

    thread = threading.Thread(target=blocked_put)
    thread.start()
    try:
        assert consumer.release(ref) is True  # the producer sees it by polling the sidecar
        assert done.wait(10)
    finally:
        producer.abort(ref)
        thread.join(30)
    assert producer.stats().held_refs == 1
    producer.close()
    consumer.close()


@pytest.mark.parametrize("hash_thread", [True, False])
def test_large_samples_hash_alike_with_or_without_the_hash_thread(
    tmp_path: Path, hash_thread: bool
) -> None:
    store = SharedDirStore(tmp_path / "d", secret=SECRET, hash_thread=hash_thread)
    big = {"x": torch.randn(3 * 1024 * 1024 + 5), "y": torch.arange(7)}  # 12 MiB, odd end
    ref = store.put("big", big)
    assert ref.digest == blake3.blake3(encode_tensors(big)).hexdigest()
    assert same(store.get(ref), big)
    blob = tmp_path / "d" / "big.1.bin"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(data)
    with pytest.raises(HashMismatch):
        store.get(ref)
    store.close()


def test_stale_tmp_files_of_crashed_writers_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    stale_blob = root / f"k.{'a' * 32}.tmp"  # a writer died between write and rename
    stale_sidecar = root / "k.gen.tmp"
    fresh_blob = root / f"k.{'b' * 32}.tmp"  # a writer still writing
    for path in (stale_blob, stale_sidecar, fresh_blob):
        path.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale_blob, (old, old))
    os.utime(stale_sidecar, (old, old))

    store = SharedDirStore(root, secret=SECRET, tmp_max_age_s=3600)  # opening sweeps
    assert not stale_blob.exists() and not stale_sidecar.exists()
    assert fresh_blob.exists()
    ref = store.put("k", sample())  # the store works over what was left
    assert same(store.get(ref), sample())

    os.utime(fresh_blob, (old, old))  # that writer crashed too, later
    assert store.collect() == 0  # no sample is old (max_age_s unset) ...
    assert not fresh_blob.exists()  # ... but the stale tmp went
    assert sorted(p.name for p in root.iterdir()) == [".lock", "k.1.bin", "k.gen"]
    assert store.sweep_tmp() == 0
    store.close()

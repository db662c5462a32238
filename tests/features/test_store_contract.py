"""The FeatureStore contract, run against every backend in ``conftest.BACKENDS``."""

from __future__ import annotations

import threading
from pathlib import Path

import blake3
import pytest
from featurekit import SECRET, StoreFactory, resign, same, sample, wait_for

from fleetkit import FakeClock
from trainfleet.errors import (
    Backpressure,
    BadRef,
    FeatureAuthError,
    HashMismatch,
    SampleGone,
    StaleGeneration,
    StoreUnavailable,
)
from trainfleet.features import (
    GuardedStore,
    InProcessStore,
    SampleRef,
    SharedDirStore,
    encode_tensors,
    open_store,
    verify_ref,
)


def test_put_get_round_trip_and_ref_fields(store_factory: StoreFactory) -> None:
    store = store_factory(pipeline="p1")
    tensors = sample()
    ref = store.put("000001", tensors)
    data = encode_tensors(tensors)
    assert ref.store == store.address
    assert (ref.pipeline, ref.sample_id, ref.key, ref.generation) == ("p1", "000001", "000001", 1)
    assert ref.size == len(data)
    assert ref.digest == blake3.blake3(data).hexdigest()  # BLAKE3-256 of the encoded bytes
    verify_ref(ref, SECRET)
    assert same(store.get(ref), tensors)
    assert same(store.get(ref), tensors)  # a get does not consume
    assert SampleRef.model_validate_json(ref.model_dump_json()) == ref


def test_open_store_finds_the_store_a_ref_names(store_factory: StoreFactory) -> None:
    store = store_factory()
    ref = store.put("a", sample(1))
    other = open_store(ref.store, SECRET)
    try:
        assert same(other.get(ref), sample(1))
        assert other.release(ref) is True
        with pytest.raises(SampleGone):
            store.get(ref)
    finally:
        if other is not store:
            other.close()


def test_get_after_release_fails_and_release_is_idempotent(store_factory: StoreFactory) -> None:
    store = store_factory()
    ref = store.put("a", sample())
    assert store.release(ref) is True
    with pytest.raises(SampleGone) as e:
        store.get(ref)
    assert e.value.reason == "released"
    assert store.release(ref) is False
    with pytest.raises(SampleGone):
        store.retain(ref)


def test_release_is_refcounted(store_factory: StoreFactory) -> None:
    store = store_factory()
    ref = store.put("a", sample(), holders=2)
    assert store.release(ref) is False
    assert same(store.get(ref), sample())
    store.retain(ref)
    assert store.release(ref) is False
    assert same(store.get(ref), sample())
    assert store.release(ref) is True
    with pytest.raises(SampleGone):
        store.get(ref)


def test_abort_frees_whatever_the_refcount(store_factory: StoreFactory) -> None:
    store = store_factory()
    ref = store.put("a", sample(), holders=3)
    keep = store.put("b", sample(2))
    store.abort(ref)
    with pytest.raises(SampleGone) as e:
        store.get(ref)
    assert e.value.reason == "aborted"
    assert store.release(ref) is False
    store.abort(ref)  # again: a no-op
    assert same(store.get(keep), sample(2))
    stats = store.stats()
    assert (stats.aborted, stats.released, stats.held_refs) == (1, 0, 1)


def test_re_put_bumps_generation_and_stales_old_refs(store_factory: StoreFactory) -> None:
    store = store_factory()
    old = store.put("s1", sample(1), key="k")
    new = store.put("s1", sample(2), key="k")
    assert (old.generation, new.generation, new.key) == (1, 2, "k")
    with pytest.raises(StaleGeneration):
        store.get(old)
    with pytest.raises(StaleGeneration):
        store.retain(old)
    assert store.release(old) is False
    store.abort(old)  # withdrawing the old generation leaves the new one alone
    assert same(store.get(new), sample(2))
    assert store.release(new) is True
    third = store.put("s1", sample(3), key="k")  # a released key can be put again
    assert third.generation == 3
    with pytest.raises(StaleGeneration):
        store.get(new)
    assert same(store.get(third), sample(3))
    assert store.stats().held_refs == 1


def test_hash_and_size_mismatch_fail(store_factory: StoreFactory) -> None:
    store = store_factory()
    ref = store.put("a", sample())
    flipped = f"{int(ref.digest, 16) ^ 1:064x}"
    with pytest.raises(HashMismatch) as e:
        store.get(resign(ref, digest=flipped))
    assert e.value.reason == "digest"
    with pytest.raises(HashMismatch):
        store.get(resign(ref, size=ref.size - 1))
    with pytest.raises(HashMismatch):
        store.get(resign(ref, size=ref.size + 1))
    assert same(store.get(ref), sample())


def test_forged_refs_fail_and_change_nothing(store_factory: StoreFactory) -> None:
    store = store_factory()
    ref = store.put("a", sample())
    forged = [
        resign(ref, secret=b"another pipeline's secret"),
        ref.model_copy(update={"generation": 2}),  # altered, MAC left as it was
        ref.model_copy(update={"digest": "0" * 64}),
        resign(ref, store="dir:/somewhere/else"),
    ]
    for bad in forged:
        with pytest.raises(BadRef):
            store.get(bad)
        with pytest.raises(BadRef):
            store.release(bad)
        with pytest.raises(BadRef):
            store.abort(bad)
        with pytest.raises(BadRef):
            store.retain(bad)
    assert same(store.get(ref), sample())
    with pytest.raises(BadRef):
        store_factory(secret=b"wrong").get(ref)


def test_a_secret_is_required(store_factory: StoreFactory) -> None:
    with pytest.raises(FeatureAuthError):
        store_factory(secret=b"")


def test_clone_on_fetch_and_copy_on_put(store_factory: StoreFactory) -> None:
    store = store_factory()
    tensors = sample()
    ref = store.put("a", tensors)
    for t in tensors.values():
        t.zero_()  # the caller reuses its buffers after put
    first = store.get(ref)
    assert same(first, sample())
    for t in first.values():
        t.fill_(7)  # returned tensors are writable, and private
    second = store.get(ref, clone=True)
    assert same(second, sample())
    ptrs = {t.untyped_storage().data_ptr() for t in first.values() if t.numel()}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in second.values() if t.numel()}


def test_held_refs_are_collected_past_max_age(store_factory: StoreFactory) -> None:
    clock = FakeClock()
    store = store_factory(clock=clock, max_age_s=10.0)
    a = store.put("a", sample(1), holders=2)
    clock.advance(6)
    b = store.put("b", sample(2))
    assert store.collect() == 0
    clock.advance(6)
    assert store.collect() == 1
    with pytest.raises(SampleGone) as e:
        store.get(a)
    assert e.value.reason == "expired"
    assert store.release(a) is False
    assert same(store.get(b), sample(2))
    assert store.collect(now=clock.now + 100) == 1
    with pytest.raises(SampleGone):
        store.get(b)
    stats = store.stats()
    assert (stats.collected, stats.held_refs, stats.held_bytes) == (2, 0, 0)


def test_without_max_age_nothing_is_collected(store_factory: StoreFactory) -> None:
    clock = FakeClock()
    store = store_factory(clock=clock)
    ref = store.put("a", sample())
    clock.advance(1e9)
    assert store.collect() == 0
    assert same(store.get(ref), sample())


def test_backpressure_fails_at_once_with_wait_0(store_factory: StoreFactory) -> None:
    size = len(encode_tensors(sample()))
    store = store_factory(high_watermark_bytes=2 * size, low_watermark_bytes=size)
    a = store.put("a", sample())
    store.put("b", sample())
    with pytest.raises(Backpressure):
        store.put("c", sample(), wait_s=0)
    with pytest.raises(Backpressure):
        store.put("c", sample(), wait_s=0.05)
    assert store.stats().waited_s >= 0.05
    assert store.release(a) is True  # held == low: the next put fits
    store.put("c", sample(), wait_s=0)
    stats = store.stats()
    assert (stats.held_refs, stats.held_bytes, stats.puts) == (2, 2 * size, 3)
    assert (stats.high_watermark_bytes, stats.low_watermark_bytes) == (2 * size, size)


def test_a_blocked_put_waits_down_to_the_low_watermark(store_factory: StoreFactory) -> None:
    size = len(encode_tensors(sample()))
    store = store_factory(high_watermark_bytes=3 * size, low_watermark_bytes=size)
    refs = [store.put(f"s{i}", sample()) for i in range(3)]
    done = threading.Event()
    errors: list[BaseException] = []

    def blocked_put() -> None:
        try:
            store.put("late", sample(), wait_s=30)
        except BaseException as e:
            errors.append(e)
        done.set()

    thread = threading.Thread(target=blocked_put)
    thread.start()
    try:
        wait_for(lambda: store.stats().waiting_puts == 1)
        assert store.release(refs[0]) is True  # 2 * size held: still over the low watermark
        assert not done.wait(0.2)
        assert store.stats().waiting_puts == 1
        assert store.release(refs[1]) is True  # size held == low: the put goes through
        assert done.wait(10)
    finally:
        if not done.is_set():  # unblock it whatever failed
            for ref in refs:
                store.abort(ref)
        thread.join(10)
    assert not errors
    stats = store.stats()
    assert (stats.held_refs, stats.waiting_puts, stats.puts) == (2, 0, 4)
    assert stats.waited_s > 0


def test_a_sample_bigger_than_the_high_watermark_goes_in_an_empty_store(
    store_factory: StoreFactory,
) -> None:
    store = store_factory(high_watermark_bytes=10, low_watermark_bytes=5)
    ref = store.put("big", sample(), wait_s=0)
    with pytest.raises(Backpressure):
        store.put("next", sample(), wait_s=0)
    store.release(ref)
    store.put("next", sample(), wait_s=0)


def test_bad_arguments_and_closed_store(store_factory: StoreFactory) -> None:
    store = store_factory()
    with pytest.raises(ValueError):
        store.put("bad/id", sample())
    with pytest.raises(ValueError):
        store.put("a", sample(), key="../escape")
    with pytest.raises(ValueError):
        store.put("a", sample(), holders=0)
    with pytest.raises(ValueError):
        store_factory(high_watermark_bytes=10, low_watermark_bytes=20)
    ref = store.put("a", sample())
    store.close()
    with pytest.raises(StoreUnavailable):
        store.get(ref)
    with pytest.raises(StoreUnavailable):
        store.put("b", sample())


def test_stats_count_what_happened(store_factory: StoreFactory) -> None:
    store = store_factory()
    refs = [store.put(f"s{i}", sample(i)) for i in range(4)]
    for ref in refs[:3]:
        store.get(ref)
    store.release(refs[0])
    store.abort(refs[1])
    stats = store.stats()
    size = refs[2].size + refs[3].size
    assert (stats.puts, stats.gets, stats.released, stats.aborted) == (4, 3, 1, 1)
    assert (stats.held_refs, stats.held_bytes, stats.collected) == (2, size, 0)


def test_concurrent_puts_gets_and_releases(store_factory: StoreFactory) -> None:
    store = store_factory()
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(20):
                ref = store.put(f"w{w}-{i}", sample(w * 100 + i, n=8), holders=2)
                assert same(store.get(ref), sample(w * 100 + i, n=8))
                assert store.release(ref) is False
                assert store.release(ref) is True
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    stats = store.stats()
    assert (stats.puts, stats.released, stats.held_refs) == (80, 80, 0)


@pytest.mark.parametrize("backend", ["memory", "shared_dir"])
def test_read_encoded_is_a_get_without_the_decode(tmp_path: Path, backend: str) -> None:
    store: GuardedStore = (
        InProcessStore(secret=SECRET)
        if backend == "memory"
        else SharedDirStore(tmp_path / "d", secret=SECRET)
    )
    try:
        ref = store.put("a", sample())
        assert bytes(store.read_encoded(ref)) == encode_tensors(sample())
        assert store.stats().gets == 1  # counts as a get
        lying = resign(ref, digest="0" * 64)
        with pytest.raises(HashMismatch) as e:
            store.read_encoded(lying)
        assert e.value.reason == "digest"
        # verify=False: every check but the digest (left to whoever receives the bytes)
        assert bytes(store.read_encoded(lying, verify=False)) == encode_tensors(sample())
        with pytest.raises(HashMismatch):
            store.read_encoded(resign(ref, size=ref.size + 1), verify=False)
        with pytest.raises(BadRef):
            store.read_encoded(resign(ref, secret=b"other"), verify=False)
        store.release(ref)
        with pytest.raises(SampleGone):
            store.read_encoded(ref, verify=False)
        assert store.stats().gets == 2
    finally:
        store.close()

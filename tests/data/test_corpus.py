"""The corpora are deterministic, split by a stable hash, and both splits are non-empty."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from trainfleet.data.corpus import (
    EXCLUDED_DIRS,
    SEPARATOR,
    doc_hash_fraction,
    is_heldout,
    load_corpus,
    stdlib_documents,
    stdlib_files,
    synthetic_documents,
    take_documents,
)


def _ids(docs: list[tuple[str, bytes]]) -> list[str]:
    return [doc_id for doc_id, _ in docs]


def _content_bytes(info: dict) -> int:
    return (
        info["train_bytes"] + info["heldout_bytes"] - len(SEPARATOR) * (info["num_documents"] - 2)
    )


def test_same_arguments_give_same_bytes_and_info() -> None:
    for name in ("stdlib", "synthetic"):
        first = load_corpus(name, 50_000, 0.1, seed=3)
        second = load_corpus(name, 50_000, 0.1, seed=3)
        assert first == second
        assert first.info["content_sha256"] == second.info["content_sha256"]


def test_synthetic_differs_by_seed_and_stdlib_does_not() -> None:
    assert (
        load_corpus("synthetic", 20_000, 0.1, seed=0).train
        != load_corpus("synthetic", 20_000, 0.1, seed=1).train
    )
    assert load_corpus("stdlib", 20_000, 0.1, seed=0) == load_corpus("stdlib", 20_000, 0.1, 1)


def test_corpus_fills_max_bytes_and_holds_out_about_the_fraction() -> None:
    for name in ("stdlib", "synthetic"):
        info = load_corpus(name, 100_000, 0.2, seed=0).info
        assert _content_bytes(info) == 100_000
        assert info["num_train_documents"] >= 1 and info["num_heldout_documents"] >= 1
        assert 0.15 < info["heldout_bytes"] / (info["train_bytes"] + info["heldout_bytes"]) < 0.25


def test_stdlib_files_are_sorted_python_sources_outside_excluded_dirs() -> None:
    files = stdlib_files(Path(sysconfig.get_paths()["stdlib"]))
    assert len(files) > 100
    assert files == sorted(files)
    assert "os.py" in files
    for rel in files:
        assert rel.endswith(".py")
        assert not EXCLUDED_DIRS.intersection(rel.split("/")[:-1]), rel


def test_splits_are_disjoint_non_empty_and_follow_the_hash() -> None:
    train, heldout = take_documents(synthetic_documents(seed=0), 50_000, 0.1)
    assert train and heldout
    assert not set(_ids(train)) & set(_ids(heldout))
    assert all(is_heldout(d, 0.1) for d in _ids(heldout))
    assert not any(is_heldout(d, 0.1) for d in _ids(train))


def test_a_document_keeps_its_side_as_max_bytes_grows() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    small = take_documents(stdlib_documents(root), 30_000, 0.1)
    large = take_documents(stdlib_documents(root), 300_000, 0.1)
    for small_side, large_side in zip(small, large, strict=True):
        ids = _ids(small_side)
        # Growing only appends: the smaller corpus's documents are a prefix of each side.
        assert _ids(large_side)[: len(ids)] == ids


def test_empty_documents_are_skipped() -> None:
    docs = [("a", b"abc"), ("b", b""), ("c", b"def"), ("d", b"ghi")]
    train, heldout = take_documents(iter(docs), 1_000, 0.3)
    assert "b" not in _ids(train + heldout)
    assert sorted(_ids(train + heldout)) == ["a", "c", "d"]


def test_empty_heldout_side_gets_the_lowest_hash_document() -> None:
    docs = [(f"doc/{i}", b"x" * 100) for i in range(20)]
    train, heldout = take_documents(iter(docs), 10_000, 1e-9)
    assert len(heldout) == 1 and len(train) == 19
    assert _ids(heldout) == [min(_ids(docs), key=doc_hash_fraction)]


def test_empty_train_side_gets_the_highest_hash_document() -> None:
    docs = [(f"doc/{i}", b"x" * 100) for i in range(20)]
    train, heldout = take_documents(iter(docs), 10_000, 1 - 1e-9)
    assert len(train) == 1 and len(heldout) == 19
    assert _ids(train) == [max(_ids(docs), key=doc_hash_fraction)]


@given(
    sizes=st.lists(st.integers(1, 500), min_size=2, max_size=40),
    max_bytes=st.integers(2, 5_000),
    fraction=st.floats(0.01, 0.99),
)
def test_take_documents_respects_the_cap_and_keeps_both_sides(
    sizes: list[int], max_bytes: int, fraction: float
) -> None:
    docs = [(f"d{i}", b"y" * n) for i, n in enumerate(sizes)]
    try:
        train, heldout = take_documents(iter(docs), max_bytes, fraction)
    except ValueError as e:
        # Only a budget too small to take two documents may refuse to split.
        assert "at least 2 documents" in str(e)
        return
    assert train and heldout
    assert sum(len(c) for _, c in train + heldout) <= max_bytes
    assert not set(_ids(train)) & set(_ids(heldout))
    # Documents keep their order within each side.
    order = _ids(docs)
    for side in (train, heldout):
        assert _ids(side) == sorted(_ids(side), key=order.index)

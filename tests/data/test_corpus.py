"""The split rule is a stable function of a document's id; the stdlib file list is sorted."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from trainfleet.data.corpus import EXCLUDED_DIRS, doc_hash_fraction, is_heldout, stdlib_files


def test_stdlib_files_are_sorted_python_sources_outside_excluded_dirs() -> None:
    files = stdlib_files(Path(sysconfig.get_paths()["stdlib"]))
    assert len(files) > 100
    assert files == sorted(files)
    assert "os.py" in files
    for rel in files:
        assert rel.endswith(".py")
        assert not EXCLUDED_DIRS.intersection(rel.split("/")[:-1]), rel


@given(doc_id=st.text(max_size=40), low=st.floats(0.0, 1.0), high=st.floats(0.0, 1.0))
def test_a_document_held_out_at_a_fraction_stays_held_out_at_a_larger_one(
    doc_id: str, low: float, high: float
) -> None:
    low, high = sorted((low, high))
    assert 0 <= doc_hash_fraction(doc_id) < 1
    assert not is_heldout(doc_id, 0.0)
    if is_heldout(doc_id, low):
        assert is_heldout(doc_id, high)


def test_the_split_depends_on_the_id_alone_and_holds_out_about_the_fraction() -> None:
    ids = [f"doc/{i}" for i in range(4000)]
    held = [d for d in ids if is_heldout(d, 0.1)]
    assert 300 < len(held) < 500
    assert held == [d for d in reversed(ids) if is_heldout(d, 0.1)][::-1]
    # Pinned: the rule is part of every dataset's content, so it must never drift.
    assert doc_hash_fraction("os.py") == int("d9d7c69c", 16) / 2**32

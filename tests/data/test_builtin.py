"""``hyper.corpus`` as a built-in dataset spec: sized by ``corpus_bytes``, split like any
dataset, a pure function of the params."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from trainfleet.data.builtin import builtin_dataset, stdlib_selection
from trainfleet.data.corpus import is_heldout
from trainfleet.data.shards import plan_shards
from trainfleet.data.spec import StdlibDataset, SyntheticDataset, dataset_digest
from trainfleet.errors import CorpusTooSmall
from trainfleet.train.recipes import GPTParams

ROOT = Path(sysconfig.get_paths()["stdlib"])


def _params(**overrides: Any) -> GPTParams:
    return GPTParams.model_validate(overrides)


def _sizes(files: list[str]) -> dict[str, int]:
    return {f: (ROOT / f).stat().st_size for f in files}


@pytest.mark.parametrize(("max_bytes", "fraction"), [(10_000, 0.1), (100_000, 0.2), (400_000, 0.1)])
def test_stdlib_takes_whole_files_within_each_sides_budget(max_bytes: int, fraction: float) -> None:
    files = stdlib_selection(ROOT, max_bytes, fraction)
    sizes = _sizes(files)
    assert files == sorted(files) and all(sizes.values())
    heldout = sum(n for f, n in sizes.items() if is_heldout(f, fraction))
    train = sum(sizes.values()) - heldout
    assert 0 < heldout <= math.ceil(max_bytes * fraction)
    assert 0 < train <= max_bytes - math.ceil(max_bytes * fraction)
    # Plenty of small files: each side comes within 5% of its budget.
    assert heldout + train > 0.95 * max_bytes


def test_stdlib_spec_splits_its_files_as_the_selection_did() -> None:
    spec = builtin_dataset(_params(corpus_bytes=100_000, heldout_fraction=0.2))
    assert isinstance(spec, StdlibDataset) and spec.heldout_fraction == 0.2
    plan = plan_shards(spec)
    sizes = _sizes(spec.files)
    separator_tokens = 2 * len(spec.files)
    assert plan.num_tokens == sum(sizes.values()) + separator_tokens
    heldout_tokens = sum(s.num_tokens for s in plan.select("heldout"))
    heldout_files = [f for f in spec.files if is_heldout(f, 0.2)]
    assert heldout_tokens == sum(sizes[f] for f in heldout_files) + 2 * len(heldout_files)


def test_the_spec_is_a_pure_function_of_the_params() -> None:
    stdlib = builtin_dataset(_params(seed=0))
    assert stdlib == builtin_dataset(_params(seed=0))
    assert dataset_digest(stdlib) == dataset_digest(builtin_dataset(_params(seed=5)))
    synthetic = builtin_dataset(_params(corpus="synthetic", seed=1))
    assert synthetic == builtin_dataset(_params(corpus="synthetic", seed=1))
    assert dataset_digest(synthetic) != dataset_digest(
        builtin_dataset(_params(corpus="synthetic", seed=2))
    )


@pytest.mark.parametrize("corpus_bytes", [10_000, 65_536, 400_000])
def test_synthetic_holds_about_corpus_bytes_in_at_least_64_documents(corpus_bytes: int) -> None:
    spec = builtin_dataset(_params(corpus="synthetic", corpus_bytes=corpus_bytes, seed=7))
    assert isinstance(spec, SyntheticDataset)
    assert spec.seed == 7 and spec.num_documents >= 64 and spec.doc_tokens <= 1024
    plan = plan_shards(spec)
    assert 0.9 * corpus_bytes < plan.num_tokens < 1.1 * corpus_bytes
    assert plan.select("train") and plan.select("heldout")


def test_a_seed_beyond_the_specs_range_wraps() -> None:
    spec = builtin_dataset(_params(corpus="synthetic", seed=2**63 + 5))
    assert isinstance(spec, SyntheticDataset) and spec.seed == 5


def test_an_empty_stdlib_selection_is_refused_not_read_as_every_file(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text("x" * 50_000)
    assert stdlib_selection(tmp_path, 10_000, 0.1) == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
        with pytest.raises(CorpusTooSmall, match="no stdlib file"):
            builtin_dataset(_params(corpus_bytes=10_000))

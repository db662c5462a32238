"""Shard plans cover every document exactly once, hash what they hold, and rebuild exactly."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainfleet.data.shards import (
    load_plan,
    materialize_shard,
    plan_shards,
    save_plan,
    shard_tokens,
    tokenized_documents,
)
from trainfleet.data.sources import iter_documents
from trainfleet.data.spec import FilesDataset, RouterSpec, SyntheticDataset
from trainfleet.data.tokenize import SEPARATOR
from trainfleet.data.verify import fit_router_for
from trainfleet.errors import ShardMismatch


def synthetic(**overrides: object) -> SyntheticDataset:
    fields: dict[str, object] = {
        "name": "d",
        "source": "synthetic",
        "num_dialects": 3,
        "num_documents": 60,
        "doc_tokens": 64,
        "shard_tokens": 1024,
    }
    fields.update(overrides)
    return SyntheticDataset.model_validate(fields)


@settings(max_examples=25, deadline=None)
@given(
    num_documents=st.integers(2, 80),
    shard_tokens=st.integers(256, 4096),
    heldout_fraction=st.floats(0.01, 0.49),
    num_paths=st.one_of(st.none(), st.integers(1, 5)),
    seed=st.integers(0, 1000),
)
def test_shards_cover_every_document_exactly_once(
    num_documents: int,
    shard_tokens: int,
    heldout_fraction: float,
    num_paths: int | None,
    seed: int,
) -> None:
    router_spec = (
        RouterSpec(num_paths=num_paths, num_features=64, sample_documents=30) if num_paths else None
    )
    spec = synthetic(
        num_documents=num_documents,
        shard_tokens=shard_tokens,
        heldout_fraction=heldout_fraction,
        seed=seed,
        router=router_spec,
    )
    router = fit_router_for(spec) if router_spec else None
    plan = plan_shards(spec, router)
    covered = [i for shard in plan.shards for i in shard.doc_indices()]
    assert sorted(covered) == list(range(num_documents))  # every document, exactly once
    assert plan.num_documents == num_documents
    assert sum(s.num_tokens for s in plan.shards) == plan.num_tokens
    # A document's shard agrees with its split and (when routed) its path.
    docs = {d.index: d for d in tokenized_documents(spec)}
    for shard in plan.shards:
        assert 0 <= shard.path < (num_paths or 1)
        for i in shard.doc_indices():
            assert docs[i].split == shard.split
            if router is not None:
                assert router.route(i, docs[i].tokens) == shard.path
    # Shards of one (split, path) are numbered 0.. and only the last may be short.
    for split in ("train", "heldout"):
        for path in range(num_paths or 1):
            group = plan.select(split, path)  # type: ignore[arg-type]
            assert [s.index for s in group] == list(range(len(group)))
            assert all(s.num_tokens >= shard_tokens for s in group[:-1])


def test_a_shard_is_its_documents_and_separators_and_rebuilds_identically() -> None:
    spec = synthetic()
    plan = plan_shards(spec)
    texts = {d.index: d.text for d in iter_documents(spec)}
    for shard in plan.shards:
        content = materialize_shard(spec, shard)
        assert content == b"".join(texts[i] + SEPARATOR for i in shard.doc_indices())
        assert hashlib.sha256(content).hexdigest() == shard.sha256
        assert len(shard_tokens(spec, content)) == shard.num_tokens
    # Planning again, in a fresh pass, gives the same plan.
    assert plan_shards(spec) == plan


def test_the_plan_round_trips_through_json(tmp_path) -> None:
    spec = synthetic(router=RouterSpec(num_paths=2, num_features=64))
    plan = plan_shards(spec, fit_router_for(spec))
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text("{not json")
    assert load_plan(tmp_path / "bad.json") is None


def test_a_source_that_changed_under_its_spec_is_refused_on_rebuild(tmp_path) -> None:
    for i in range(6):
        (tmp_path / f"doc{i}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"document {i}.{j} " * 20}) for j in range(5))
        )
    spec = FilesDataset(
        name="f",
        source="files",
        root=str(tmp_path),
        paths=["*.jsonl"],
        format="jsonl",
        shard_tokens=1024,
    )
    plan = plan_shards(spec)
    shard = plan.select("train")[0]
    assert materialize_shard(spec, shard)
    (tmp_path / "doc0.jsonl").write_text(json.dumps({"text": "edited"}) + "\n" * 5)
    (tmp_path / "doc0.jsonl").write_text(
        "\n".join(json.dumps({"text": f"edited {j} " * 20}) for j in range(5))
    )
    with pytest.raises(ShardMismatch, match="the source changed under the spec"):
        materialize_shard(spec, shard)


def test_routing_needs_the_router_of_a_routed_spec() -> None:
    routed = synthetic(router=RouterSpec(num_paths=2, num_features=64))
    with pytest.raises(ValueError, match="needs its router"):
        plan_shards(routed)
    with pytest.raises(ValueError, match="takes none"):
        plan_shards(synthetic(), fit_router_for(routed))

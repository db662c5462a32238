"""The synthetic dialects: a doubly stochastic table, pure documents, an exact entropy rate."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainfleet.data import dialects
from trainfleet.data.dialects import (
    dialect_of,
    entropy_rates_nats,
    generate_documents,
    loss_floor_nats,
    make_dialects,
)
from trainfleet.data.sources import documents_at, iter_documents
from trainfleet.data.spec import MAX_SEED, SyntheticDataset
from trainfleet.errors import DataError


def _spec(**fields: object) -> SyntheticDataset:
    return SyntheticDataset.model_validate(
        {"name": "synth", "source": "synthetic", "num_documents": 500, **fields}
    )


@st.composite
def _specs(draw: st.DrawFn) -> SyntheticDataset:
    alphabet_size = draw(st.integers(2, 94))
    num_dialects = draw(st.integers(1, 94 // alphabet_size))
    branching = draw(st.integers(1, alphabet_size))
    seed = draw(st.integers(0, MAX_SEED))  # the spec refuses seeds that do not fit 8 bytes
    return _spec(
        seed=seed, num_dialects=num_dialects, alphabet_size=alphabet_size, branching=branching
    )


@settings(max_examples=40, deadline=None)
@given(_specs())
def test_table_counts_are_the_weights_and_doubly_stochastic(spec: SyntheticDataset) -> None:
    ds = make_dialects(spec)
    k, size = spec.num_dialects, spec.alphabet_size
    assert ds.alphabets.shape == (k, size)
    symbols = ds.alphabets.ravel().tolist()
    assert len(set(symbols)) == k * size  # disjoint
    assert all(33 <= s <= 126 for s in symbols)
    for d in range(k):
        alphabet = ds.alphabets[d].tolist()
        for i, prev in enumerate(alphabet):
            row = ds.table[prev]
            assert set(row.tolist()) <= set(alphabet)  # successors stay in the dialect
            counts = [int(np.count_nonzero(row == nxt)) for nxt in alphabet]
            assert counts == ds.weights[d, i].tolist()
            assert ds.weights[d, i, (i + 1) % size] >= 1  # the cyclic shift: irreducible
        assert (ds.weights[d].sum(axis=1) == 256).all()
        assert (ds.weights[d].sum(axis=0) == 256).all()
        assert np.count_nonzero(ds.weights[d], axis=1).max() <= spec.branching


@settings(max_examples=20, deadline=None)
@given(_specs())
def test_documents_keep_to_one_alphabet_and_their_length_range(spec: SyntheticDataset) -> None:
    ds = make_dialects(spec)
    indices = [0, 7, 3, 499]
    for index, text in zip(indices, generate_documents(spec, indices), strict=True):
        alphabet = set(ds.alphabets[dialect_of(spec, index)].tolist())
        assert set(text) <= alphabet
        half = spec.doc_tokens // 2
        assert half <= len(text) <= half + spec.doc_tokens


def _sequential(spec: SyntheticDataset, index: int) -> bytes:
    """The module docstring's definition of document ``index``, one token at a time."""
    ds = make_dialects(spec)
    prefix = b"trainfleet-doc\0" + spec.seed.to_bytes(8, "little") + index.to_bytes(8, "little")
    header = hashlib.shake_256(prefix).digest(24)
    u64 = [int.from_bytes(header[8 * f : 8 * f + 8], "little") for f in range(3)]
    alphabet = ds.alphabets[u64[0] % spec.num_dialects]
    length = spec.doc_tokens // 2 + u64[1] % (spec.doc_tokens + 1)
    tokens = [int(alphabet[u64[2] % spec.alphabet_size])]
    for r in hashlib.shake_256(prefix).digest(24 + length - 1)[24:]:
        tokens.append(int(ds.table[tokens[-1], r]))
    return bytes(tokens)


def test_lockstep_generation_matches_the_definition_across_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec(doc_tokens=64, num_dialects=3, alphabet_size=20, branching=5, seed=11)
    indices = [9, 0, 4, 3, 17, 250]
    expected = [_sequential(spec, i) for i in indices]
    assert generate_documents(spec, indices) == expected
    monkeypatch.setattr(dialects, "_BATCH_TOKENS", 150)  # two documents per batch
    assert dialects.documents_per_batch(spec) == 2
    assert generate_documents(spec, indices) == expected


def test_same_spec_same_bytes_and_the_name_does_not_matter() -> None:
    first = generate_documents(_spec(), range(20))
    assert generate_documents(_spec(), range(20)) == first
    assert generate_documents(_spec(name="other"), range(20)) == first
    assert len(set(first)) == 20


# The spec alone defines the bytes: a change here changes every synthetic dataset's content.
GOLDEN_SHA256 = "ddaa395f3eb601dd2adfe746e61a8d8372d5d0f35bf78c6edcfe3912dabb56f2"
GOLDEN_TABLE = "027beb82e7b7bbe7cd8a722b40ea16db3e91d0062665aab2927e30d0fb4019c2"


def test_bytes_are_pinned_across_platforms_and_versions() -> None:
    texts = generate_documents(_spec(), range(3))
    digest = hashlib.sha256(b"|".join(texts)).hexdigest()
    assert digest == GOLDEN_SHA256
    assert hashlib.sha256(make_dialects(_spec()).table.tobytes()).hexdigest() == GOLDEN_TABLE


def test_a_different_seed_gives_different_bytes() -> None:
    assert generate_documents(_spec(seed=1), range(5)) != generate_documents(_spec(), range(5))
    assert not np.array_equal(make_dialects(_spec(seed=1)).table, make_dialects(_spec()).table)


def test_documents_at_equals_the_items_of_iter_documents() -> None:
    spec = _spec(num_documents=40, doc_tokens=32)
    everything = list(iter_documents(spec))
    assert [d.index for d in everything] == list(range(40))
    assert everything[7].doc_id == "synthetic/00000007"
    picked = [3, 4, 20, 39]
    assert list(documents_at(spec, picked)) == [everything[i] for i in picked]


def test_an_index_past_the_end_is_refused() -> None:
    with pytest.raises(DataError, match="500"):
        generate_documents(_spec(), [500])
    with pytest.raises(DataError, match="12"):
        documents_at(_spec(max_documents=10), [2, 12])


def test_empirical_loss_of_the_true_chain_is_the_entropy_rate() -> None:
    spec = _spec(seed=5, doc_tokens=1024)
    ds = make_dialects(spec)
    neg_log_p = np.zeros((256, 256))
    for d in range(spec.num_dialects):
        alphabet = ds.alphabets[d].astype(np.intp)
        with np.errstate(divide="ignore"):
            neg_log_p[np.ix_(alphabet, alphabet)] = -np.log(ds.weights[d] / 256)
    rates = entropy_rates_nats(ds)
    total_nats, num_transitions, expected_nats = 0.0, 0, 0.0
    for index, text in enumerate(generate_documents(spec, range(200))):
        tokens = np.frombuffer(text, dtype=np.uint8).astype(np.intp)
        total_nats += float(neg_log_p[tokens[:-1], tokens[1:]].sum())
        num_transitions += len(tokens) - 1
        expected_nats += rates[dialect_of(spec, index)] * (len(tokens) - 1)
    assert num_transitions > 190_000
    assert abs(total_nats / num_transitions - expected_nats / num_transitions) < 0.02


def test_entropy_rates_and_the_loss_floor() -> None:
    spec = _spec(seed=2, branching=6)
    rates = entropy_rates_nats(make_dialects(spec))
    assert len(rates) == spec.num_dialects
    assert all(0 < rate <= math.log(6) for rate in rates)
    assert loss_floor_nats(spec) == pytest.approx(sum(rates) / len(rates), abs=1e-12)
    assert entropy_rates_nats(make_dialects(_spec(branching=1))) == [0.0] * 4


def test_a_doubly_stochastic_rate_by_hand() -> None:
    # branching 2: every row holds c_0 and c_1 = 256 - c_0, unless the permutations coincide
    ds = make_dialects(_spec(seed=3, branching=2, num_dialects=1, alphabet_size=8))
    p = ds.weights[0] / 256
    by_hand = -sum(x * math.log(x) for x in p.ravel() if x > 0) / 8
    assert entropy_rates_nats(ds) == [pytest.approx(by_hand, abs=1e-12)]
    assert by_hand <= math.log(2)


def test_a_paths_floor_is_the_mean_rate_of_the_dialects_it_holds() -> None:
    spec = _spec(num_dialects=3, num_documents=300)
    rates = dialects.entropy_rates_nats(dialects.make_dialects(spec))
    by_dialect: dict[int, list[int]] = {}
    for i in range(spec.num_documents):
        by_dialect.setdefault(dialects.dialect_of(spec, i), []).append(i)
    for d, indices in by_dialect.items():  # a path holding one dialect has exactly its rate
        assert dialects.documents_floor_nats(spec, indices) == pytest.approx(rates[d], abs=1e-12)
    mixed = by_dialect[0][:10] + by_dialect[1][:30]
    assert dialects.documents_floor_nats(spec, mixed) == pytest.approx(
        (10 * rates[0] + 30 * rates[1]) / 40, abs=1e-12
    )

"""The ``synthetic`` source: a seeded mixture of Markov "dialects" with an exact entropy rate.

Why: a training run needs a task whose best achievable loss is known, so that a curve can be
read against a floor rather than against another curve. Each document is written in one of
``k = num_dialects`` dialects; each dialect is a first-order Markov chain over its own
alphabet of ``A = alphabet_size`` printable ASCII symbols (33..126, alphabets disjoint, so the
first symbol of a document reveals its dialect).

Transitions. Dialect d's chain is ``P = sum_m (c_m / 256) * Perm_m`` over ``branching``
permutations of its alphabet: ``Perm_0`` is the cyclic shift ``i -> i + 1`` (so the chain is
irreducible) and the others are seeded random permutations; the ``c_m >= 1`` are integers
summing to 256. Every row and every column of the integer weight matrix ``W = 256 P`` sums to
256: P is doubly stochastic. Consequences:

- the stationary distribution is uniform, so a document that starts at a uniformly drawn
  symbol is stationary from its first token (no burn-in);
- the entropy rate is exactly ``H_d = -(1/A) sum_ij p_ij ln p_ij`` with ``p_ij = w_ij / 256``,
  where the weights of permutations that send i to the same j add up.

Sampling is a table lookup: all dialects share ONE 256x256 ``uint8`` table ``T`` whose row
``prev`` lists ``prev``'s successors with multiplicity ``w``, so ``next = T[prev, r]`` for a
uniform random byte ``r``. Rows of bytes outside every alphabet are 0 and never reached.

Randomness is SHAKE-256 only (never ``random`` or numpy generators), so the bytes are defined
by the spec alone on any platform and version. A stream is read as consecutive u64
little-endian values and ``below(n) = u64 % n`` (bias < 2**-57, part of the definition).

- Table: stream ``SHAKE-256(b"trainfleet-dialects\\0" + seed as u64 LE)``. First a Fisher-Yates
  shuffle of the 94 symbols (for i = 93 .. 1: swap i and below(i + 1)); dialect d's alphabet is
  positions ``[d A, (d + 1) A)``, in that order. Then per dialect, in order: the cut points of
  the ``c_m``, the first ``branching - 1`` entries of a partial Fisher-Yates over 1..255 (for
  m = 0, 1, ..: swap m and m + below(255 - m)), sorted, ``c`` = their differences between 0
  and 256; then ``Perm_1 .. Perm_{branching-1}``, each a Fisher-Yates shuffle of range(A). Row
  of symbol i lists ``c_0`` copies of ``Perm_0(i)``, then ``c_1`` copies of ``Perm_1(i)``, ...
- Document i: ``SHAKE-256(b"trainfleet-doc\\0" + seed (u64 LE) + i (u64 LE))``. Bytes 0..8:
  dialect ``= u64 % k``; 8..16: length ``= doc_tokens // 2 + u64 % (doc_tokens + 1)``;
  16..24: start symbol ``= alphabet[u64 % A]``; then one byte ``r_t`` per further token,
  ``token_t = T[token_{t-1}, r_t]``, ``length - 1`` bytes in all.

Generation runs a batch of documents in lockstep over positions (longest first, the active
prefix shrinking as documents end), one ``np.take`` per position: tens of MB/s on one core.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainfleet.data.spec import PRINTABLE_SYMBOLS, SyntheticDataset
from trainfleet.errors import DataError

_TABLE_DOMAIN = b"trainfleet-dialects\0"
_DOC_DOMAIN = b"trainfleet-doc\0"
_HEADER = struct.Struct("<3Q")  # a document stream opens with dialect, length, start
_WEIGHT_TOTAL = 256  # one row of T: every successor with multiplicity w, w summing to 256
_BATCH_TOKENS = 1 << 21  # tokens generated together, bounding the work arrays (~6 MiB)


@dataclass(frozen=True, eq=False)
class DialectSet:
    """The dialects of one spec: their alphabets, the shared lookup table and the weights."""

    alphabets: np.ndarray  # (k, A) uint8: dialect d's symbols, in alphabet order
    table: np.ndarray  # (256, 256) uint8: next = table[prev, r]
    weights: np.ndarray  # (k, A, A) int64: weights[d, i, j] = copies of symbol j in row i


class _Stream:
    """A SHAKE-256 stream read as u64 little-endian values."""

    def __init__(self, seed_material: bytes) -> None:
        self._hash = hashlib.shake_256(seed_material)
        self._buffer = b""
        self._position = 0

    def below(self, n: int) -> int:
        if self._position + 8 > len(self._buffer):
            # SHAKE output is prefix-stable: a longer digest extends the shorter one
            self._buffer = self._hash.digest(max(256, 2 * len(self._buffer)))
        value = int.from_bytes(self._buffer[self._position : self._position + 8], "little")
        self._position += 8
        return value % n


def _shuffle(values: list[int], stream: _Stream) -> list[int]:
    for i in range(len(values) - 1, 0, -1):
        j = stream.below(i + 1)
        values[i], values[j] = values[j], values[i]
    return values


def _coefficients(branching: int, stream: _Stream) -> list[int]:
    """``branching`` integers >= 1 summing to 256: a uniformly drawn composition."""
    pool = list(range(1, _WEIGHT_TOTAL))
    for m in range(branching - 1):
        j = m + stream.below(len(pool) - m)
        pool[m], pool[j] = pool[j], pool[m]
    bounds = [0, *sorted(pool[: branching - 1]), _WEIGHT_TOTAL]
    return [b - a for a, b in itertools.pairwise(bounds)]


@functools.lru_cache(maxsize=16)
def _build_dialects(seed: int, num_dialects: int, alphabet_size: int, branching: int) -> DialectSet:
    stream = _Stream(_TABLE_DOMAIN + seed.to_bytes(8, "little"))
    symbols = _shuffle(list(range(33, 33 + PRINTABLE_SYMBOLS)), stream)
    alphabets = np.array(symbols[: num_dialects * alphabet_size], dtype=np.uint8)
    alphabets = alphabets.reshape(num_dialects, alphabet_size)
    table = np.zeros((256, 256), dtype=np.uint8)
    weights = np.zeros((num_dialects, alphabet_size, alphabet_size), dtype=np.int64)
    rows = np.arange(alphabet_size)
    for d in range(num_dialects):
        coefficients = _coefficients(branching, stream)
        perms = [(rows + 1) % alphabet_size]
        perms += [np.array(_shuffle(list(range(alphabet_size)), stream)) for _ in coefficients[1:]]
        successors = np.concatenate(
            [
                np.repeat(perm[:, None], c, axis=1)
                for perm, c in zip(perms, coefficients, strict=True)
            ],
            axis=1,
        )  # (A, 256) local indices
        table[alphabets[d]] = alphabets[d][successors]
        for perm, c in zip(perms, coefficients, strict=True):
            np.add.at(weights[d], (rows, perm), c)
    for array in (alphabets, table, weights):
        array.flags.writeable = False  # shared through the cache
    return DialectSet(alphabets=alphabets, table=table, weights=weights)


def make_dialects(spec: SyntheticDataset) -> DialectSet:
    """The spec's dialects (cached: they depend on seed, k, alphabet_size and branching)."""
    return _build_dialects(spec.seed, spec.num_dialects, spec.alphabet_size, spec.branching)


def entropy_rates_nats(dialects: DialectSet) -> list[float]:
    """Each dialect's exact entropy rate ``-(1/A) sum_ij p_ij ln p_ij``, in nats per token."""
    p = dialects.weights / _WEIGHT_TOTAL
    terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return [float(t.sum() / dialects.weights.shape[1]) for t in terms]


def loss_floor_nats(spec: SyntheticDataset) -> float:
    """The best achievable loss on in-document transitions: the mean of the entropy rates.

    Dialects are drawn uniformly and independently of length, so the token-weighted mean is
    the plain mean. Boundary tokens are excluded: a document's first token (which costs about
    ``ln(k A)``) and the two separator bytes (which, with the length uniform over
    ``doc_tokens + 1`` values, cost about ``ln(doc_tokens + 1)`` per document). They are 3 of
    every ``doc_tokens + 2`` tokens on average (under 0.3% at the default 1024).
    """
    rates = entropy_rates_nats(make_dialects(spec))
    return math.fsum(rates) / len(rates)


def _document_seed(spec: SyntheticDataset, index: int) -> bytes:
    """What document ``index``'s SHAKE-256 stream is seeded with."""
    if not 0 <= index < spec.num_documents:
        raise DataError(f"document {index} is outside the corpus of {spec.num_documents}")
    return _DOC_DOMAIN + spec.seed.to_bytes(8, "little") + index.to_bytes(8, "little")


def dialect_of(spec: SyntheticDataset, index: int) -> int:
    """The dialect document ``index`` is written in."""
    dialect_u64, _, _ = _HEADER.unpack(
        hashlib.shake_256(_document_seed(spec, index)).digest(_HEADER.size)
    )
    return int(dialect_u64 % spec.num_dialects)


def documents_floor_nats(spec: SyntheticDataset, indices: Sequence[int]) -> float:
    """The loss floor of a subset of documents (a routed path's): their dialects' mean rate.

    Lengths do not depend on the dialect, so weighting by document is weighting by token in
    expectation. Boundary tokens are excluded, as in ``loss_floor_nats``.
    """
    rates = entropy_rates_nats(make_dialects(spec))
    return math.fsum(rates[dialect_of(spec, i)] for i in indices) / max(1, len(indices))


def _generate_batch(spec: SyntheticDataset, indices: Sequence[int]) -> list[bytes]:
    alphabets = make_dialects(spec).alphabets.tolist()
    lengths: list[int] = []
    starts: list[int] = []
    random_bytes: list[bytes] = []
    for index in indices:
        stream = hashlib.shake_256(_document_seed(spec, index))  # digest(n): prefix-stable
        dialect_u64, length_u64, start_u64 = _HEADER.unpack(stream.digest(_HEADER.size))
        length = spec.doc_tokens // 2 + length_u64 % (spec.doc_tokens + 1)
        lengths.append(length)
        starts.append(alphabets[dialect_u64 % spec.num_dialects][start_u64 % spec.alphabet_size])
        random_bytes.append(stream.digest(_HEADER.size + length - 1)[_HEADER.size :])

    order = np.argsort(-np.array(lengths), kind="stable")  # longest first: active rows a prefix
    sorted_lengths = [lengths[j] for j in order]
    max_length = sorted_lengths[0]
    padded = b"".join(random_bytes[j].ljust(max_length - 1, b"\0") for j in order)
    # work[row, t] = (r_{t+1}, token_t); read as a little-endian uint16 it is the flat index
    # token_t * 256 + r_{t+1} into T, so one np.take per position runs every chain one step
    work = np.zeros((len(indices), max_length, 2), dtype=np.uint8)
    work[:, :-1, 0] = np.frombuffer(padded, dtype=np.uint8).reshape(len(indices), -1)
    work[:, 0, 1] = np.array(starts, dtype=np.uint8)[order]
    flat_index = work.view("<u2").reshape(len(indices), max_length)
    tokens = work[:, :, 1]
    num_active = np.searchsorted(-np.array(sorted_lengths), -np.arange(max_length), side="left")
    table = make_dialects(spec).table.ravel()
    for t in range(1, max_length):
        active = num_active[t]
        np.take(table, flat_index[:active, t - 1], out=tokens[:active, t], mode="clip")

    texts: list[bytes] = [b""] * len(indices)
    for row, j in enumerate(order):
        texts[j] = tokens[row, : sorted_lengths[row]].tobytes()
    return texts


def documents_per_batch(spec: SyntheticDataset) -> int:
    """How many documents are generated together: about 2M tokens' worth, at least one."""
    return max(1, _BATCH_TOKENS // spec.doc_tokens)


def generate_documents(spec: SyntheticDataset, indices: Sequence[int]) -> list[bytes]:
    """The texts of documents ``indices`` (any order), in batches of ``documents_per_batch``."""
    batch = documents_per_batch(spec)
    texts: list[bytes] = []
    for begin in range(0, len(indices), batch):
        texts.extend(_generate_batch(spec, indices[begin : begin + batch]))
    return texts

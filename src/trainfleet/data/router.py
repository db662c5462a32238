"""The k-means document router: sends each document to one of ``num_paths`` paths, bit for bit.

DiPaCo (Douillard et al. 2024, "DiPaCo: Distributed Path Composition") trains a mixture of
paths and routes every document to one path with k-means over document features. Workers here
re-fit the router from its ``RouterSpec`` and must reach the same ``Router.digest`` in any
process, at any thread count, on any platform; so everything is integer arithmetic: no float,
no BLAS (numpy's integer matmul is a plain exact loop), and every random choice comes from
``hashlib.shake_256``.

Features. A document (token ids, any unsigned dtype up to uint32) becomes a hashed bag of its
unigrams and bigrams in ``num_features`` buckets: a key is hashed with seeded multiply-shift
(Dietzfelbinger et al. 1997) over wrapping uint64, ``h = (m * key mod 2**64) >> 32`` with ``m``
odd, then reduced to a bucket as ``(h * num_features) >> 32`` (Lemire 2019). Counts are
normalised in fixed point, ``q = counts * SCALE // total``, so a row has entries in
``[0, SCALE]`` and an L1 norm of at most ``SCALE = 2**16``; an empty document is all zeros.

Fit. The first ``sample_documents`` documents are featurized (all-zero rows are left out).
Centroids are seeded by greedy k-means++ (Arthur & Vassilvitskii 2007): each step draws
``2 + floor(ln num_paths)`` D^2-sampled candidates and keeps the best, as scikit-learn does;
on 8 planted clusters plain k-means++ merged two of them for 69 of 200 seeds, greedy for none.
Lloyd iterations then assign each row to its nearest centroid by exact squared distance (ties
to the lowest path) and move each centroid to the floor of its members' mean; an empty cluster
keeps its centroid. If fewer than ``num_paths`` distinct non-zero rows exist, the router
degrades to ``round_robin``: document ``i`` goes to path ``i % num_paths``.

Overflow, all in int64: entries are in ``[0, 2**16]`` and ``num_features <= 2**16``, so a dot
product or squared norm is at most ``2**48`` and a distance expression at most ``2**50``. With
L1 norms at most ``2**16`` (rows, and centroids, which are floor means of rows), one squared
distance is at most ``2**33``, and a D^2 total over at most ``10**6 < 2**20`` rows below
``2**53``. Centroid sums are at most ``2**20 * 2**16 = 2**36``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from trainfleet.data.spec import RouterSpec, canonical
from trainfleet.errors import RoutingMismatch

SCALE = 2**16  # fixed-point one: a featurized row's entries sum to at most SCALE
MAX_FEATURES = 2**16  # keeps dot products within 2**48
FIT_BATCH_DOCUMENTS = 256  # documents featurized per np.bincount while fitting
CHUNK_DISTANCES = 2**20  # distance entries per chunk when assigning rows (8 MiB of int64)
_CEIL_EXP = (3, 8, 21, 55, 149, 404, 1097, 2981)  # ceil(e**n), n = 1, 2, ...
Method = Literal["kmeans", "round_robin"]
_JSON_KEYS = frozenset(
    {"spec", "fit_id", "method", "centroids", "num_sampled", "num_iterations", "digest"}
)


def _seed_bytes(seed: int) -> bytes:
    """Eight little-endian bytes, longer only for a seed >= 2**64 (so no two seeds collide)."""
    return seed.to_bytes(max(8, (seed.bit_length() + 7) // 8), "little")


def _shake_u64(tag: bytes, seed: int, count: int) -> list[int]:
    """``count`` unsigned 64-bit integers from shake_256(tag + seed bytes)."""
    stream = hashlib.shake_256(tag + _seed_bytes(seed)).digest(8 * count)
    return [int.from_bytes(stream[8 * i : 8 * i + 8], "little") for i in range(count)]


def _feature_multipliers(feature_seed: int) -> tuple[np.uint64, np.uint64]:
    unigram, bigram = _shake_u64(b"trainfleet-features\0", feature_seed, 2)
    return np.uint64(unigram | 1), np.uint64(bigram | 1)


def _bucket(keys: np.ndarray, multiplier: np.uint64, num_features: int) -> np.ndarray:
    hashed = (keys * multiplier) >> np.uint64(32)  # wraps mod 2**64 by design
    return ((hashed * np.uint64(num_features)) >> np.uint64(32)).astype(np.int64)


def featurize_batch(
    documents: Sequence[np.ndarray], num_features: int, feature_seed: int
) -> np.ndarray:
    """Fixed-point L1-normalised hashed unigram+bigram counts: an (n, num_features) int64."""
    if not 1 <= num_features <= MAX_FEATURES:
        raise ValueError(f"num_features must be in [1, {MAX_FEATURES}], got {num_features}")
    for tokens in documents:
        if tokens.ndim != 1 or tokens.dtype.kind != "u" or tokens.dtype.itemsize > 4:
            raise ValueError(
                f"a document must be a 1-D array of unsigned ints up to uint32, "
                f"got {tokens.dtype} with shape {tokens.shape}"
            )
    num_documents = len(documents)
    lengths = np.array([tokens.size for tokens in documents], dtype=np.int64)
    if num_documents == 0 or lengths.sum() == 0:
        return np.zeros((num_documents, num_features), dtype=np.int64)
    tokens = np.concatenate([t.astype(np.uint64) for t in documents])
    rows = np.repeat(np.arange(num_documents, dtype=np.int64), lengths)
    # A bigram starts at every token but the last of its document.
    starts = np.ones(tokens.size - 1, dtype=bool)
    ends = np.cumsum(lengths)[lengths > 0] - 1
    starts[ends[:-1]] = False
    unigram, bigram = _feature_multipliers(feature_seed)
    bigram_keys = (tokens[:-1][starts] << np.uint64(32)) | tokens[1:][starts]
    flat = np.concatenate(
        [
            rows * num_features + _bucket(tokens, unigram, num_features),
            rows[:-1][starts] * num_features + _bucket(bigram_keys, bigram, num_features),
        ]
    )
    counts = np.bincount(flat, minlength=num_documents * num_features).astype(np.int64)
    counts = counts.reshape(num_documents, num_features)
    totals = np.maximum(2 * lengths - 1, 1)  # n unigrams + (n - 1) bigrams
    return counts * SCALE // totals[:, None]


def featurize(tokens: np.ndarray, num_features: int, feature_seed: int) -> np.ndarray:
    """One document's features: a (num_features,) int64 row of ``featurize_batch``."""
    return featurize_batch([tokens], num_features, feature_seed)[0]


def _nearest(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid per row, exact; ties go to the lowest index.

    ``||x||^2`` is the same for every centroid, so ``||c||^2 - 2 x.c`` orders them exactly.
    Rows are taken in chunks so the distance block stays within CHUNK_DISTANCES entries.
    """
    squared_norms = np.einsum("pf,pf->p", centroids, centroids)
    nearest = np.empty(features.shape[0], dtype=np.int64)
    chunk_rows = max(1, CHUNK_DISTANCES // max(1, centroids.shape[0]))
    for start in range(0, features.shape[0], chunk_rows):
        block = features[start : start + chunk_rows]
        nearest[start : start + chunk_rows] = np.argmin(
            squared_norms - 2 * (block @ centroids.T), axis=1
        )
    return nearest


@dataclass(frozen=True, eq=False)
class Router:
    """A fitted router. Equal digests mean equal routers; ``digest`` covers every field."""

    spec: RouterSpec
    fit_id: str  # the digest of the dataset content the router was fit on
    method: Method
    centroids: np.ndarray = field(repr=False)  # int64 (num_paths or 0, num_features)
    num_sampled: int  # documents pulled from the corpus for the fit
    num_iterations: int  # Lloyd updates run (0 for round_robin)
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        rows = self.spec.num_paths if self.method == "kmeans" else 0
        expected = (rows, self.spec.num_features)
        if self.centroids.dtype.kind not in "iu" or self.centroids.shape != expected:
            raise ValueError(
                f"{self.method} centroids must be integers of shape {expected}, "
                f"got {self.centroids.dtype} {self.centroids.shape}"
            )
        if self.centroids.size and not (
            self.centroids.min() >= 0 and self.centroids.max() <= SCALE
        ):
            raise ValueError(f"centroid entries must be in [0, {SCALE}]")
        centroids = np.ascontiguousarray(self.centroids, dtype=np.int64)
        if centroids is self.centroids:
            centroids = centroids.copy()
        centroids.setflags(write=False)  # the digest is computed once, so freeze the array
        object.__setattr__(self, "centroids", centroids)
        header = {
            "spec": self.spec.model_dump(),
            "fit_id": self.fit_id,
            "method": self.method,
            "num_sampled": self.num_sampled,
            "num_iterations": self.num_iterations,
        }
        payload = canonical(header) + centroids.astype("<i8").tobytes()
        object.__setattr__(self, "digest", hashlib.sha256(payload).hexdigest())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Router) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def route(self, index: int, tokens: np.ndarray) -> int:
        """The path of document ``index`` with these tokens, in ``[0, num_paths)``."""
        if self.method == "round_robin":
            return index % self.spec.num_paths
        features = featurize(tokens, self.spec.num_features, self.spec.feature_seed)
        return int(_nearest(features[None, :], self.centroids)[0])

    def route_features(
        self, features: np.ndarray, indices: np.ndarray | Sequence[int]
    ) -> np.ndarray:
        """Paths (int64) of n featurized documents with corpus positions ``indices``."""
        index_array = np.asarray(indices, dtype=np.int64)
        if features.shape != (index_array.size, self.spec.num_features):
            raise ValueError(
                f"features must have shape ({index_array.size}, {self.spec.num_features}), "
                f"got {features.shape}"
            )
        if self.method == "round_robin":
            return index_array % self.spec.num_paths
        if features.size and not (features.min() >= 0 and features.max() <= SCALE):
            raise ValueError(f"feature entries must be in [0, {SCALE}] (use featurize)")
        return _nearest(features.astype(np.int64, copy=False), self.centroids)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: centroids as base64 of little-endian int64, plus the digest."""
        return {
            "spec": self.spec.model_dump(),
            "fit_id": self.fit_id,
            "method": self.method,
            "centroids": base64.b64encode(self.centroids.astype("<i8").tobytes()).decode(),
            "num_sampled": self.num_sampled,
            "num_iterations": self.num_iterations,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Any) -> Router:
        """Rebuild a router from ``to_json``; RoutingMismatch if malformed or if its digest lies."""
        router = _parse(data)
        if router.digest != data["digest"]:
            raise RoutingMismatch(
                f"router file is corrupt or edited: recorded digest {data['digest']}, "
                f"computed {router.digest}"
            )
        return router


def _parse(data: Any) -> Router:
    """A Router from JSON data, every problem as a RoutingMismatch naming the field."""
    if not isinstance(data, dict) or set(data) != _JSON_KEYS:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise RoutingMismatch(f"router JSON must have exactly {sorted(_JSON_KEYS)}, got {found}")
    try:
        spec = RouterSpec.model_validate(data["spec"])
    except ValidationError as error:
        raise RoutingMismatch(f"router JSON: invalid spec: {error}") from error
    for key, kind in (("fit_id", str), ("digest", str), ("centroids", str)):
        if not isinstance(data[key], kind):
            raise RoutingMismatch(f"router JSON: {key} must be a string")
    for key, bound in (
        ("num_sampled", spec.sample_documents),
        ("num_iterations", spec.max_iterations),
    ):
        value = data[key]
        if type(value) is not int or not 0 <= value <= bound:
            raise RoutingMismatch(f"router JSON: {key} must be an integer in [0, {bound}]")
    method = data["method"]
    if method not in ("kmeans", "round_robin"):
        raise RoutingMismatch(f"router JSON: unknown method {method!r}")
    try:
        raw = base64.b64decode(data["centroids"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise RoutingMismatch(f"router JSON: centroids are not base64: {error}") from error
    rows = spec.num_paths if method == "kmeans" else 0
    if len(raw) != rows * spec.num_features * 8:
        raise RoutingMismatch(
            f"router JSON: centroids hold {len(raw)} bytes, a {method} router over "
            f"{spec.num_features} features needs {rows * spec.num_features * 8}"
        )
    centroids = np.frombuffer(raw, dtype="<i8").reshape(rows, spec.num_features)
    try:
        return Router(
            spec, data["fit_id"], method, centroids, data["num_sampled"], data["num_iterations"]
        )
    except ValueError as error:
        raise RoutingMismatch(f"router JSON: {error}") from error


def _seed_centroids(features: np.ndarray, num_paths: int, seed: int) -> np.ndarray | None:
    """Greedy k-means++ seeding with exact D^2 sampling; None if under num_paths distinct rows.

    Every draw is a u64 from shake_256. The first centroid is row ``u64 % n``; each later
    step draws ``2 + floor(ln num_paths)`` candidates, each the row where the cumulative D^2
    first exceeds ``u64 % total D^2``, and keeps the one that leaves the smallest total D^2
    (the first on a tie). A chosen row has D^2 = 0, so a zero total means every row is
    already a centroid.
    """
    trials = 2 + sum(num_paths >= e for e in _CEIL_EXP)  # 2 + floor(ln k), sans float
    draws = _shake_u64(b"trainfleet-kmeans\0", seed, 1 + (num_paths - 1) * trials)
    squared_norms = np.einsum("nf,nf->n", features, features)

    def squared_distances(row: int) -> np.ndarray:
        return squared_norms - 2 * (features @ features[row]) + int(squared_norms[row])

    chosen = [draws[0] % features.shape[0]]
    nearest_d2 = squared_distances(chosen[0])
    for step in range(num_paths - 1):
        cumulative = np.cumsum(nearest_d2)
        if cumulative[-1] == 0:
            return None
        best_total, best_row, best_d2 = -1, -1, nearest_d2
        for draw in draws[1 + step * trials : 1 + (step + 1) * trials]:
            row = int(np.searchsorted(cumulative, draw % int(cumulative[-1]), side="right"))
            d2 = np.minimum(nearest_d2, squared_distances(row))
            total = int(d2.sum())
            if best_row < 0 or total < best_total:
                best_total, best_row, best_d2 = total, row, d2
        chosen.append(best_row)
        nearest_d2 = best_d2
    return features[chosen].copy()


def _lloyd(features: np.ndarray, centroids: np.ndarray, max_iterations: int) -> int:
    """Lloyd's iterations in place on ``centroids``; returns the number of updates run."""
    num_paths = centroids.shape[0]
    assignment = _nearest(features, centroids)
    for iteration in range(1, max_iterations + 1):
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, features)
        counts = np.bincount(assignment, minlength=num_paths)
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] // counts[filled, None]
        updated = _nearest(features, centroids)
        if np.array_equal(updated, assignment):
            return iteration
        assignment = updated
    return max_iterations


def fit_router(spec: RouterSpec, fit_id: str, documents: Iterable[np.ndarray]) -> Router:
    """Fit the router on the first ``spec.sample_documents`` documents (token arrays).

    Streaming: exactly that many documents are pulled from ``documents``, never one more, and
    featurized in batches, so memory is bounded by ``sample_documents * num_features * 8``
    bytes (the feature matrix; its pages are only touched as rows arrive). ``fit_id`` names
    the content fit on (the dataset digest) and enters the router's digest.
    """
    features = np.zeros((spec.sample_documents, spec.num_features), dtype=np.int64)
    num_sampled = num_rows = 0
    stream = iter(documents)
    while num_sampled < spec.sample_documents:
        size = min(FIT_BATCH_DOCUMENTS, spec.sample_documents - num_sampled)
        if not (batch := list(itertools.islice(stream, size))):
            break
        num_sampled += len(batch)
        rows = featurize_batch(batch, spec.num_features, spec.feature_seed)
        rows = rows[rows.any(axis=1)]  # an empty document says nothing about its path
        features[num_rows : num_rows + len(rows)] = rows
        num_rows += len(rows)
    sample = features[:num_rows]
    centroids = _seed_centroids(sample, spec.num_paths, spec.seed) if num_rows else None
    if centroids is None:
        empty = np.zeros((0, spec.num_features), dtype=np.int64)
        return Router(spec, fit_id, "round_robin", empty, num_sampled, 0)
    num_iterations = _lloyd(sample, centroids, spec.max_iterations)
    return Router(spec, fit_id, "kmeans", centroids, num_sampled, num_iterations)

"""The k-means router re-fits to the same digest anywhere, routes in range, and rejects edits."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainfleet.data.router import (
    SCALE,
    Router,
    featurize,
    featurize_batch,
    fit_router,
)
from trainfleet.data.spec import RouterSpec
from trainfleet.errors import RoutingMismatch

# Run in this process and in subprocesses: a small fit on seeded documents; prints the digest.
FIT_SCRIPT = """
import numpy as np
from trainfleet.data.router import fit_router
from trainfleet.data.spec import RouterSpec

rng = np.random.default_rng(7)
docs = [rng.integers(0, 300, size=int(rng.integers(0, 400)), dtype=np.uint16) for _ in range(150)]
spec = RouterSpec(num_paths=5, num_features=128, sample_documents=120, seed=3)
digest = fit_router(spec, "fit-id", docs).digest
"""
BASE_SPEC = RouterSpec(num_paths=3, num_features=64, sample_documents=120, max_iterations=25)


def planted_documents(num_ranges: int, num_documents: int, seed: int) -> list[np.ndarray]:
    """Document i uses only tokens of range i % num_ranges; ranges are disjoint."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(8 * (i % num_ranges), 8 * (i % num_ranges) + 8, size=300, dtype=np.uint32)
        for i in range(num_documents)
    ]


def random_documents(num_documents: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, size=int(rng.integers(1, 300)), dtype=np.uint8)
        for _ in range(num_documents)
    ]


@pytest.fixture(scope="module")
def kmeans_router() -> Router:
    router = fit_router(BASE_SPEC, "fit-id", random_documents(200))
    assert router.method == "kmeans"
    return router


def test_same_inputs_same_digest_and_json_round_trip(kmeans_router: Router) -> None:
    again = fit_router(BASE_SPEC, "fit-id", random_documents(200))
    assert again.digest == kmeans_router.digest
    assert np.array_equal(again.centroids, kmeans_router.centroids)
    restored = Router.from_json(kmeans_router.to_json())
    assert restored.digest == kmeans_router.digest
    assert restored == kmeans_router
    assert np.array_equal(restored.centroids, kmeans_router.centroids)
    assert kmeans_router.num_sampled == BASE_SPEC.sample_documents
    assert 1 <= kmeans_router.num_iterations <= BASE_SPEC.max_iterations


@pytest.mark.parametrize(
    "change",
    [
        {"num_paths": 4},
        {"num_features": 128},
        {"feature_seed": 1},
        {"sample_documents": 119},
        {"max_iterations": 1},
        {"seed": 1},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_spec_field_changes_the_digest(kmeans_router: Router, change: dict[str, int]) -> None:
    spec = BASE_SPEC.model_copy(update=change)
    assert fit_router(spec, "fit-id", random_documents(200)).digest != kmeans_router.digest


def test_fit_id_changes_the_digest(kmeans_router: Router) -> None:
    other = fit_router(BASE_SPEC, "other-fit-id", random_documents(200))
    assert np.array_equal(other.centroids, kmeans_router.centroids)
    assert other.digest != kmeans_router.digest


def test_edited_centroid_is_rejected(kmeans_router: Router) -> None:
    data = kmeans_router.to_json()
    centroids = kmeans_router.centroids.copy()
    centroids[1, 5] += 1
    data["centroids"] = base64.b64encode(centroids.astype("<i8").tobytes()).decode()
    with pytest.raises(RoutingMismatch, match="corrupt or edited: recorded digest"):
        Router.from_json(data)


def test_edited_spec_with_old_digest_is_rejected(kmeans_router: Router) -> None:
    data = kmeans_router.to_json()
    data["spec"] = {**data["spec"], "feature_seed": 1}
    with pytest.raises(RoutingMismatch, match=kmeans_router.digest):
        Router.from_json(data)


def _drop(key: str) -> Any:
    return lambda data: {k: v for k, v in data.items() if k != key}


def _set(key: str, value: Any) -> Any:
    return lambda data: {**data, key: value}


@pytest.mark.parametrize(
    "edit",
    [
        lambda data: [data],
        _drop("digest"),
        _drop("centroids"),
        _set("extra", 1),
        _set("spec", {"num_paths": 0}),
        _set("spec", "not a spec"),
        _set("method", "nearest"),
        _set("centroids", "not base64!"),
        _set("centroids", base64.b64encode(b"\0" * 8).decode()),
        _set("centroids", 17),
        _set("num_sampled", "120"),
        _set("num_sampled", True),
        _set("num_iterations", -1),
        _set("fit_id", None),
        _set("method", "round_robin"),
    ],
)
def test_malformed_json_is_a_routing_mismatch(kmeans_router: Router, edit: Any) -> None:
    with pytest.raises(RoutingMismatch, match="router JSON"):
        Router.from_json(edit(kmeans_router.to_json()))


def test_out_of_range_centroids_are_rejected(kmeans_router: Router) -> None:
    data = kmeans_router.to_json()
    centroids = kmeans_router.centroids.copy()
    centroids[0, 0] = SCALE + 1
    data["centroids"] = base64.b64encode(centroids.astype("<i8").tobytes()).decode()
    with pytest.raises(RoutingMismatch, match="centroid entries"):
        Router.from_json(data)


def test_digest_is_the_same_in_separate_processes_and_thread_counts() -> None:
    namespace: dict[str, Any] = {}
    exec(FIT_SCRIPT, namespace)
    script = f"import torch\ntorch.set_num_threads({{threads}})\n{FIT_SCRIPT}\nprint(digest)"
    processes = []
    for threads in (1, 2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONHASHSEED": str(threads),
        }
        command = [sys.executable, "-c", script.format(threads=threads)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == [namespace["digest"], namespace["digest"]]


@pytest.mark.parametrize(("num_ranges", "seed"), [(4, 0), (4, 1), (8, 0), (8, 1)])
def test_planted_ranges_give_pure_clusters(num_ranges: int, seed: int) -> None:
    spec = RouterSpec(
        num_paths=num_ranges, num_features=1024, sample_documents=50 * num_ranges, seed=seed
    )
    documents = planted_documents(num_ranges, 60 * num_ranges, seed)
    router = fit_router(spec, "planted", documents)
    assert router.method == "kmeans"
    paths_of_range: dict[int, set[int]] = {r: set() for r in range(num_ranges)}
    for index, tokens in enumerate(documents):
        paths_of_range[index % num_ranges].add(router.route(index, tokens))
    assert all(len(paths) == 1 for paths in paths_of_range.values()), paths_of_range
    assert set().union(*paths_of_range.values()) == set(range(num_ranges))


@pytest.mark.parametrize(
    "documents",
    [
        [],
        [np.array([1, 2, 3], dtype=np.uint8), np.array([9], dtype=np.uint8)],
        [np.array([], dtype=np.uint16)] * 10,
        [np.array([5, 6, 7], dtype=np.uint32)] * 10,
        [np.array([t], dtype=np.uint8) for t in (1, 2, 3)] + [np.array([], dtype=np.uint8)] * 5,
    ],
    ids=["empty", "fewer-than-paths", "all-empty", "one-distinct", "three-distinct-and-empties"],
)
def test_too_few_distinct_documents_degrade_to_round_robin(documents: list[np.ndarray]) -> None:
    spec = RouterSpec(num_paths=4, num_features=32)
    router = fit_router(spec, "tiny", documents)
    assert router.method == "round_robin"
    assert router.centroids.shape == (0, 32)
    assert router.num_sampled == len(documents)
    assert [router.route(i, np.array([i], dtype=np.uint8)) for i in range(10)] == [
        i % 4 for i in range(10)
    ]
    assert Router.from_json(router.to_json()) == router


def test_converged_centroids_are_the_floor_means_of_their_documents() -> None:
    documents = random_documents(200)
    spec = BASE_SPEC.model_copy(update={"num_paths": 5, "max_iterations": 1000})
    router = fit_router(spec, "fit-id", documents)
    assert 1 < router.num_iterations < spec.max_iterations
    features = featurize_batch(documents[: spec.sample_documents], 64, 0)
    paths = router.route_features(features, range(len(features)))
    for path in range(spec.num_paths):
        members = features[paths == path]
        assert len(members) > 0
        assert np.array_equal(router.centroids[path], members.sum(axis=0) // len(members))


def test_fit_pulls_only_sample_documents() -> None:
    documents = random_documents(50)

    def guarded() -> Iterator[np.ndarray]:
        for index, tokens in enumerate(documents):
            if index == 30:
                raise AssertionError("pulled past sample_documents")
            yield tokens

    router = fit_router(
        RouterSpec(num_paths=3, num_features=64, sample_documents=30), "", guarded()
    )
    assert router.num_sampled == 30
    assert router.method == "kmeans"


def test_ties_go_to_the_lowest_path() -> None:
    spec = RouterSpec(num_paths=3, num_features=16)
    centroids = np.zeros((3, 16), dtype=np.int64)
    centroids[0, 0] = SCALE  # far from everything else; paths 1 and 2 are identical
    router = Router(spec, "manual", "kmeans", centroids, num_sampled=3, num_iterations=1)
    features = np.zeros((2, 16), dtype=np.int64)
    features[1, 0] = SCALE
    assert router.route_features(features, [0, 1]).tolist() == [1, 0]


documents_strategy = st.sampled_from([np.uint8, np.uint16, np.uint32]).flatmap(
    lambda dtype: st.lists(st.integers(0, int(np.iinfo(dtype).max)), max_size=200).map(
        lambda values: np.array(values, dtype=dtype)
    )
)


@settings(max_examples=60, deadline=None)
@given(tokens=documents_strategy, index=st.integers(0, 10**9))
def test_route_is_in_range_and_matches_route_features(
    kmeans_router: Router, tokens: np.ndarray, index: int
) -> None:
    round_robin = fit_router(BASE_SPEC, "rr", [])
    for router in (kmeans_router, round_robin):
        path = router.route(index, tokens)
        assert 0 <= path < router.spec.num_paths
        features = featurize(tokens, router.spec.num_features, router.spec.feature_seed)
        assert router.route_features(features[None, :], [index]).tolist() == [path]


@settings(max_examples=60, deadline=None)
@given(documents=st.lists(documents_strategy, max_size=6), feature_seed=st.integers(0, 2**70))
def test_features_are_fixed_point_and_batch_equals_single(
    documents: list[np.ndarray], feature_seed: int
) -> None:
    batch = featurize_batch(documents, 48, feature_seed)
    assert batch.shape == (len(documents), 48)
    assert batch.dtype == np.int64
    for tokens, row in zip(documents, batch, strict=True):
        assert np.array_equal(row, featurize(tokens, 48, feature_seed))
        assert row.min() >= 0
        assert row.sum() <= SCALE
        assert (row.sum() > SCALE - 48) == (tokens.size > 0)


def test_features_see_order_and_seed() -> None:
    forward = np.array([1, 2, 3, 4], dtype=np.uint16)
    assert not np.array_equal(featurize(forward, 1024, 0), featurize(forward[::-1], 1024, 0))
    assert not np.array_equal(featurize(forward, 1024, 0), featurize(forward, 1024, 1))

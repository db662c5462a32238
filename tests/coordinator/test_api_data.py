"""The data-plane endpoints in-process: the operator publishes a document router, workers and
the operator fetch it; the coordinator stores routers but refuses ones that are not routers
or that were fit for another dataset than the path names."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from test_api import JOIN, OP, OP_TOKEN, Api, assert_error, bearer

from fleetkit import FakeClock, routed_dataset_toml
from trainfleet.data.router import Router
from trainfleet.data.verify import fit_router_for, router_fit_id
from trainfleet.errors import Unauthorized
from trainfleet.manifest import parse_manifest

DATASET = routed_dataset_toml()


@pytest.fixture(scope="module")
def router() -> dict[str, Any]:
    """A real router, fit from a tiny routed synthetic spec (milliseconds)."""
    fitted = fit_router_for(parse_manifest(DATASET).datasets["tiny"])
    assert fitted.method == "kmeans"
    return fitted.to_json()


def put(api: Api, fit_id: str, body: Any, headers: dict[str, str] = OP) -> Any:
    return api.http.put(f"/v1/routers/{fit_id}", json=body, headers=headers)


def test_operator_publishes_and_everyone_registered_reads(
    api: Api, router: dict[str, Any], clock: FakeClock
) -> None:
    fit_id = router["fit_id"]
    assert fit_id == router_fit_id(parse_manifest(DATASET).datasets["tiny"])
    r = put(api, fit_id, {"router": router})
    assert r.status_code == 200, r.text
    assert r.json() == {"fit_id": fit_id, "digest": router["digest"], "published_at": clock()}

    worker = api.register()
    for headers in (OP, worker.auth):
        r = api.http.get(f"/v1/routers/{fit_id}", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json() == router
    # The client's view: the same router for a worker, None for an unpublished fit id.
    assert api.client(worker.token).get_router(fit_id) == router
    assert api.client(OP_TOKEN).get_router("0" * 64) is None


def test_publishing_needs_the_operator_token(api: Api, router: dict[str, Any]) -> None:
    worker = api.register()
    for headers in ({}, JOIN, worker.auth, bearer("not-it")):
        assert_error(put(api, router["fit_id"], {"router": router}, headers), 401, "unauthorized")
    with pytest.raises(Unauthorized):
        api.client(worker.token).publish_router(router["fit_id"], router)
    # Nothing was stored by the refused calls.
    assert_error(api.http.get(f"/v1/routers/{router['fit_id']}", headers=OP), 404, "not_found")


def test_get_is_404_before_publish_and_401_with_the_join_token(
    api: Api, router: dict[str, Any]
) -> None:
    path = f"/v1/routers/{router['fit_id']}"
    worker = api.register()
    for headers in (OP, worker.auth):
        body = assert_error(api.http.get(path, headers=headers), 404, "not_found")
        assert router["fit_id"] in body["message"]
    assert put(api, router["fit_id"], {"router": router}).status_code == 200
    for headers in ({}, JOIN, bearer("not-it")):
        assert_error(api.http.get(path, headers=headers), 401, "unauthorized")
    assert api.http.get(path, headers=worker.auth).status_code == 200


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: {}, "router JSON must have exactly"),
        (lambda r: {**r, "extra": 1}, "router JSON must have exactly"),
        (lambda r: {**r, "spec": {"num_paths": 0}}, "invalid spec"),
        (lambda r: {**r, "centroids": "!!!"}, "not base64"),
        (lambda r: {**r, "centroids": r["centroids"][:8]}, "centroids hold"),
        (lambda r: {**r, "method": "voronoi"}, "unknown method"),
        (lambda r: {**r, "digest": "0" * 64}, "corrupt or edited"),
    ],
    ids=["empty", "extra-key", "bad-spec", "not-base64", "short", "method", "digest-lies"],
)
def test_a_malformed_router_is_a_400_naming_the_problem(
    api: Api, router: dict[str, Any], edit: Any, message: str
) -> None:
    body = assert_error(put(api, router["fit_id"], {"router": edit(router)}), 400, "bad_request")
    assert body["message"].startswith("not a valid router: ")
    assert message in body["message"]
    assert_error(api.http.get(f"/v1/routers/{router['fit_id']}", headers=OP), 404, "not_found")


@pytest.mark.parametrize(
    "body",
    [{}, {"router": "text"}, {"router": [1, 2]}, {"router": {}, "extra": 1}],
    ids=["no-router", "string", "list", "extra-field"],
)
def test_a_body_that_is_not_a_router_body_is_a_400(
    api: Api, router: dict[str, Any], body: dict[str, Any]
) -> None:
    assert_error(put(api, router["fit_id"], body), 400, "bad_request")


def test_a_router_fit_for_another_dataset_is_refused(api: Api, router: dict[str, Any]) -> None:
    other = "0" * 64
    body = assert_error(put(api, other, {"router": router}), 400, "bad_request")
    assert "does not match the path" in body["message"]
    assert router["fit_id"] in body["message"] and other in body["message"]
    assert_error(api.http.get(f"/v1/routers/{other}", headers=OP), 404, "not_found")


def test_publishing_again_replaces_the_router(api: Api, router: dict[str, Any]) -> None:
    honest = Router.from_json(router)
    centroids = np.array(honest.centroids)
    centroids[[0, 1]] = centroids[[1, 0]]
    swapped = dataclasses.replace(honest, centroids=centroids).to_json()
    assert swapped["digest"] != router["digest"]

    fit_id = router["fit_id"]
    assert put(api, fit_id, {"router": router}).status_code == 200
    r = put(api, fit_id, {"router": swapped})
    assert r.status_code == 200 and r.json()["digest"] == swapped["digest"]
    assert api.http.get(f"/v1/routers/{fit_id}", headers=OP).json() == swapped

"""Verifiable routing: a handed router is re-fit from its spec; a wrong one is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trainfleet.data.router import Router
from trainfleet.data.spec import RouterSpec, SyntheticDataset
from trainfleet.data.verify import (
    RoutingVerifier,
    check_router_claims,
    fit_router_for,
    router_fit_id,
)
from trainfleet.errors import RoutingMismatch, SourceUnavailable

SPEC = SyntheticDataset(
    name="d",
    source="synthetic",
    num_dialects=3,
    num_documents=120,
    doc_tokens=64,
    router=RouterSpec(num_paths=3, num_features=64, sample_documents=80),
)


class CountingRefit:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, spec: SyntheticDataset) -> Router:  # type: ignore[override]
        self.calls += 1
        return fit_router_for(spec)


def test_an_honest_router_is_verified_once_per_spec(tmp_path) -> None:
    honest = fit_router_for(SPEC)
    refit = CountingRefit()
    verifier = RoutingVerifier(tmp_path, refit=refit)  # type: ignore[arg-type]
    assert verifier.verify(SPEC, honest) == "verified"
    assert verifier.verify(SPEC, honest) == "already-verified"
    # A later process on the same worker finds the marker and does not re-fit either.
    later = RoutingVerifier(tmp_path, refit=refit)  # type: ignore[arg-type]
    assert later.verify(SPEC, honest) == "already-verified"
    assert refit.calls == 1


def test_tampered_centroids_are_refused_even_with_a_consistent_digest(tmp_path) -> None:
    honest = fit_router_for(SPEC)
    centroids = np.array(honest.centroids)
    centroids[[0, 1]] = centroids[[1, 0]]
    tampered = dataclasses.replace(honest, centroids=centroids)
    assert tampered.digest != honest.digest  # self-consistent, just wrong
    check_router_claims(SPEC, tampered)  # its claims are fine: only a re-fit catches it
    with pytest.raises(RoutingMismatch, match="routing verification failed"):
        RoutingVerifier(tmp_path).verify(SPEC, tampered)
    assert not list(tmp_path.iterdir())  # nothing remembered as verified


@pytest.mark.parametrize(
    "field, value",
    [
        ("feature_seed", 7),
        ("seed", 3),
        ("num_features", 32),
        ("sample_documents", 50),
        ("max_iterations", 2),
        ("num_paths", 2),
    ],
)
def test_tampering_with_any_fit_parameter_is_caught(field: str, value: int) -> None:
    """A router fit with other parameters is refused, whether or not its file was edited."""
    assert SPEC.router is not None
    other = SPEC.router.model_copy(update={field: value})
    forged = fit_router_for(SPEC.model_copy(update={"router": other}))
    # It claims the spec's fit id but other parameters: refused without a re-fit.
    relabelled = dataclasses.replace(forged, fit_id=router_fit_id(SPEC))
    with pytest.raises(RoutingMismatch, match=field):
        check_router_claims(SPEC, relabelled)
    # One that lies about its parameters too (claims the spec's) fails the re-fit, unless the
    # other parameters happened to produce the very same router (then nothing is wrong).
    honest = fit_router_for(SPEC)
    if forged.centroids.shape == honest.centroids.shape:
        lying = dataclasses.replace(forged, spec=SPEC.router, fit_id=router_fit_id(SPEC))
        if lying.digest == honest.digest:
            return
        with pytest.raises(RoutingMismatch, match="routing verification failed"):
            RoutingVerifier(None).verify(SPEC, lying)


def test_a_router_fit_on_other_data_is_refused() -> None:
    other = fit_router_for(SPEC.model_copy(update={"seed": 1}))
    with pytest.raises(RoutingMismatch, match="fit on other data"):
        check_router_claims(SPEC, other)


def test_an_unverifiable_router_is_used_with_a_warning(caplog) -> None:
    def offline(spec: SyntheticDataset) -> Router:
        raise SourceUnavailable("the hub cannot be reached")

    honest = fit_router_for(SPEC)
    verifier = RoutingVerifier(None, refit=offline)  # type: ignore[arg-type]
    assert verifier.verify(SPEC, honest) == "unverifiable"
    assert "using it unverified" in caplog.text

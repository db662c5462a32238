"""The worker's side of the private tier (``trainfleet join --enclave simulated:KEYFILE``).

Each worker process generates its own Ed25519 key and never writes it down: an attestation
is good for this process only. After registering, and again before the attestation runs out,
the worker asks the coordinator for a nonce, has its enclave quote (its public key, the
measurement of this install, the nonce), signs the nonce with its own key (proof that it
holds the quoted key) and presents all of it. A refusal is logged with its reason and the
worker goes on taking public work; it tries again after ``RETRY_S``.

Only the simulated enclave exists here (``verify.attest.SimulatedEnclave``): it proves the
protocol, not the hardware.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trainfleet.client import Client
from trainfleet.errors import ApiError, CoordinatorUnavailable
from trainfleet.verify.attest import (
    SIMULATED,
    SimulatedEnclave,
    b64encode,
    measure,
    possession_message,
    worker_config,
)

log = logging.getLogger(__name__)

RETRY_S = 60.0  # after a refusal or an unreachable coordinator, try again this much later
RENEW_BEFORE_S = 120.0  # attest again this long before the attestation ends (at most half)


class Enclave(Protocol):
    kind: str

    def quote(
        self, worker_key: str, measurement: str, nonce: str, *, now: float
    ) -> tuple[str, str]: ...


def enclave_from_spec(spec: str) -> Enclave:
    """``simulated:KEYFILE`` -> the simulated enclave with that attestation key file."""
    kind, _, rest = spec.partition(":")
    if kind != SIMULATED or not rest:
        raise ValueError(
            f"--enclave {spec!r}: the only enclave is 'simulated:KEYFILE' (a simulated"
            " attestation key from `trainfleet attest keygen DIR`)"
        )
    return SimulatedEnclave(Path(rest))


class Attester:
    """Keeps this worker attested: ``attest`` now, ``due`` when it should attest again."""

    def __init__(
        self,
        enclave: Enclave,
        *,
        measurement: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.enclave = enclave
        self._key = Ed25519PrivateKey.generate()  # per process, never stored
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.worker_key = b64encode(raw)
        self.measurement = measurement or measure(worker_config())
        self.clock = clock  # schedules the next attestation
        self.wall = wall  # dates the quote
        self._renew_at: float | None = None  # by ``clock``; None: not attested
        self.refusal: str | None = None  # the last refusal's reason

    def reset(self) -> None:
        """A new registration (a new worker id) starts unattested."""
        self._renew_at = None
        self.refusal = None

    def due(self) -> bool:
        return self._renew_at is None or self.clock() >= self._renew_at

    def attest(self, client: Client) -> bool:
        """One attestation; whether it was accepted. Never raises for a refusal or an
        unreachable coordinator: the worker keeps taking public work."""
        try:
            reply = self._attest(client)
        except ApiError as err:
            reason = str(err.details.get("reason") or err.code)
            self.refusal = reason
            self._renew_at = self.clock() + RETRY_S
            log.warning(
                "attestation refused (%s): %s; taking public work only, retrying in %.0fs",
                reason,
                err.message,
                RETRY_S,
            )
            return False
        except CoordinatorUnavailable as err:
            self._renew_at = self.clock() + RETRY_S
            log.warning("attestation not sent (%s); retrying in %.0fs", err, RETRY_S)
            return False
        expires_in = float(reply["expires_in"])
        self._renew_at = self.clock() + max(expires_in - RENEW_BEFORE_S, expires_in / 2)
        self.refusal = None
        log.info(
            "attested by the %s enclave for %.0fs (measurement %s): private work is claimable",
            self.enclave.kind,
            expires_in,
            self.measurement[:16],
        )
        return True

    def _attest(self, client: Client) -> dict[str, Any]:
        nonce = str(client.request("POST", "/v1/attest/nonce")["nonce"])
        reply: dict[str, Any] = client.request("POST", "/v1/attest", json=self.body(nonce))
        return reply

    def body(self, nonce: str) -> dict[str, str]:
        """The ``POST /v1/attest`` body for ``nonce``: the enclave's quote and signature,
        this worker's public key and its proof of possession."""
        quote, signature = self.enclave.quote(
            self.worker_key, self.measurement, nonce, now=self.wall()
        )
        return {
            "quote": quote,
            "signature": signature,
            "worker_key": self.worker_key,
            "possession": b64encode(self._key.sign(possession_message(nonce))),
        }

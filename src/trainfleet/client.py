"""HTTP client of the coordinator API, used by the worker daemon and the CLI.

Error bodies come back as the same ``ApiError`` subclasses the server raised (``StaleEpoch``,
``Unauthorized``...); an unreachable coordinator or a 5xx is ``CoordinatorUnavailable``, which
callers may retry.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from trainfleet import env
from trainfleet.errors import (
    API_ERRORS,
    ApiError,
    BadRequest,
    CoordinatorUnavailable,
    NotFound,
    UntrustedCertificate,
)

_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _untrusted(url: str, err: httpx.TransportError) -> UntrustedCertificate | None:
    """The error for a request refused because the coordinator's certificate failed
    verification (httpx wraps ``ssl.SSLCertVerificationError`` in a ``ConnectError``), or
    None for any other transport error. One line, saying what to do."""
    cause: BaseException | None = err
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            break
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, ssl.SSLCertVerificationError):
        if "CERTIFICATE_VERIFY_FAILED" not in str(err):
            return None
        why = "certificate verify failed"
    else:
        why = cause.verify_message or cause.reason or "certificate verify failed"
        if cause.verify_code in _NAME_MISMATCH:
            return UntrustedCertificate(
                "the coordinator's TLS certificate is not valid for this address: connect by"
                f" a name or IP address that the certificate lists ({url}: {why})"
            )
    return UntrustedCertificate(
        "the coordinator's TLS certificate is not trusted here: pass --ca-cert PATH (or set"
        f" {env.CA_CERT}) with the CA certificate that signed it ({url}: {why})"
    )


class EmptyReference(BadRequest, ValueError):
    """An empty job reference, refused before any request (the CLI prints it as an error)."""


def job_path(ref: str) -> str:
    """A job reference (id, id prefix or name) as one URL path segment: quoted, so a '/',
    '?', '#' or space stays part of the reference; :class:`EmptyReference` (a ValueError)
    for an empty one."""
    if not ref or not ref.strip():
        raise EmptyReference("empty job reference: give a job name, id or id prefix")
    return quote(ref, safe="")


class Client:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        ca_cert: str | Path | None = None,
    ):
        """``ca_cert``: a PEM file of the CA that signed an https coordinator's certificate
        (a self-signed certificate is its own CA); default: the system's trust store."""
        self.url = url.rstrip("/")
        self.token = token
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
        )
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout_s, transport=transport, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as err:
            untrusted = _untrusted(self.url, err)
            if untrusted is not None:
                raise untrusted from err
            raise CoordinatorUnavailable(f"cannot reach coordinator at {self.url}: {err}") from err
        return self._decode(response)

    def _decode(self, response: httpx.Response) -> Any:
        if response.status_code >= 500:
            raise CoordinatorUnavailable(
                f"coordinator error {response.status_code}: {response.text[:300]}"
            )
        if response.status_code == 204:
            return None
        try:
            data = response.json()
        except ValueError:
            data = {"message": response.text[:300]}
        if response.status_code >= 400:
            cls = API_ERRORS.get(data.get("error", ""), ApiError)
            details = {k: v for k, v in data.items() if k not in ("error", "message")}
            err = cls(data.get("message", f"HTTP {response.status_code}"), **details)
            err.status_code = response.status_code
            raise err
        return data

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Block until ``/health`` answers; ``CoordinatorUnavailable`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.request("GET", "/health")
                return
            except CoordinatorUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # worker calls -----------------------------------------------------------------------
    def register(self, capability: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/workers/register", json={"capability": capability})

    def deregister(self) -> None:
        self.request("POST", "/v1/workers/deregister")

    def claim(self) -> dict[str, Any] | None:
        return self.request("POST", "/v1/workers/claim")["claim"]

    def heartbeat(self, job_id: str, epoch: int) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/heartbeat", json={"epoch": epoch})

    def append_log(self, job_id: str, epoch: int, lines: list[str]) -> Any:
        return self.request(
            "POST", f"/v1/jobs/{job_id}/logs", json={"epoch": epoch, "lines": lines}
        )

    def upload(self, job_id: str, epoch: int, path: Path, sha256: str, name: str) -> Any:
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return self.request(
            "PUT",
            f"/v1/jobs/{job_id}/artifacts/{sha256}",
            params={"epoch": epoch, "size": size, "name": name},
            content=chunks(),
            headers={"Content-Length": str(size)},
        )

    def complete(self, job_id: str, epoch: int, result: dict[str, Any]) -> Any:
        return self.request(
            "POST", f"/v1/jobs/{job_id}/complete", json={"epoch": epoch, "result": result}
        )

    def fail(
        self, job_id: str, epoch: int, error: str, *, retryable: bool = True, release: bool = False
    ) -> Any:
        body = {"epoch": epoch, "error": error, "retryable": retryable, "release": release}
        return self.request("POST", f"/v1/jobs/{job_id}/fail", json=body)

    # operator and read calls ------------------------------------------------------------
    def reload(self, text: str, path: str, dry_run: bool = False) -> dict[str, Any]:
        body = {"text": text, "path": path, "dry_run": dry_run}
        return self.request("POST", "/v1/manifest", json=body)

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else {}
        return self.request("GET", "/v1/jobs", params=params)["jobs"]

    def job(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_path(ref)}")

    def logs(self, ref: str, after: int = 0) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_path(ref)}/logs", params={"after": after})

    def explain(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_path(ref)}/explain")

    def workers(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/workers")["workers"]

    def cancel(self, ref: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_path(ref)}/cancel")

    def requeue(self, ref: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_path(ref)}/requeue")

    # fleet identity (operator) ----------------------------------------------------------
    def enroll_host(self, name: str) -> dict[str, Any]:
        """Enroll host ``name``: ``{"host", "token"}``, the token shown this once."""
        result: dict[str, Any] = self.request("POST", f"/v1/hosts/{quote(name, safe='')}/enroll")
        return result

    def rotate_host(self, name: str, *, revoke_workers: bool = False) -> dict[str, Any]:
        body = {"revoke_workers": revoke_workers}
        result: dict[str, Any] = self.request(
            "POST", f"/v1/hosts/{quote(name, safe='')}/rotate", json=body
        )
        return result

    def revoke_host(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/hosts/{quote(name, safe='')}/revoke")
        return result

    def revoke_worker(self, worker_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/workers/{quote(worker_id, safe='')}/revoke"
        )
        return result

    def hosts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/v1/hosts")["hosts"]
        return result

    def publish_router(self, fit_id: str, router: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PUT", f"/v1/routers/{quote(fit_id, safe='')}", json={"router": router}
        )
        return result

    def get_router(self, fit_id: str) -> dict[str, Any] | None:
        """The published router for ``fit_id``, or None when none is published."""
        try:
            result: dict[str, Any] = self.request("GET", f"/v1/routers/{quote(fit_id, safe='')}")
        except NotFound:
            return None
        return result

    def download(self, sha256: str, dest: Path) -> None:
        try:
            with self._http.stream(
                "GET", f"/v1/artifacts/{quote(sha256, safe='')}", headers=self._headers()
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._decode(response)
                with dest.open("wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
        except httpx.TransportError as err:
            raise CoordinatorUnavailable(f"cannot reach coordinator at {self.url}: {err}") from err

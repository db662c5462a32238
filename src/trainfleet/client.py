"""HTTP client of the coordinator API, used by the worker daemon and the CLI.

Error bodies come back as the same ``ApiError`` subclasses the server raised (``StaleEpoch``,
``Unauthorized``...); an unreachable coordinator or a 5xx is ``CoordinatorUnavailable``, which
callers may retry.

``max_mbps`` caps the client's bulk transfers (artifact uploads, artifact and weights
downloads) to that many Mbit/s with a token bucket (:class:`TokenBucket`): a volunteer's
``trainfleet join --max-mbps N`` is a real cap on the link it shares, not a hint.
Downloads to a file are streamed to a temporary file beside it, their sha256 checked, then
renamed: a file at ``dest`` is always whole and what was asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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
    TrainfleetError,
    UntrustedCertificate,
)
from trainfleet.failover import FailoverTransport, split_urls

CHUNK_BYTES = 1 << 20  # unthrottled transfer chunk
THROTTLED_CHUNK_BYTES = 1 << 16  # under a rate cap: small chunks, so the pace is smooth
LONG_POLL_GRACE_S = 10.0  # a long-poll claim's read timeout: its wait plus this

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


class DownloadMismatch(TrainfleetError):
    """Downloaded bytes do not hash to (or are larger than) what was asked for: refused,
    nothing kept at the destination."""


class TransferAborted(TrainfleetError):
    """A download stopped half-way because its caller gave up on it; nothing was kept."""


class TokenBucket:
    """A token bucket of ``rate`` bytes/s holding at most ``burst`` bytes: ``take(n)``
    blocks until ``n`` bytes may pass, so bytes sent in any window of ``t`` seconds stay
    within ``burst + rate * t``. A take larger than the bucket goes into debt and sleeps it
    off. ``clock`` and ``sleep`` are injectable, so tests run on a fake clock."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else THROTTLED_CHUNK_BYTES)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()
        self.slept_s = 0.0  # total time spent waiting for tokens

    @classmethod
    def from_mbps(cls, mbps: float, **kw: Any) -> TokenBucket:
        """A bucket for a link of ``mbps`` megabits (10^6 bits) per second."""
        return cls(mbps * 1e6 / 8, **kw)

    def take(self, n: int) -> float:
        """Wait until ``n`` more bytes may pass; the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait_s = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.slept_s += wait_s
        if wait_s > 0:
            self._sleep(wait_s)
        return wait_s


class EmptyReference(BadRequest, ValueError):
    """An empty job reference, refused before any request (the CLI prints it as an error)."""


def job_path(ref: str) -> str:
    """A job reference (id, id prefix or name) as one URL path segment: quoted, so a '/',
    '?', '#' or space stays part of the reference; :class:`EmptyReference` (a ValueError)
    for an empty one."""
    if not ref or not ref.strip():
        raise EmptyReference("empty job reference: give a job name, id or id prefix")
    return quote(ref, safe="")


def run_path(ref: str) -> str:
    """A run reference (name or id) as one URL path segment; :class:`EmptyReference` (a
    ValueError) for an empty one."""
    if not ref or not ref.strip():
        raise EmptyReference("empty run reference: give a run name or id")
    return quote(ref, safe="")


def pipeline_path(ref: str) -> str:
    """A pipeline reference (name or id) as one URL path segment; :class:`EmptyReference`
    (a ValueError) for an empty one."""
    if not ref or not ref.strip():
        raise EmptyReference("empty pipeline reference: give a pipeline name or id")
    return quote(ref, safe="")


def market_path(ref: str, what: str) -> str:
    """A competition or submission reference as one URL path segment; :class:`EmptyReference`
    (a ValueError) for an empty one."""
    if not ref or not ref.strip():
        raise EmptyReference(f"empty {what} reference: give a {what} name or id")
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
        max_mbps: float | None = None,
        bucket: TokenBucket | None = None,
    ):
        """``ca_cert``: a PEM file of the CA that signed an https coordinator's certificate
        (a self-signed certificate is its own CA); default: the system's trust store.
        ``max_mbps`` (or a ready ``bucket``): cap on uploads and downloads, in Mbit/s.
        ``url`` may name several coordinators of one database, ``URL1,URL2``: requests go
        round-robin over them, failing over on a refused connection (``failover``)."""
        urls = split_urls(url)
        self.url = ",".join(urls)
        self.token = token
        self.ca_cert = ca_cert  # handed on to a pipeline job's process (attach.json)
        if bucket is None and max_mbps is not None:
            bucket = TokenBucket.from_mbps(max_mbps)
        self.bucket = bucket
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
        )
        if transport is None and len(urls) > 1:
            transport = FailoverTransport(urls, verify=verify)
        self._http = httpx.Client(
            base_url=urls[0], timeout=timeout_s, transport=transport, verify=verify
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
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A read on a kept-alive connection the server closed as idle just as we
                # sent (uvicorn closes them after 5 s): a GET changes nothing, so it is sent
                # once more, on a fresh connection. Anything else is reported as it is.
                if method != "GET":
                    raise
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

    def claim(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        """Claim a job; with ``wait_s``, a long poll: the coordinator waits up to that long
        for work before answering with no claim."""
        if wait_s <= 0:
            return self.request("POST", "/v1/workers/claim")["claim"]
        return self.request(
            "POST",
            "/v1/workers/claim",
            json={"wait_s": wait_s},
            timeout=wait_s + LONG_POLL_GRACE_S,
        )["claim"]

    def heartbeat(self, job_id: str, epoch: int) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/heartbeat", json={"epoch": epoch})

    def append_log(self, job_id: str, epoch: int, lines: list[str]) -> Any:
        return self.request(
            "POST", f"/v1/jobs/{job_id}/logs", json={"epoch": epoch, "lines": lines}
        )

    def _throttled(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """``chunks`` paced by the token bucket (as they are, without one)."""
        for chunk in chunks:
            if self.bucket is not None:
                self.bucket.take(len(chunk))
            yield chunk

    @property
    def _chunk_bytes(self) -> int:
        return CHUNK_BYTES if self.bucket is None else THROTTLED_CHUNK_BYTES

    def upload(self, job_id: str, epoch: int, path: Path, sha256: str, name: str) -> Any:
        size = path.stat().st_size
        chunk_bytes = self._chunk_bytes

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(chunk_bytes):
                    yield chunk

        return self.request(
            "PUT",
            f"/v1/jobs/{job_id}/artifacts/{sha256}",
            params={"epoch": epoch, "size": size, "name": name},
            content=self._throttled(chunks()),
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

    def add_job(self, text: str, path: str) -> dict[str, Any]:
        """Submit one job (``text``: manifest syntax with one ``[[jobs]]`` table) into the
        live queue: its ``JobRecord``. (Not ``submit_job``: that name is the market's.)"""
        result: dict[str, Any] = self.request("POST", "/v1/jobs", json={"text": text, "path": path})
        return result

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

    def fair_share(self) -> dict[str, Any]:
        """Fair share: ``{half_life_h, interval_s, at, submitters: [...]}``, each submitter's
        decayed usage, share, factor, level and job counts (``FairShareReport`` JSON)."""
        result: dict[str, Any] = self.request("GET", "/v1/fair-share")
        return result

    def runs(self) -> list[dict[str, Any]]:
        """Collaborative runs, oldest first (``RunRecord`` JSON)."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/runs")["runs"]
        return result

    def run(self, ref: str) -> dict[str, Any]:
        """One run by name (its newest run) or id: ``{run, rounds, contributions, same_name}``."""
        result: dict[str, Any] = self.request("GET", f"/v1/runs/{run_path(ref)}")
        return result

    def attach_pipeline(self, job_id: str, epoch: int) -> dict[str, Any]:
        """Attach a claimed producer or consumer job to its pipeline (worker auth): the
        ``PipelineAttach`` reply (secret, attempt token, spec, teacher model)."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/jobs/{job_id}/pipeline", json={"epoch": epoch}
        )
        return result

    def pipelines(self) -> list[dict[str, Any]]:
        """Pipelines, oldest first: ``[{pipeline, counts}]``."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/pipelines")["pipelines"]
        return result

    def pipeline(self, ref: str) -> dict[str, Any]:
        """One pipeline by name (its newest) or id: ``{pipeline, counts, jobs}``."""
        result: dict[str, Any] = self.request("GET", f"/v1/pipelines/{pipeline_path(ref)}")
        return result

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

    # training market (verify; coordinator.routes_market) ----------------------------------
    def upload_model(self, path: Path) -> dict[str, Any]:
        """Store a model file (safetensors) on the coordinator: ``{"sha256", "size"}``.
        Content addressed: uploading the same bytes again stores nothing new."""
        from trainfleet.artifacts import sha256_file

        sha256, size = sha256_file(path)
        chunk_bytes = self._chunk_bytes

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(chunk_bytes):
                    yield chunk

        result: dict[str, Any] = self.request(
            "PUT",
            f"/v1/market/models/{sha256}",
            params={"size": size},
            content=self._throttled(chunks()),
            headers={"Content-Length": str(size)},
        )
        return result

    def get_model(
        self,
        sha256: str,
        dest: Path,
        max_bytes: int | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> int:
        """A market model (worker auth: only one a referee job it holds names) into
        ``dest``, checked against ``sha256``; its size."""
        return self._fetch_verified(
            f"/v1/market/models/{quote(sha256, safe='')}", sha256, dest, max_bytes, give_up
        )

    def create_competition(self, spec: dict[str, Any], baseline: str) -> dict[str, Any]:
        """Create a competition from its spec and an uploaded baseline model's sha256."""
        body = {"spec": spec, "baseline": baseline}
        result: dict[str, Any] = self.request("POST", "/v1/market/competitions", json=body)
        return result

    def competitions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/v1/market/competitions")[
            "competitions"
        ]
        return result

    def competition(self, ref: str) -> dict[str, Any]:
        """One competition (by name or id) with its submissions and balances."""
        result: dict[str, Any] = self.request(
            "GET", f"/v1/market/competitions/{market_path(ref, 'competition')}"
        )
        return result

    def submit(self, competition: str, sha256: str, claim: float) -> dict[str, Any]:
        """Submit an uploaded model with its claimed held-out loss: the submission."""
        return self._submit(competition, {"sha256": sha256, "claim": claim})

    def submit_job(self, competition: str, job: str, claim: float) -> dict[str, Any]:
        """Submit the model a completed gpt train job wrote (operator only; its producer is
        the job's host): the submission."""
        return self._submit(competition, {"job": job, "claim": claim})

    def submit_run(self, competition: str, run: str, round: int, claim: float) -> dict[str, Any]:
        """Submit a run's global weights at the start of ``round`` (operator only; one past
        the last round: the final weights): the submission."""
        return self._submit(competition, {"run": run, "round": round, "claim": claim})

    def _submit(self, competition: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST",
            f"/v1/market/competitions/{market_path(competition, 'competition')}/submissions",
            json=body,
        )
        return result

    def leaderboard(self, competition: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET",
            f"/v1/market/competitions/{market_path(competition, 'competition')}/leaderboard",
        )
        return result

    def submission(self, ref: str) -> dict[str, Any]:
        """One submission with its referees' reports."""
        result: dict[str, Any] = self.request(
            "GET", f"/v1/market/submissions/{market_path(ref, 'submission')}"
        )
        return result

    def market_ledger(self, competition: str | None = None) -> dict[str, Any]:
        """The market ledger (every payment, oldest first) and the balances derived from it."""
        params = {"competition": competition} if competition else {}
        result: dict[str, Any] = self.request("GET", "/v1/market/ledger", params=params)
        return result

    def _stream(self, path: str) -> Iterator[bytes]:
        """The body of ``GET path``, chunk by chunk, paced by the token bucket."""
        try:
            with self._http.stream("GET", path, headers=self._headers()) as response:
                if response.status_code >= 400:
                    response.read()
                    self._decode(response)
                yield from self._throttled(response.iter_bytes(self._chunk_bytes))
        except httpx.TransportError as err:
            untrusted = _untrusted(self.url, err)
            if untrusted is not None:
                raise untrusted from err
            raise CoordinatorUnavailable(f"cannot reach coordinator at {self.url}: {err}") from err

    def download(self, sha256: str, dest: Path, max_bytes: int | None = None) -> int:
        """An artifact (read auth) into ``dest``, checked against ``sha256``; its size."""
        return self._fetch_verified(
            f"/v1/artifacts/{quote(sha256, safe='')}", sha256, dest, max_bytes
        )

    def get_weights(
        self,
        sha256: str,
        dest: Path,
        max_bytes: int | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> int:
        """A run's global weights (worker auth) into ``dest``, checked; their size.
        ``give_up()`` is asked between chunks: True stops with ``TransferAborted``."""
        return self._fetch_verified(
            f"/v1/weights/{quote(sha256, safe='')}", sha256, dest, max_bytes, give_up
        )

    def _fetch_verified(
        self,
        path: str,
        sha256: str,
        dest: Path,
        max_bytes: int | None,
        give_up: Callable[[], bool] | None = None,
    ) -> int:
        """Stream ``GET path`` into a temporary file beside ``dest``, hash it as it comes,
        and rename it to ``dest`` only when it is exactly ``sha256`` (``DownloadMismatch``
        otherwise, and as soon as it passes ``max_bytes``)."""
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                for chunk in self._stream(path):
                    if give_up is not None and give_up():
                        raise TransferAborted(f"{path}: download abandoned after {size} bytes")
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise DownloadMismatch(
                            f"{path}: more than the {max_bytes} bytes expected; refused"
                        )
                    digest.update(chunk)
                    f.write(chunk)
            got = digest.hexdigest()
            if got != sha256:
                raise DownloadMismatch(
                    f"{path}: the {size} bytes received hash to {got}, not {sha256}; refused"
                )
            os.replace(tmp, dest)
            return size
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

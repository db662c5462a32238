"""The HTTP data plane: a producer serves its feature store; consumers get from it.

A producer job that keeps its samples in its own memory (an :class:`InProcessStore`) runs a
:class:`FeatureServer` beside it: a small Starlette app under uvicorn in a background thread.
Consumers on other hosts reach it through :class:`HttpStore`, a :class:`FeatureStore` whose
``get`` / ``release`` / ``retain`` are requests to that server; only the producer puts and
aborts (its own store object). Endpoints (all ``POST`` bodies are one ``SampleRef`` as JSON,
at most ``MAX_REF_BYTES``):

- ``POST /v1/get``: the sample's encoded bytes (safetensors), ``application/octet-stream``;
- ``POST /v1/release``: ``{"freed": bool}``; ``POST /v1/retain``: ``{"ok": true}``;
- ``GET /health``: ``{"ok": true, "address": ..., "stats": StoreStats}``.

Every request carries ``Authorization: Bearer <pipeline secret hex>``, compared in constant
time; without it the reply is 401. Refusals are JSON ``{"error": code, "message", "reason"}``
with ``code`` a ``FeatureError`` class's (``errors.FEATURE_ERRORS``), so the client raises
the same class the store did: 410 gone, 409 stale generation, 422 bad ref or hash mismatch,
400 malformed, 413 too large, 503 store closed. Bad input never gets a 500.

The client trusts nothing it receives: it checks the ref's MAC before asking, reads at most
``ref.size`` bytes, and hashes what arrived against ``ref.digest`` (BLAKE3; a server that
lies, or a corrupted transfer, raises :class:`HashMismatch`). The server checks the MAC, the
store, the generation and the tombstone, and the size (``GuardedStore.read_encoded`` with
``verify=False``), but leaves the digest to the client: one hash per transfer, on the side
that must trust it. Connection failures raise
:class:`StoreUnavailable` (the producer is gone: the control plane re-produces the sample).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
import torch
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trainfleet.errors import (
    FEATURE_ERRORS,
    BadRef,
    FeatureAuthError,
    FeatureError,
    HashMismatch,
    SampleGone,
    StaleGeneration,
    StoreUnavailable,
)
from trainfleet.features.ref import SampleRef, content_hasher, decode_tensors, verify_ref
from trainfleet.features.store import FeatureStore, GuardedStore, StoreStats

log = logging.getLogger(__name__)

MAX_REF_BYTES = 4096  # a request body: one SampleRef's JSON is ~600 bytes
MAX_REPLY_BYTES = 64 * 1024  # a JSON reply (refusal, release, health) read by the client
DEFAULT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5
READ_ONLY_PATHS = frozenset({"/v1/get", "/health"})

# The status each refusal is sent with; a class not here (the base) is a 400.
STATUS: dict[type[FeatureError], int] = {
    SampleGone: 410,
    StaleGeneration: 409,
    BadRef: 422,
    HashMismatch: 422,
    FeatureAuthError: 401,
    StoreUnavailable: 503,
}


def bearer(secret: bytes) -> str:
    """The ``Authorization`` header value for ``secret``."""
    return f"Bearer {secret.hex()}"


def _refusal(status: int, code: str, message: str, reason: str = "") -> JSONResponse:
    return JSONResponse(
        {"error": code, "message": message, "reason": reason or code}, status_code=status
    )


def _feature_refusal(err: FeatureError) -> JSONResponse:
    status = next((s for cls, s in STATUS.items() if isinstance(err, cls)), 400)
    return _refusal(status, err.code, err.message, err.reason)


async def _read_bounded(request: Request, limit: int) -> bytes | None:
    """The body, or None once its declared or received length passes ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(store: GuardedStore, secret: bytes) -> Starlette:
    """The data-plane app serving ``store`` to callers that hold ``secret``."""
    expected = bearer(secret).encode()

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        # As bytes: compare_digest refuses non-ASCII str, and headers arrive as latin-1.
        return hmac.compare_digest(given.encode("latin-1"), expected)

    async def ref_call(request: Request) -> SampleRef | Response:
        if not authorized(request):
            return _refusal(401, FeatureAuthError.code, "missing or wrong pipeline secret")
        body = await _read_bounded(request, MAX_REF_BYTES)
        if body is None:
            return _refusal(413, "payload_too_large", f"a ref is at most {MAX_REF_BYTES} bytes")
        try:
            return SampleRef.model_validate_json(body)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in e.errors()[:5]
            )
            return _refusal(400, "bad_request", f"not a SampleRef: {problems}")

    async def get(request: Request) -> Response:
        ref = await ref_call(request)
        if isinstance(ref, Response):
            return ref
        try:
            # The client hashes what it receives; a get served counts in the producer's
            # stats like a local one.
            data = await asyncio.to_thread(store.read_encoded, ref, verify=False)
        except FeatureError as e:
            return _feature_refusal(e)
        body = data if isinstance(data, bytes) else memoryview(data)
        return Response(body, media_type="application/octet-stream")

    async def release(request: Request) -> Response:
        ref = await ref_call(request)
        if isinstance(ref, Response):
            return ref
        try:
            freed = await asyncio.to_thread(store.release, ref)
        except FeatureError as e:
            return _feature_refusal(e)
        return JSONResponse({"freed": freed})

    async def retain(request: Request) -> Response:
        ref = await ref_call(request)
        if isinstance(ref, Response):
            return ref
        try:
            await asyncio.to_thread(store.retain, ref)
        except FeatureError as e:
            return _feature_refusal(e)
        return JSONResponse({"ok": True})

    async def health(request: Request) -> Response:
        if not authorized(request):
            return _refusal(401, FeatureAuthError.code, "missing or wrong pipeline secret")
        stats = await asyncio.to_thread(store.stats)
        return JSONResponse({"ok": True, "address": store.address, "stats": stats.model_dump()})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _refusal(404, "not_found", f"no route {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return _refusal(405, "method_not_allowed", f"{request.method} {request.url.path}")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("feature server: internal error", exc_info=exc)
        return _refusal(500, "internal", "internal error; see the producer's log")

    return Starlette(
        routes=[
            Route("/v1/get", get, methods=["POST"]),
            Route("/v1/release", release, methods=["POST"]),
            Route("/v1/retain", retain, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, Exception: server_error},
    )


class ThreadedServer:
    """An ASGI app under uvicorn in a daemon thread, on a socket bound before it starts (so
    port 0 gets its real port at once). ``start()`` returns once uvicorn listens."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "http"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.host = host
        self.port = int(sock.getsockname()[1])
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=STOP_TIMEOUT_S,  # a stalled download ends stop()
            )
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name=name, daemon=True
        )

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        ready = threading.Event()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise StoreUnavailable(f"the {self._thread.name} server did not start")
            ready.wait(0.005)

    def stop(self, timeout_s: float = 2 * STOP_TIMEOUT_S) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        self.sock.close()


class FeatureServer:
    """Serves ``store`` (a producer's own store) over HTTP to holders of ``secret``.

    ``start()`` binds and listens, and sets ``store.address`` to :attr:`address` (refs the
    store signs from then on name the server), so start it before the first put.
    ``advertise`` is the host consumers reach it at, when that is not the bind host (a
    server bound to 0.0.0.0)."""

    def __init__(
        self,
        store: FeatureStore,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise: str | None = None,
    ):
        if not isinstance(store, GuardedStore):
            raise TypeError("FeatureServer serves a GuardedStore (InProcessStore, SharedDirStore)")
        if not secret:
            raise FeatureAuthError("a feature server needs a non-empty pipeline secret")
        self.store = store
        self.secret = bytes(secret)
        self.host, self.port = host, port
        self.advertise = advertise
        self.address = ""
        self._server: ThreadedServer | None = None

    def start(self) -> FeatureServer:
        if self._server is not None:
            raise RuntimeError("the feature server is already started")
        server = ThreadedServer(
            create_app(self.store, self.secret), self.host, self.port, name="feature-server"
        )
        shown = self.advertise or self.host
        shown = f"[{shown}]" if ":" in shown else shown
        self.port = server.port
        self.address = f"http://{shown}:{server.port}"
        self.store.address = self.address
        server.start()
        self._server = server
        log.info("feature server on %s", self.address)
        return self

    def stop(self) -> None:
        """Stop serving (requests in flight finish first). The store stays open."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> FeatureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HttpStore(FeatureStore):
    """The consumer's view of a producer's :class:`FeatureServer` at ``address``: ``get``,
    ``release`` and ``retain`` are requests; ``put`` and ``abort`` are the producer's alone
    and raise. ``ca``: a CA bundle for an https server."""

    def __init__(
        self,
        address: str,
        secret: bytes,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ca: str | None = None,
    ):
        if not secret:
            raise FeatureAuthError("an HTTP feature store needs a non-empty pipeline secret")
        self.address = address.rstrip("/")
        self._secret = bytes(secret)
        self._client = httpx.Client(
            base_url=self.address,
            timeout=httpx.Timeout(timeout_s),
            verify=ssl.create_default_context(cafile=ca) if ca else True,
            headers={"authorization": bearer(self._secret), "accept-encoding": "identity"},
        )
        self._lock = threading.Lock()
        self._closed = False
        self._gets = self._released = 0

    def __enter__(self) -> HttpStore:
        return self

    # --- what a consumer does --------------------------------------------------------------

    def get(self, ref: SampleRef, *, clone: bool = True) -> dict[str, torch.Tensor]:
        # The tensors are views of a buffer this call allocated: nothing else holds it.
        self._check(ref)
        data = bytearray(ref.size)
        digest = content_hasher()  # hashed as it arrives, while the server still sends
        received = 0
        with self._call("POST", "/v1/get", ref) as reply:
            declared = reply.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) != ref.size:
                raise HashMismatch(
                    f"{ref.key}: the server sends {declared} bytes, the ref says {ref.size}",
                    reason="size",
                )
            view = memoryview(data)
            try:
                for chunk in reply.iter_raw():
                    end = received + len(chunk)
                    if end > ref.size:
                        raise HashMismatch(
                            f"{ref.key}: the server sent more than the ref's {ref.size} bytes",
                            reason="size",
                        )
                    view[received:end] = chunk
                    digest.update(chunk)
                    received = end
            except httpx.TransportError as e:
                raise self._unavailable(e) from e
        if received != ref.size:
            raise HashMismatch(
                f"{ref.key}: received {received} bytes, the ref says {ref.size}", reason="size"
            )
        if digest.hexdigest() != ref.digest:
            raise HashMismatch(
                f"{ref.key}: bytes received do not hash to the ref's digest", reason="digest"
            )
        tensors = decode_tensors(data)
        with self._lock:
            self._gets += 1
        return tensors

    def release(self, ref: SampleRef) -> bool:
        self._check(ref)
        with self._call("POST", "/v1/release", ref) as reply:
            freed = bool(self._json(reply).get("freed"))
        if freed:
            with self._lock:
                self._released += 1
        return freed

    def retain(self, ref: SampleRef) -> None:
        self._check(ref)
        with self._call("POST", "/v1/retain", ref) as reply:
            self._json(reply)

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` reply (its store's stats)."""
        with self._call("GET", "/health", None) as reply:
            return self._json(reply)

    # --- what only the producer does -------------------------------------------------------

    def put(
        self,
        sample_id: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        key: str | None = None,
        holders: int = 1,
        wait_s: float | None = None,
    ) -> SampleRef:
        raise FeatureError(
            f"{self.address}: an HTTP feature store is read-only; only the producer puts, "
            "into its own store",
            reason="read_only",
        )

    def abort(self, ref: SampleRef) -> None:
        raise FeatureError(
            f"{self.address}: an HTTP feature store is read-only; only the producer aborts, "
            "in its own store",
            reason="read_only",
        )

    def collect(self, now: float | None = None) -> int:
        return 0  # a consumer holds nothing: the producer's store collects

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                held_refs=0,
                held_bytes=0,
                high_watermark_bytes=None,
                low_watermark_bytes=None,
                puts=0,
                gets=self._gets,
                released=self._released,
                aborted=0,
                collected=0,
                waited_s=0.0,
            )

    def close(self) -> None:
        self._closed = True
        self._client.close()

    # --- plumbing ----------------------------------------------------------------------

    def _check(self, ref: SampleRef) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self.address}: the store is closed", reason="closed")
        verify_ref(ref, self._secret)
        if ref.store != self.address:
            raise BadRef(
                f"sample {ref.sample_id}: ref names store {ref.store}, this is {self.address}",
                reason="other_store",
            )

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"{self.address}: {type(e).__name__}: {e}", reason="unreachable")

    def _call(self, method: str, path: str, ref: SampleRef | None) -> _Reply:
        """Send the request; a 200 reply, unread, else raise what the refusal says."""
        body = None if ref is None else ref.model_dump_json().encode()
        request = self._client.build_request(
            method,
            path,
            content=body,
            headers=None if body is None else {"content-type": "application/json"},
        )
        try:
            try:
                reply = self._client.send(request, stream=True)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A kept-alive connection the server closed as idle just as we sent: a get
                # changes nothing, so it is sent once more on a fresh connection; a release
                # or retain might have counted, so it is not.
                if path not in READ_ONLY_PATHS:
                    raise
                reply = self._client.send(request, stream=True)
        except httpx.TransportError as e:
            raise self._unavailable(e) from e
        if reply.status_code != 200:
            try:
                raw = self._read_small(reply)
            finally:
                reply.close()
            raise self._refused(reply.status_code, raw)
        return _Reply(reply)

    def _read_small(self, reply: httpx.Response) -> bytes:
        """A JSON reply's body, at most ``MAX_REPLY_BYTES`` (the rest is not read)."""
        chunks: list[bytes] = []
        received = 0
        try:
            for chunk in reply.iter_raw():
                chunks.append(chunk)
                received += len(chunk)
                if received >= MAX_REPLY_BYTES:
                    break
        except httpx.TransportError as e:
            raise self._unavailable(e) from e
        return b"".join(chunks)[:MAX_REPLY_BYTES]

    def _refused(self, status: int, raw: bytes) -> FeatureError:
        """The FeatureError a non-200 reply stands for (the class the server's store
        raised, by its code)."""
        try:
            body = json.loads(raw)
            code, message = str(body["error"]), str(body["message"])
            reason = str(body.get("reason") or code)
        except (ValueError, KeyError, TypeError):
            body, code, message, reason = None, "", raw[:200].decode(errors="replace"), ""
        cls = FEATURE_ERRORS.get(code)
        if cls is None:
            cls = StoreUnavailable if status >= 500 else FeatureError
            reason = reason or f"http_{status}"
        return cls(f"{self.address}: HTTP {status}: {message}", reason=reason)

    def _json(self, reply: httpx.Response) -> dict[str, Any]:
        try:
            body = json.loads(self._read_small(reply))
        except ValueError as e:
            raise StoreUnavailable(
                f"{self.address}: not a feature server (reply is not JSON)", reason="bad_reply"
            ) from e
        if not isinstance(body, dict):
            raise StoreUnavailable(
                f"{self.address}: unexpected reply {body!r}"[:300], reason="bad_reply"
            )
        return body


class _Reply:
    """A reply used as a context manager that always closes its connection's stream."""

    def __init__(self, reply: httpx.Response):
        self.reply = reply

    def __enter__(self) -> httpx.Response:
        return self.reply

    def __exit__(self, *exc: object) -> None:
        self.reply.close()

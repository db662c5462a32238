"""Several coordinators behind one client: round-robin per request, failover on a refused
connection.

Coordinators that share one PostgreSQL database are interchangeable: any of them answers any
request (the database decides, and every state change re-checks its precondition in a
transaction). So a worker given ``trainfleet join URL1,URL2`` needs no load balancer: its
:class:`~trainfleet.client.Client` sends each request to the next coordinator in turn through
:class:`FailoverTransport`, an httpx transport that rewrites the request's address.

Only a request that never reached a coordinator (the connection was refused or timed out
while connecting) is sent on to the next one in the same call: nothing was sent, so even an
upload or a completion may go again. A request that broke after it was sent is the caller's
to retry (the worker retries every unreachable call with backoff), and its retry goes to the
next coordinator anyway. A coordinator that refused a connection is tried last for
``down_s`` seconds, so a dead one costs one failed connect per ``down_s``, not one per
request.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence

import httpx

__all__ = ["FailoverTransport", "split_urls"]

DOWN_S = 5.0  # a coordinator that refused a connection goes to the back of the line this long
_NOT_REACHED = (httpx.ConnectError, httpx.ConnectTimeout)


def split_urls(text: str) -> list[str]:
    """``"URL1,URL2"`` (spaces allowed) as a list of URLs without a trailing '/'; a single
    URL as a list of one. Empty entries are dropped."""
    urls = [part.strip().rstrip("/") for part in text.split(",")]
    return [url for url in urls if url] or [text.strip().rstrip("/")]


class FailoverTransport(httpx.BaseTransport):
    """Sends each request to the next of ``urls`` in turn; on a connection that could not be
    made, to the one after, until each was tried once (then the last error is raised).

    The client's ``base_url`` must be ``urls[0]``: a request's path below it is moved under
    the chosen coordinator's URL (so coordinators behind different path prefixes work too),
    and its Host header follows."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        verify: ssl.SSLContext | bool = True,
        transports: Sequence[httpx.BaseTransport] | None = None,
        down_s: float = DOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("no coordinator URL")
        self.urls = [httpx.URL(url.rstrip("/")) for url in urls]
        self._transports: list[httpx.BaseTransport] = (
            list(transports)
            if transports is not None
            else [httpx.HTTPTransport(verify=verify) for _ in self.urls]
        )
        if len(self._transports) != len(self.urls):
            raise ValueError("one transport per URL")
        self.down_s = down_s
        self._clock = clock
        self._lock = threading.Lock()
        self._turn = 0
        self._down_until = [0.0] * len(self.urls)

    def order(self) -> list[int]:
        """The coordinators to try for the next request, by index: the next in turn first,
        any marked down at the back."""
        with self._lock:
            start = self._turn
            self._turn = (self._turn + 1) % len(self.urls)
            now = self._clock()
            turn = [(start + k) % len(self.urls) for k in range(len(self.urls))]
            return [i for i in turn if self._down_until[i] <= now] + [
                i for i in turn if self._down_until[i] > now
            ]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        original = request.url
        relative = _below(original.raw_path, self.urls[0].raw_path)
        error: Exception | None = None
        for i in self.order():
            target = self.urls[i]
            request.url = original.copy_with(
                scheme=target.scheme,
                host=target.host,
                port=target.port,
                raw_path=target.raw_path.rstrip(b"/") + relative,
            )
            request.headers["Host"] = target.netloc.decode("ascii")
            try:
                response = self._transports[i].handle_request(request)
            except _NOT_REACHED as err:
                error = err
                with self._lock:
                    self._down_until[i] = self._clock() + self.down_s
                continue
            with self._lock:
                self._down_until[i] = 0.0
            return response
        assert error is not None
        raise error

    def close(self) -> None:
        for transport in self._transports:
            transport.close()


def _below(raw_path: bytes, prefix: bytes) -> bytes:
    """``raw_path`` (path and query) with the base URL's path ``prefix`` taken off its front."""
    prefix = prefix.rstrip(b"/")
    if prefix and raw_path.startswith(prefix):
        return raw_path[len(prefix) :]
    return raw_path

"""A fault-injecting HTTP/1.1 proxy between one worker and the coordinator.

Each worker of a :class:`~trainfleet.testing.LiveFleet` talks to the coordinator through its
own ``FaultProxy``, so a test can break that one worker's link at a named point:

- ``drop_reply(method, path_regex)``: forward the request, read the whole response (the
  coordinator has committed), then close the worker's connection without sending it. The
  worker sees a transport error (httpx ``RemoteProtocolError``: server disconnected).
- ``delay(method, path_regex, seconds)``: hold the request that long before forwarding it.
- ``partition()`` / ``heal()``: while partitioned, every open connection is reset and every
  new one is accepted and reset at once (``SO_LINGER`` 0), so the worker's next request fails
  promptly with an httpx ``ConnectError``/``ReadError``/``RemoteProtocolError`` (all
  ``httpx.TransportError``: "coordinator unreachable") instead of hanging until a timeout.

Everything that passed through is recorded as :class:`Exchange` rows; ``wait_for`` blocks on
a condition variable until a matching exchange happened, so tests never sleep.

The proxy parses just enough HTTP/1.1 to find request boundaries on a keep-alive connection:
``Content-Length`` and ``chunked`` bodies both ways, and close-delimited responses. Request
bodies stream through; each reply is read whole before it is passed on (or withheld). Each
request gets a fresh connection to the coordinator. Plain HTTP only (no TLS). It runs on a
private asyncio event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Exchange", "FaultProxy"]

_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Exchange:
    """One request that reached the proxy, and what became of it."""

    method: str
    path: str  # without the query string
    status: int | None  # the coordinator's status; None if it never answered
    fault: str | None = None  # "dropped" (reply withheld), "delayed", or None
    at_s: float = field(default_factory=time.monotonic)


@dataclass
class _Rule:
    kind: str  # "drop" or "delay"
    method: str
    pattern: re.Pattern[str]
    times: int  # how many more requests it applies to; < 0: every one
    seconds: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times != 0
            and self.method in (method, "*")
            and self.pattern.search(path) is not None
        )


class _Closed(Exception):
    """The peer closed the connection between or inside messages."""


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``upstream_url`` (``http://host:port``), with faults."""

    def __init__(self, upstream_url: str) -> None:
        host_port = upstream_url.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        self._upstream = (host, int(port))
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rules: list[_Rule] = []
        self._partitioned = False
        self.exchanges: list[Exchange] = []  # finished: the coordinator answered (or not)
        self.arrivals: list[Exchange] = []  # every request as it arrives, before any fault
        self.refused_connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._closing = asyncio.Event()  # set at close: cuts delays short
        self._server: asyncio.base_events.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="fault-proxy", daemon=True
        )
        self._thread.start()
        if not started.wait(30) or self._server is None:
            raise RuntimeError("the fault proxy did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url: str = f"http://127.0.0.1:{self.port}"

    # -- faults -------------------------------------------------------------------------
    def drop_reply(self, method: str, path_regex: str, times: int = 1) -> None:
        """Forward matching requests, let the coordinator commit, withhold its reply."""
        self._add(_Rule("drop", method.upper(), re.compile(path_regex), times))

    def delay(self, method: str, path_regex: str, seconds: float, times: int = 1) -> None:
        """Hold matching requests ``seconds`` before forwarding them."""
        self._add(_Rule("delay", method.upper(), re.compile(path_regex), times, seconds))

    def clear(self) -> None:
        """Forget every pending drop/delay rule (a partition stays until ``heal``)."""
        with self._lock:
            self._rules.clear()

    def partition(self) -> None:
        """Cut this worker off: reset open connections and refuse new ones until ``heal``."""
        with self._lock:
            self._partitioned = True
        self._loop.call_soon_threadsafe(self._reset_all)

    def heal(self) -> None:
        with self._lock:
            self._partitioned = False

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _take(self, kind: str, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.kind == kind and rule.matches(method, path):
                    rule.times -= 1
                    return rule
        return None

    # -- observation --------------------------------------------------------------------
    def seen(
        self, method: str = "*", path_regex: str = "", fault: str | None = None
    ) -> list[Exchange]:
        """Exchanges so far that match (``fault``: only those with that fault)."""
        with self._lock:
            return _matching(self.exchanges, method, path_regex, fault)

    def wait_for(
        self,
        method: str,
        path_regex: str,
        timeout_s: float = 30.0,
        *,
        count: int = 1,
        fault: str | None = None,
    ) -> Exchange:
        """Block until ``count`` matching exchanges happened in all; return the last one."""
        return self._wait(self.exchanges, method, path_regex, timeout_s, count, fault)

    def arrived(
        self, method: str = "*", path_regex: str = "", fault: str | None = None
    ) -> list[Exchange]:
        """Requests that reached the proxy so far (``fault="delayed"``: those held)."""
        with self._lock:
            return _matching(self.arrivals, method, path_regex, fault)

    def wait_arrival(
        self,
        method: str,
        path_regex: str,
        timeout_s: float = 30.0,
        *,
        count: int = 1,
        fault: str | None = None,
    ) -> Exchange:
        """Block until ``count`` matching requests reached the proxy in all (``fault=
        "delayed"``: count only those a ``delay`` now holds); return the last one."""
        return self._wait(self.arrivals, method, path_regex, timeout_s, count, fault)

    def _wait(
        self,
        rows: list[Exchange],
        method: str,
        path_regex: str,
        timeout_s: float,
        count: int,
        fault: str | None,
    ) -> Exchange:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = _matching(rows, method, path_regex, fault)
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout_s:.0f}s waiting for {count}x {method} "
                        f"{path_regex!r} (fault={fault}); saw {len(found)}"
                    )
                self._changed.wait(left)

    def _record(self, exchange: Exchange, rows: list[Exchange] | None = None) -> None:
        with self._changed:
            (self.exchanges if rows is None else rows).append(exchange)
            self._changed.notify_all()

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    async def _shutdown(self) -> None:
        """Stop accepting, reset every connection, and let the relays finish by themselves
        (cancelling a stream handler task makes asyncio log a spurious error)."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
        self._reset_all()
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        started.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._reset_all()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()

    # -- the relay ----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._partitioned:
            with self._lock:
                self.refused_connections += 1
            _reset(writer)
            return
        self._writers.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while not self._partitioned:
                try:
                    head = await _read_head(reader)
                except _Closed:
                    return
                method, target, _ = head[0].split(" ", 2)
                path = target.split("?", 1)[0]
                delayed = self._take("delay", method, path)
                arrival = Exchange(method, path, None, "delayed" if delayed else None)
                self._record(arrival, self.arrivals)
                if delayed is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), delayed.seconds)
                if self._partitioned:
                    self._record(Exchange(method, path, None, "partitioned"))
                    return
                # A fresh upstream connection per request: one kept idle through a delay
                # could be closed by the server's keep-alive timeout, a fault nobody asked for.
                upstream = await asyncio.open_connection(*self._upstream)
                up_reader, up_writer = upstream
                self._writers.add(up_writer)
                up_writer.write(_encode_head(head))
                await _relay_body(reader, up_writer, _headers(head))
                await up_writer.drain()
                reply_head = await _read_head(up_reader)
                body = await _read_reply_body(up_reader, reply_head, method)
                status = int(reply_head[0].split(" ", 2)[1])
                self._writers.discard(up_writer)
                up_writer.close()
                upstream = None
                if self._take("drop", method, path) is not None:
                    self._record(Exchange(method, path, status, "dropped"))
                    return  # the server committed; the worker never hears of it
                # Recorded before the reply leaves, so a client that has its answer always
                # finds the exchange already in the record.
                self._record(Exchange(method, path, status, "delayed" if delayed else None))
                writer.write(_encode_head(reply_head) + body)
                await writer.drain()
                if _headers(reply_head).get("connection", "").lower() == "close":
                    return
        except (_Closed, ConnectionError, OSError, ValueError, IndexError):
            return
        finally:
            self._writers.discard(writer)
            _reset(writer)
            if upstream is not None:
                self._writers.discard(upstream[1])
                upstream[1].close()


def _matching(
    rows: list[Exchange], method: str, path_regex: str, fault: str | None
) -> list[Exchange]:
    pattern = re.compile(path_regex)
    return [
        e
        for e in rows
        if method.upper() in (e.method, "*")
        and pattern.search(e.path)
        and (fault is None or e.fault == fault)
    ]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, so the peer's next read or write fails at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> list[str]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as err:
        raise _Closed from err
    if len(raw) > _MAX_HEAD_BYTES:
        raise _Closed
    return raw.decode("latin-1").split("\r\n")[:-2]


def _encode_head(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _headers(head: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    return out


async def _relay_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]
) -> None:
    """Copy one request body from ``reader`` to ``writer`` as it arrives."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        writer.write(await _read_chunked(reader))
        return
    left = int(headers.get("content-length", "0"))
    while left > 0:
        piece = await reader.read(min(left, 1 << 16))
        if not piece:
            raise _Closed
        writer.write(piece)
        left -= len(piece)
        await writer.drain()


async def _read_reply_body(reader: asyncio.StreamReader, head: list[str], method: str) -> bytes:
    status = int(head[0].split(" ", 2)[1])
    headers = _headers(head)
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    if "content-length" in headers:
        try:
            return await reader.readexactly(int(headers["content-length"]))
        except asyncio.IncompleteReadError as err:
            raise _Closed from err
    return await reader.read()  # close-delimited


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Read a chunked body and return it still chunk-framed (to forward verbatim)."""
    out = bytearray()
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = await reader.readuntil(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
        raise _Closed from err

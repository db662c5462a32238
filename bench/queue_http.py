"""A small HTTP/1.1 client for load generation: keep-alive sockets, httptools parsing.

One ``Conn`` is one TCP connection carrying one request at a time (no pipelining), as one
worker's client would. It is an asyncio Protocol that writes a prebuilt request and parses
the reply with httptools' C parser, so the load generator spends little CPU per request
(a synchronous httpx client per worker, what bench.queue used before, costs more CPU per
cycle than the server it measures). A connection the server closed between requests
(keep-alive timeout) is reopened before the next one; one lost in the middle of a request
raises ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools


class HttpError(Exception):
    """A reply with a status the caller did not expect."""

    def __init__(self, status: int, body: bytes, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


class _Proto(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: list[bytes] = []
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionError(f"bad reply: {err}"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        body, self.chunks = b"".join(self.chunks), []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), body))


class Conn:
    """One keep-alive connection to ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.proto: _Proto | None = None
        self.requests = 0

    async def _open(self) -> _Proto:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Proto, self.host, self.port)
        return proto

    async def request(
        self, method: str, path: str, token: str | None = None, body: bytes = b""
    ) -> tuple[int, bytes]:
        if self.proto is None or self.proto.closed:
            self.proto = await self._open()
        proto = self.proto
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        if body or method != "GET":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        proto.waiter = asyncio.get_running_loop().create_future()
        assert proto.transport is not None
        proto.transport.write(head.encode() + b"\r\n" + body)
        self.requests += 1
        return await proto.waiter

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        payload: Any = None,
        expect: tuple[int, ...] = (200,),
    ) -> Any:
        """Send ``payload`` as JSON; the decoded JSON reply (None for an empty body)."""
        body = b"" if payload is None else json.dumps(payload).encode()
        status, reply = await self.request(method, path, token, body)
        if status not in expect:
            raise HttpError(status, reply, f"{method} {path}")
        return json.loads(reply) if reply else None

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None

"""One write per response: uvicorn's httptools protocol, with a response's head held back
until its body is written (issue 9).

uvicorn writes a response's status line and headers (``http.response.start``) and then its
body (``http.response.body``) as two writes to the connection, and on uvloop each is its own
``send(2)`` when the socket is idle: two system calls per response, and two segments for the
client to read. Measured on the coordinator under ``bench.queue`` (N = 64, three requests per
claim cycle): two write calls per request on the event loop's thread, a sixth of that
thread's CPU in the kernel.

``OneWriteHttpTools`` gives each connection a transport that holds a response's head and
sends it with the next write (the body, which uvicorn writes in the same turn of the loop):
one ``send(2)``. Nothing waits longer than that turn: a head no write follows (a ``HEAD``
request, a 204) goes out from a callback at the loop's next turn, or when the connection
closes, and everything goes out in the order it was written. A ``100 Continue`` (the client
waits for it before sending the body) is never held. Everything else about the transport is
the connection's own.

Used where uvicorn would use httptools itself (``http="auto"``); without httptools, uvicorn's
h11 protocol as usual.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn's own choice (h11)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_HEAD_START = b"HTTP/"
_HEAD_END = b"\r\n\r\n"
_INFORMATIONAL = ord("1")  # "HTTP/1.1 1xx": sent at once (the client may wait for it)


class HeldHead:
    """A connection's transport that holds a response's head until the next write."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
            return
        if _is_head(data):
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def flush(self) -> None:
        """Send a head still held (no body followed it in its turn of the loop)."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


def _is_head(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is a whole response head (status line and headers), not a 1xx."""
    return (
        len(data) > 12
        and data[:5] == _HEAD_START
        and data[-4:] == _HEAD_END
        and data[9] != _INFORMATIONAL
    )


if HttpToolsProtocol is not None:

    class OneWriteHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol on a ``HeldHead`` transport."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            held = HeldHead(transport, asyncio.get_running_loop())
            super().connection_made(held)  # type: ignore[arg-type]

    PROTOCOL: type | None = OneWriteHttpTools
else:
    PROTOCOL = None


def http_option() -> dict[str, Any]:
    """uvicorn's ``http`` option for the coordinator: this protocol where httptools is."""
    return {} if PROTOCOL is None else {"http": PROTOCOL}


__all__ = ["PROTOCOL", "HeldHead", "http_option"]

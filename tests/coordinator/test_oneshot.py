"""One write per response (``coordinator.oneshot``): a response's head goes out with its
body; a head nothing follows goes out at the loop's next turn; a ``100 Continue`` at once;
order is kept. Then against a live uvicorn server on that protocol: every kind of response
arrives whole and correct, and a plain one costs the server one write call."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from trainfleet.coordinator import oneshot, server

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


async def held() -> tuple[oneshot.HeldHead, Recorder]:
    raw = Recorder()
    return oneshot.HeldHead(raw, asyncio.get_running_loop()), raw  # type: ignore[arg-type]


def test_a_head_goes_out_with_its_body_in_one_write() -> None:
    async def scenario() -> list[bytes]:
        t, raw = await held()
        t.write(HEAD)
        assert raw.writes == []
        t.write(b"ok")
        await asyncio.sleep(0)  # the held head's callback finds nothing left
        return raw.writes

    assert asyncio.run(scenario()) == [HEAD + b"ok"]


def test_a_head_nothing_follows_goes_out_at_the_next_turn_of_the_loop() -> None:
    async def scenario() -> list[list[bytes]]:
        t, raw = await held()
        t.write(HEAD)  # a HEAD request's response, or a 204: no body write
        before = list(raw.writes)
        await asyncio.sleep(0)
        return [before, raw.writes]

    assert asyncio.run(scenario()) == [[], [HEAD]]


def test_informational_and_other_writes_go_out_at_once_in_order() -> None:
    async def scenario() -> list[bytes]:
        t, raw = await held()
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for it
        t.write(b"chunk")  # not a head
        t.write(HEAD)
        t.writelines([b"o", b"k"])
        t.write(b"more")
        return raw.writes

    assert asyncio.run(scenario()) == [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"chunk",
        HEAD + b"ok",
        b"more",
    ]


def test_close_sends_a_held_head_first_and_abort_drops_it() -> None:
    async def scenario() -> tuple[list[bytes], bool, list[bytes], bool]:
        t, raw = await held()
        t.write(HEAD)
        t.close()
        u, raw2 = await held()
        u.write(HEAD)
        u.abort()
        await asyncio.sleep(0)  # the callback of an aborted one writes nothing
        return raw.writes, raw.closed, raw2.writes, raw2.aborted

    assert asyncio.run(scenario()) == ([HEAD], True, [], True)


def test_everything_else_is_the_transports_own() -> None:
    async def scenario() -> Any:
        t, _ = await held()
        return t.get_extra_info("peername")

    assert asyncio.run(scenario()) == ("127.0.0.1", 1)


def test_serve_uses_the_protocol_where_httptools_is() -> None:
    pytest.importorskip("httptools")
    assert server.uvicorn_options()["http"] is oneshot.PROTOCOL is not None


# A live server ---------------------------------------------------------------------------
async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    reply = b"echo:" + body
    headers = [(b"content-length", str(len(reply)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": reply})


@pytest.fixture
def live() -> Iterator[tuple[str, int]]:
    """A uvicorn server on the coordinator's protocol, in a thread of this process; its URL
    and the thread's native id."""
    pytest.importorskip("httptools")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, **oneshot.http_option())
    srv = uvicorn.Server(config)
    ids: list[int] = []

    def run() -> None:
        ids.append(threading.get_native_id())
        srv.run(sockets=[sock])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(500):
        if srv.started:
            break
        threading.Event().wait(0.01)
    assert srv.started, "the server did not start"
    yield url, ids[0]
    srv.should_exit = True
    thread.join(10)
    sock.close()


def writes_of(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["syscw"])


def test_a_live_server_answers_every_kind_of_response_whole(live: tuple[str, int]) -> None:
    url, _ = live
    with httpx.Client(base_url=url) as client:
        assert client.post("/x", content=b"hi").content == b"echo:hi"
        head = client.head("/x")
        assert head.status_code == 200 and head.content == b""
        assert client.get("/empty").status_code == 204
        assert client.get("/stream").content == b"abc"
        expect = client.post("/x", content=b"body", headers={"expect": "100-continue"})
        assert expect.content == b"echo:body"
        assert client.post("/x", content=b"again").content == b"echo:again"  # kept alive


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_a_plain_response_costs_the_server_one_write(live: tuple[str, int]) -> None:
    url, tid = live
    with httpx.Client(base_url=url) as client:
        client.post("/x", content=b"warm")
        before = writes_of(tid)
        for i in range(50):
            assert client.post("/x", content=str(i).encode()).content == f"echo:{i}".encode()
        assert writes_of(tid) - before == 50  # uvicorn's own protocol makes 100

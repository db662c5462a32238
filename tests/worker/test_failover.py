"""A client of several coordinators (``trainfleet join URL1,URL2``): round-robin per request,
failover on a refused connection, a dead coordinator tried last for a while."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from trainfleet import env
from trainfleet.cli.main import app
from trainfleet.client import Client
from trainfleet.errors import CoordinatorUnavailable
from trainfleet.failover import FailoverTransport, split_urls


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answering(name: str, seen: list[str]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{name} {request.headers['Host']} {request.url.raw_path.decode()}")
        return httpx.Response(200, json={"by": name})

    return httpx.MockTransport(handle)


def refusing(name: str, seen: list[str]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{name} refused")
        raise httpx.ConnectError("connection refused", request=request)

    return httpx.MockTransport(handle)


def test_split_urls() -> None:
    assert split_urls("http://a:1/") == ["http://a:1"]
    assert split_urls(" http://a:1/, http://b:2 ,") == ["http://a:1", "http://b:2"]


def test_requests_go_round_robin_with_the_host_and_path_of_each_coordinator() -> None:
    seen: list[str] = []
    transport = FailoverTransport(
        ["http://a:1/x", "http://b:2"],
        transports=[answering("a", seen), answering("b", seen)],
    )
    with httpx.Client(base_url="http://a:1/x", transport=transport) as http:
        bys = [http.get("/v1/status", params={"q": "1"}).json()["by"] for _ in range(4)]
    assert bys == ["a", "b", "a", "b"]
    assert seen[:2] == ["a a:1 /x/v1/status?q=1", "b b:2 /v1/status?q=1"]


def test_a_refused_connection_fails_over_and_the_dead_one_waits_at_the_back() -> None:
    seen: list[str] = []
    clock = FakeClock()
    transport = FailoverTransport(
        ["http://a:1", "http://b:2"],
        transports=[refusing("a", seen), answering("b", seen)],
        down_s=5.0,
        clock=clock,
    )
    with httpx.Client(base_url="http://a:1", transport=transport) as http:
        assert [http.get("/h").json()["by"] for _ in range(4)] == ["b"] * 4
        assert [s for s in seen if "refused" in s] == ["a refused"]  # once, then at the back
        clock.now = 5.1  # down_s later it is tried again, in its turn
        seen.clear()
        assert [http.get("/h").json()["by"] for _ in range(2)] == ["b", "b"]
        assert seen.count("a refused") == 1


def test_when_every_coordinator_refuses_the_last_error_is_raised() -> None:
    seen: list[str] = []
    transport = FailoverTransport(
        ["http://a:1", "http://b:2"], transports=[refusing("a", seen), refusing("b", seen)]
    )
    with (
        httpx.Client(base_url="http://a:1", transport=transport) as http,
        pytest.raises(httpx.ConnectError),
    ):
        http.get("/h")
    assert seen == ["a refused", "b refused"]


# -- over real sockets, through the trainfleet Client -------------------------------------


class Named(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer(b"")

    def do_PUT(self) -> None:
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes) -> None:
        data = json.dumps({"by": self.server.name, "got": len(body)}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Named)
    httpd.name = "live"  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dead_url() -> str:
    """An address nothing listens on: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_client_fails_over_a_dead_coordinator_even_for_a_streamed_upload(
    server: str, dead_url: str
) -> None:
    with Client(f"{dead_url},{server}", "tok") as client:
        assert client.url == f"{dead_url},{server}"

        def body() -> Iterator[bytes]:
            yield b"x" * 1000
            yield b"y" * 24

        # The first request tries the dead one first: its refused connection consumed none
        # of the body, which goes whole to the live one.
        got = client.request("PUT", "/up", content=body(), headers={"Content-Length": "1024"})
        assert got == {"by": "live", "got": 1024}
        assert client.request("GET", "/health") == {"by": "live", "got": 0}


def test_client_with_every_coordinator_dead_says_unreachable(dead_url: str) -> None:
    with (
        Client(f"{dead_url},{dead_url}/", "tok") as client,
        pytest.raises(CoordinatorUnavailable, match="cannot reach coordinator"),
    ):
        client.request("GET", "/health")


def test_join_refuses_a_list_with_a_malformed_url(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(env.JOIN_TOKEN, "some-token")
    result = CliRunner().invoke(
        app, ["join", "http://127.0.0.1:9,127.0.0.1:10", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "not a coordinator URL: '127.0.0.1:10'" in result.output

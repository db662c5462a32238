"""The HTTP client's one retry: a GET whose kept-alive connection the server closed as idle
just as it was sent is sent once more; a write is never sent twice."""

from __future__ import annotations

import httpx
import pytest

from trainfleet.client import Client
from trainfleet.errors import CoordinatorUnavailable


def flaky_once() -> tuple[httpx.MockTransport, list[str]]:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) == 1:
            raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handle), seen


def test_a_get_on_a_connection_reset_as_it_was_sent_is_sent_once_more() -> None:
    transport, seen = flaky_once()
    with Client("http://coord", "t", transport=transport) as client:
        assert client.request("GET", "/v1/status") == {"ok": True}
    assert seen == ["GET", "GET"]


def test_a_write_on_a_reset_connection_is_reported_never_sent_twice() -> None:
    transport, seen = flaky_once()
    with (
        Client("http://coord", "t", transport=transport) as client,
        pytest.raises(CoordinatorUnavailable, match="reset by peer"),
    ):
        client.request("POST", "/v1/jobs/x/complete", json={})
    assert seen == ["POST"]

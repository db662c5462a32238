"""Every report ends accepted, fenced, refused or unreachable; retries wait on the stop event."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from trainfleet.client import Client
from trainfleet.errors import BadRequest, CoordinatorUnavailable, StaleEpoch, Unauthorized
from trainfleet.worker.report import Backoff, Reporter, classify, cut_text


def client_answering(*responses: httpx.Response | Exception) -> tuple[Client, list[str]]:
    """A real ``Client`` over a transport that plays ``responses`` in order."""
    seen: list[str] = []
    queue = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return Client("http://coord", "tok", transport=httpx.MockTransport(handle)), seen


def error(status: int, code: str, message: str = "no") -> httpx.Response:
    return httpx.Response(status, json={"error": code, "message": message})


def no_wait_reporter(stop: threading.Event | None = None) -> Reporter:
    return Reporter(stop or threading.Event(), initial_backoff_s=0.0, max_backoff_s=0.0)


@pytest.mark.parametrize(
    ("response", "outcome", "error_type"),
    [
        (httpx.Response(200, json={"cancel": False, "state": "running"}), "accepted", None),
        (error(409, "stale_epoch", "epoch 1 is stale"), "fenced", StaleEpoch),
        (error(400, "bad_request", "error too long"), "refused", BadRequest),
        (error(401, "unauthorized"), "refused", Unauthorized),
        (error(413, "payload_too_large"), "refused", Exception),
        (httpx.Response(422, text="not json at all"), "refused", Exception),
    ],
)
def test_each_answer_maps_to_one_outcome(response, outcome, error_type) -> None:
    client, seen = client_answering(response)
    reply = no_wait_reporter().send("heartbeat", lambda: client.heartbeat("j", 1), retry=False)
    assert reply.outcome == outcome and seen == ["/v1/jobs/j/heartbeat"]
    if error_type is None:
        assert reply.accepted and reply.value == {"cancel": False, "state": "running"}
    else:
        assert isinstance(reply.error, error_type) and not reply.accepted


def test_unreachable_is_retried_until_accepted() -> None:
    client, seen = client_answering(
        httpx.ConnectError("refused"),
        httpx.Response(503, text="starting"),
        httpx.ReadTimeout("slow"),
        httpx.Response(200, json={"count": 2}),
    )
    reply = no_wait_reporter().send("log", lambda: client.append_log("j", 1, ["a", "b"]))
    assert reply.accepted and reply.value == {"count": 2} and len(seen) == 4


def test_one_try_only_when_not_retrying_or_stopped() -> None:
    client, seen = client_answering(httpx.ConnectError("down"), httpx.ConnectError("down"))
    assert no_wait_reporter().send("x", client.claim, retry=False).outcome == "unreachable"
    stop = threading.Event()
    stop.set()
    assert no_wait_reporter(stop).send("x", client.claim).outcome == "unreachable"
    assert len(seen) == 2


def test_stop_interrupts_a_long_backoff_at_once() -> None:
    stop = threading.Event()
    calls: list[int] = []

    def down() -> Any:
        calls.append(1)
        raise CoordinatorUnavailable("down")

    reporter = Reporter(stop, initial_backoff_s=3600.0, max_backoff_s=3600.0)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(reporter.send("claim", down)))
    t.start()
    stop.set()
    t.join(timeout=5)  # a one-hour backoff ends as soon as stop is set
    assert not t.is_alive()
    assert result[0].outcome == "unreachable" and 1 <= len(calls) <= 2


def test_backoff_is_exponential_jittered_capped_and_waits_on_stop() -> None:
    stop = threading.Event()
    waits: list[float] = []
    stop.wait = lambda s: waits.append(s) or False  # type: ignore[method-assign]
    backoff = Backoff(stop, initial_s=1.0, max_s=8.0)
    for _ in range(6):
        assert backoff.wait()
    assert all(0.8 * b <= w <= 1.2 * b for w, b in zip(waits, [1, 2, 4, 8, 8, 8], strict=True))
    assert len(set(waits)) > 1


def test_a_programming_error_is_not_an_outcome() -> None:
    with pytest.raises(KeyError):
        classify(KeyError("x"))


@pytest.mark.parametrize("size", [0, 10, 20_000, 20_001, 1_000_000])
def test_cut_text_fits_and_keeps_both_ends(size: int) -> None:
    text = "é" * (size // 2) + "🙂" * (size - size // 2)
    cut = cut_text(text, 20_000)
    assert len(cut) <= 20_000
    cut.encode("utf-8")  # still valid text
    if size <= 20_000:
        assert cut == text
    else:
        assert cut.startswith("é") and cut.endswith("🙂") and "chars cut]" in cut

"""Request limits hold against a live uvicorn coordinator: a 400 MB JSON body is refused
while it streams, and the coordinator's memory stays flat. Job references typed at the CLI
reach the coordinator whole ('/', '?', '#', spaces), and an empty one is a clear error.

The coordinator runs in a thread of this process (``LiveFleet``), so this process's RSS is
the coordinator's; a sampler thread records its peak while the body streams.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from trainfleet.testing import LiveFleet

MiB = 1024 * 1024
BODY_BYTES = 400 * MiB


class PeakRss:
    """The highest RSS of this process seen every few milliseconds while active."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / MiB


def stream_chunked(url: str, token: str, total: int) -> tuple[int, bytes]:
    """POST ``total`` bytes of JSON whitespace, chunked, to /v1/manifest on a raw socket,
    stopping as soon as the server answers. Returns (bytes sent, what the server said)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(
        b"POST /v1/manifest HTTP/1.1\r\nHost: coordinator\r\n"
        + f"Authorization: Bearer {token}\r\n".encode()
        + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    frame = b"%x\r\n%s\r\n" % (MiB, b" " * MiB)  # one frame object, reused: nothing held
    sent = 0
    reply = b""
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (or closed) before the body was done
            sock.sendall(frame)
            sent += MiB
        else:
            sock.sendall(b"0\r\n\r\n")
        while chunk := sock.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply and reply.rstrip().endswith(b"}"):
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection on the unread rest of the body
    finally:
        sock.close()
    return sent, reply


@pytest.mark.slow
def test_a_400_mb_json_body_is_refused_while_streaming_and_memory_stays_flat(
    tmp_path: Path,
) -> None:
    with LiveFleet(tmp_path) as fleet:
        fleet.operator.status()  # warm: first-request allocations are not the body's
        with PeakRss() as rss:
            sent, reply = stream_chunked(fleet.url, fleet.coord.operator_token, BODY_BYTES)
        assert rss.growth_mib < 100, f"coordinator RSS grew {rss.growth_mib:.0f} MiB"
        assert sent < BODY_BYTES, "the coordinator read the whole 400 MB body"
        if reply:  # the answer arrived before the connection was reset
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413"), head
            assert json.loads(body)["error"] == "payload_too_large"
        # The coordinator is still serving.
        assert fleet.operator.status()["version"]


@pytest.mark.slow
def test_job_references_reach_the_coordinator_whole_and_an_empty_one_is_refused(
    tmp_path: Path,
) -> None:
    with LiveFleet(tmp_path) as fleet:
        fleet.reload('[[jobs]]\nname = "solo"\nhyper = { steps = 5 }\n')
        odd = "a/b?c=1#frag ment"
        shown = fleet.cli("show", odd)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        assert "no job" in shown.stderr and "a/b?c=1#frag ment" in shown.stderr
        assert "Traceback" not in shown.stderr
        empty = fleet.cli("show", "")
        assert empty.returncode != 0
        assert "empty job reference" in empty.stderr and "Traceback" not in empty.stderr
        assert "solo" in fleet.cli("show", "solo", check=True).stdout

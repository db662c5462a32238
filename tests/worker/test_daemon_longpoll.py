"""The daemon's long-poll claims: how long it asks to wait, and a SIGTERM cutting a wait short
(the daemon then deregisters and returns, with no job)."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon_faults import DaemonClient, worker_with


class WaitingClient(DaemonClient):
    """A coordinator with no work: a long-poll claim blocks until ``release()``. It blocks in
    ``select`` on a pipe, as the real client blocks in a socket read: a signal handler that
    raises there leaves nothing half done (raised inside ``Event.wait``, it can catch the
    condition's lock mid-restore: "release unlocked lock")."""

    def __init__(self) -> None:
        super().__init__([])
        self.waits: list[float] = []
        self.waiting = threading.Event()
        self._wake_r, self._wake_w = os.pipe()

    def release(self) -> None:
        os.write(self._wake_w, b"x")

    def claim(self, wait_s: float = 0.0) -> Any:
        self.record("claim")
        self.waits.append(wait_s)
        if wait_s > 0:
            self.waiting.set()
            # In slices: a signal that lands just before a blocking call runs its Python
            # handler only when the call returns (the interpreter checks between bytecodes).
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if select.select([self._wake_r], [], [], 0.05)[0]:
                    break
        return None


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_claim_waits_at_most_what_is_left_of_exit_when_idle(tmp_path: Path) -> None:
    client = WaitingClient()
    client.release()
    worker = worker_with(client, tmp_path, exit_when_idle_s=1.5, claim_wait_s=20.0)
    worker.run()
    assert client.waits and 0.5 <= client.waits[0] <= 1.5  # cut to the idle limit
    assert all(w == 0.0 or w <= 1.5 for w in client.waits)
    assert client.kinds()[-1] == "deregister"
    short = WaitingClient()
    worker_with(short, tmp_path, exit_when_idle_s=0.05, claim_wait_s=20.0).run()
    assert short.waits == [0.0] * len(short.waits)  # too short to wait: plain claims


def test_sigterm_cuts_a_long_poll_claim_short(tmp_path: Path, restore_signals: None) -> None:
    client = WaitingClient()
    worker = worker_with(client, tmp_path, exit_when_idle_s=None, claim_wait_s=3600.0)
    worker.install_signal_handlers()
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    # To the main thread itself, as the kernel does in the daemon (its only thread while it
    # claims): a signal taken by another thread would not interrupt the main thread's wait.
    sender = threading.Thread(
        target=lambda: client.waiting.wait(30) and signal.pthread_kill(main, signal.SIGTERM)
    )
    sender.start()
    try:
        assert worker.run() == []  # returns: the hour-long wait did not hold it
    finally:
        client.release()
        sender.join(30)
    assert client.waits == [3600.0]
    assert worker.stop.is_set()
    assert client.kinds() == ["claim", "deregister"]

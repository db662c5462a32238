"""Run a coordinator: state directory layout, tokens, and uvicorn.

State directory (``--state-dir``, default ``.trainfleet``)::

    queue.db          the SQLite queue (unless --queue-url says otherwise)
    artifacts/        the artifact store (unless --artifacts says otherwise)
    staging/          uploads in flight
    operator.token    the operator token (0600); the CLI reads it from here by default
    join.token        the shared join token (0600), accepted only with ``--open-join``

Hosts join with their own tokens (``trainfleet hosts enroll NAME``), stored hashed in the
queue. With ``tls_cert``/``tls_key`` the API is served over https only.

uvicorn's proxy-headers middleware (``X-Forwarded-For``/``-Proto`` from trusted proxies) runs
only where ``FORWARDED_ALLOW_IPS`` is set in the environment (uvicorn's own setting, naming
the proxies to trust): the coordinator reads neither the client's address nor the scheme, so
without a proxy in front it is a cost on every request and nothing else (issue 9).

The cyclic garbage collector is tuned for a long-running server (``tune_gc``). Measured with
issue 9's bench (64 workers): with Python's defaults a full collection, which walks every
tracked object on the event loop, ran every second or two, and its pause grew with what the
coordinator keeps (the parsed spec of every job it handed out): 130-200 ms with a 6,000-job
manifest; over a 100,000-job run, 46 of them while it served took 10.7 s of CPU, up to 620 ms
each, and the claim p99 was 125 ms; loading the manifest spent another 3.9 s in them. Two
changes:

- what startup built (the manifest, the first reads of the job table, the imports) is moved
  out of the collector's reach before the first request (``gc.freeze``);
- the young generation holds 100,000 objects instead of 700, so the objects of requests in
  flight are rarely promoted and the older generations fill slowly.

The same 100,000-job run then had no full collection while it served and a claim p99 of
41 ms; its load spent 0.4 s in them. Garbage without cycles is freed at once either way
(reference counting); only cyclic garbage waits longer, for a young collection.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from trainfleet.artifacts import ArtifactStore
from trainfleet.artifacts.s3 import DEFAULT_PART_BYTES
from trainfleet.coordinator.app import create_app
from trainfleet.coordinator.oneshot import http_option
from trainfleet.coordinator.state import Coordinator
from trainfleet.queue import QueueSettings, open_queue

log = logging.getLogger(__name__)

OPERATOR_TOKEN_FILE = "operator.token"
JOIN_TOKEN_FILE = "join.token"


def ensure_token(path: Path, given: str | None) -> str:
    """Use ``given`` (and record it), else the token already in ``path``, else a new one.

    The file is left readable by its owner only (0600) in every case: a file that existed
    with a looser mode (an older version, a copy, a hand-made one) is tightened, since the
    mode given to ``open`` applies only to a file it creates.
    """
    if given:
        token = given
    elif path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others; its mode is now 0600", path)
            path.chmod(0o600)
        return path.read_text().strip()
    else:
        token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


@dataclass(frozen=True)
class ServeConfig:
    state_dir: Path
    queue_url: str | None = None
    artifacts: str | None = None
    artifact_part_bytes: int = DEFAULT_PART_BYTES  # S3: single-PUT limit and multipart part
    operator_token: str | None = None
    join_token: str | None = None
    open_join: bool = False
    public_reads: bool = False
    heartbeat_interval_s: float = 2.0  # the least interval; more above ~1,000 workers
    # the least lease: with a 1 s reaper, a dead worker's job is pending again within 10 s
    heartbeat_timeout_s: float = 8.0
    reap_interval_s: float = 1.0
    beat_flush_s: float = 1.0  # heartbeats are written in one batch this often
    beat_budget_per_s: float = 500.0  # heartbeats/s the fleet may send: scales the interval


def build_coordinator(cfg: ServeConfig) -> Coordinator:
    # A new state directory is the owner's only: the queue in it holds every job's logs and
    # results, which the API serves to the operator token alone (unless --public-reads).
    cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    queue = open_queue(
        cfg.queue_url or f"sqlite:///{cfg.state_dir / 'queue.db'}",
        QueueSettings(
            heartbeat_timeout_s=cfg.heartbeat_timeout_s,
            idle_window_s=max(5 * cfg.heartbeat_interval_s, 5.0),
            offline_after_s=max(2 * cfg.heartbeat_timeout_s, 10.0),
        ),
    )
    return Coordinator(
        queue=queue,
        store=ArtifactStore(
            cfg.artifacts or str(cfg.state_dir / "artifacts"), part_bytes=cfg.artifact_part_bytes
        ),
        staging_dir=cfg.state_dir / "staging",
        operator_token=ensure_token(cfg.state_dir / OPERATOR_TOKEN_FILE, cfg.operator_token),
        join_token=ensure_token(cfg.state_dir / JOIN_TOKEN_FILE, cfg.join_token),
        open_join=cfg.open_join,
        public_reads=cfg.public_reads,
        heartbeat_interval_s=cfg.heartbeat_interval_s,
        reap_interval_s=cfg.reap_interval_s,
        beat_flush_s=cfg.beat_flush_s,
        beat_budget_per_s=cfg.beat_budget_per_s,
    )


FORWARDED_ALLOW_IPS_ENV = "FORWARDED_ALLOW_IPS"  # uvicorn's: the proxies whose headers to trust


@dataclass(frozen=True)
class TlsFiles:
    """The certificate chain and private key (PEM) an https coordinator presents."""

    cert: Path
    key: Path


class _Server(uvicorn.Server):
    """uvicorn's server that ends waiting long-poll claims as soon as shutdown begins: a
    graceful shutdown waits for every request in flight, and a waiting claim would otherwise
    hold it for up to ``longpoll.RECHECK_S``. They are answered ``{"claim": null}``; the
    worker asks again (another coordinator, or this one once it is back)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


def uvicorn_options(tls: TlsFiles | None = None) -> dict[str, Any]:
    """How ``serve`` configures uvicorn: quiet, no access log, the proxy headers only where
    trusted proxies are named (``FORWARDED_ALLOW_IPS``), TLS where given, one write per
    response (``oneshot``)."""
    return {
        **http_option(),
        "log_level": "warning",
        "access_log": False,
        "proxy_headers": bool(os.environ.get(FORWARDED_ALLOW_IPS_ENV)),
        "ssl_certfile": str(tls.cert) if tls else None,
        "ssl_keyfile": str(tls.key) if tls else None,
    }


GC_THRESHOLDS = (100_000, 50, 50)  # young generation, then collections of the one below


def tune_gc() -> None:
    """Collector thresholds for a long-running coordinator; called before its manifest is
    loaded (a 100,000-job manifest spent seconds of its load in full collections)."""
    gc.set_threshold(*GC_THRESHOLDS)


def serve(coord: Coordinator, host: str, port: int, tls: TlsFiles | None = None) -> None:
    """Serve ``coord`` with uvicorn until interrupted; closes its queue afterwards."""
    app = create_app(coord)
    scheme = "https" if tls else "http"
    log.info("coordinator on %s://%s:%d  store=%s", scheme, host, port, coord.store)
    config = uvicorn.Config(app, host=host, port=port, **uvicorn_options(tls))
    gc.collect()  # what startup left as garbage goes now, not into the frozen set
    gc.freeze()
    try:
        _Server(config, coord.work.close).run()
    finally:
        coord.queue.close()

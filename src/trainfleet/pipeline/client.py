"""``HttpControl``: the pipeline control plane (``PipelineControl``) over the coordinator's API.

A producer or consumer program talks to a ``PipelineControl`` (``pipeline.control``), never
to HTTP directly; in a fleet that is this class, built from the ``attach.json`` the worker
wrote (``from_attach``). Each call is one request of ``coordinator.routes_pipelines``,
authenticated by the attempt token (valid while this attempt is the job's active one), and
carries refs only, never tensor bytes.

Outcomes, as everywhere in trainfleet (DESIGN.md, "Failure model"):

- unreachable (connection refused, timeout, 5xx): retried with jittered exponential
  backoff for up to ``patience_s`` (default: ``DEFAULT_PATIENCE_S``), then
  ``CoordinatorUnavailable`` is raised; the worker has stopped the attempt by then anyway
  once its lease ran out;
- 409 ``stale_epoch`` (or any 409): the attempt was written off: ``AttemptFenced`` (a
  ``StaleEpoch``) is raised at once and the program should exit (``FENCED_EXIT``); its
  leases return to the queue and nothing it trains on is kept;
- any other 4xx: the ``ApiError`` itself (a bug or an attack: never retried).

Retrying a request whose reply was lost is safe: a re-published ref is reported skipped,
an ack is idempotent for the attempt that holds the lease, a lost lease expires after
``lease_s``. Batches larger than one request allows are split (``PUBLISH_BATCH``,
``RELEASED_BATCH``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from trainfleet.client import Client
from trainfleet.errors import Conflict, CoordinatorUnavailable, StaleEpoch
from trainfleet.features.ref import SampleRef
from trainfleet.pipeline.control import AckResult, Lease, PublishResult, Sync

log = logging.getLogger(__name__)

DEFAULT_PATIENCE_S = 300.0  # how long an unreachable coordinator is retried
INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 10.0
PUBLISH_BATCH = 64  # refs per publish request (the route takes 256; a 'dir:' address is long)
ACK_BATCH = 256  # acks or returned ids per request (the route's limit)
RELEASED_BATCH = 1024  # released ids per sync request (the route takes 4096)
FENCED_EXIT = 75  # what a program exits with when its attempt was written off


class AttemptFenced(StaleEpoch):
    """This attempt was written off by the coordinator (409): stop, keep nothing."""


class HttpControl:
    """``PipelineControl`` for one attempt of one producer or consumer job."""

    def __init__(
        self,
        url: str,
        attempt_token: str,
        pipeline_id: str,
        ca: str | Path | None = None,
        *,
        patience_s: float = DEFAULT_PATIENCE_S,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        timeout_s: float = 30.0,
    ):
        self.pipeline_id = pipeline_id
        self.patience_s = patience_s
        self.sleep = sleep
        self.client = Client(
            url, attempt_token, ca_cert=ca, transport=transport, timeout_s=timeout_s
        )

    @classmethod
    def from_attach(cls, path: str | Path, **kw: Any) -> HttpControl:
        """The control of the attempt whose ``attach.json`` (written by the worker) is at
        ``path``: its coordinator URL, CA file, attempt token and pipeline id."""
        attach = json.loads(Path(path).read_text())
        return cls(
            attach["coordinator"],
            attach["attempt_token"],
            attach["pipeline_id"],
            attach.get("ca"),
            **kw,
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HttpControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the protocol ----------------------------------------------------------------------
    def publish(self, refs: list[SampleRef]) -> PublishResult:
        accepted: list[str] = []
        skipped: list[tuple[str, str]] = []
        for batch in _chunks(refs, PUBLISH_BATCH):
            body = {"refs": [r.model_dump(mode="json") for r in batch]}
            reply = self._post("publish", body)
            accepted += [str(s) for s in reply["accepted"]]
            skipped += [(str(s["sample_id"]), str(s["reason"])) for s in reply["skipped"]]
        return PublishResult(accepted=accepted, skipped=skipped)

    def lease(self, max_samples: int) -> Lease:
        reply = self._post("lease", {"max_samples": max_samples})
        return Lease(
            samples=[SampleRef.model_validate(r) for r in reply["samples"]],
            retire=bool(reply["retire"]),
            done=bool(reply["done"]),
            num_consumers=int(reply["num_consumers"]),
        )

    def ack(self, acks: list[tuple[str, int]]) -> list[AckResult]:
        results: list[AckResult] = []
        for batch in _chunks(acks, ACK_BATCH):
            body = {"acks": [{"sample_id": s, "step": step} for s, step in batch]}
            for r in self._post("ack", body)["results"]:
                results.append(
                    AckResult(
                        sample_id=str(r["sample_id"]),
                        accepted=bool(r["accepted"]),
                        reason=str(r.get("reason", "")),
                    )
                )
        return results

    def return_samples(self, sample_ids: list[str]) -> int:
        returned = 0
        for batch in _chunks(sample_ids, ACK_BATCH):
            returned += int(self._post("return", {"sample_ids": list(batch)})["returned"])
        return returned

    def sync(self, released: list[str]) -> Sync:
        # Each sync marks its ids released first, so the last reply is the whole state.
        batches = list(_chunks(released, RELEASED_BATCH)) or [[]]
        reply: dict[str, Any] = {}
        for batch in batches:
            reply = self._post("sync", {"released": list(batch)})
        return Sync(
            release=[SampleRef.model_validate(r) for r in reply["release"]],
            produce=[int(i) for i in reply["produce"]],
            finished=bool(reply["finished"]),
        )

    # transport -------------------------------------------------------------------------
    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the pipeline's ``route``: retried while unreachable, up to the
        patience; a 409 raises ``AttemptFenced``."""
        path = f"/v1/pipelines/{self.pipeline_id}/{route}"
        deadline = time.monotonic() + self.patience_s
        wait_s = INITIAL_BACKOFF_S
        while True:
            try:
                reply: dict[str, Any] = self.client.request("POST", path, json=body)
                return reply
            except Conflict as err:  # StaleEpoch, or the job ended (cancelled, completed)
                raise AttemptFenced(
                    f"pipeline {route}: this attempt was written off by the coordinator"
                    f" ({err.message}); stop and keep nothing",
                    **err.details,
                ) from err
            except CoordinatorUnavailable as err:
                pause_s = wait_s * random.uniform(0.8, 1.2)
                if time.monotonic() + pause_s > deadline:
                    raise CoordinatorUnavailable(
                        f"pipeline {route}: coordinator unreachable for {self.patience_s:g}s: {err}"
                    ) from err
                log.warning("pipeline %s: %s; retrying in %.1fs", route, err, pause_s)
                self.sleep(pause_s)
                wait_s = min(MAX_BACKOFF_S, wait_s * 2)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


__all__ = ["FENCED_EXIT", "AttemptFenced", "HttpControl"]

"""Who is calling: bearer tokens checked against the coordinator's credentials.

Kinds of caller (``Auth``):

- ``none``: anyone (``/health``, ``/openapi.json``);
- ``join``: a host's join token from ``trainfleet hosts enroll NAME``, or, only in open mode
  (``serve --open-join``), the shared join token; ``register_caller`` decides which host
  the worker becomes;
- ``worker``: a worker credential from ``/v1/workers/register``;
- ``operator``: the operator token;
- ``read``: the operator token, or anyone when the coordinator serves ``--public-reads``;
- ``reader``: the operator token or a worker credential;
- ``submitter``: the operator token (the caller is ``OPERATOR``) or an enrolled host's join
  token (the caller is that host): who submits a model to the market (``routes_market``);
- ``market``: as ``submitter``, or anyone with ``--public-reads``: who competes may read a
  competition's terms, its leaderboard and the ledger;
- ``attempt``: a pipeline job's process (``routes_pipelines``), with the attempt token its
  worker got at attach: ``f"{job_id}.{epoch}.{mac}"``, ``mac`` = HMAC-SHA256 of
  ``f"attempt:{job_id}:{epoch}"`` keyed by the pipeline's attempt key (``attempt_token``),
  which no job holds (every job holds the secret). It is checked in constant time and valid
  only while that epoch is the job's active attempt (401 for a wrong or unknown token, 409
  once the attempt is written off; the MAC is checked before the fence answers, so a
  stranger learns nothing but 401). The handler reads the caller as ``ctx.attempt`` (an
  ``AttemptCaller``).

Every check is a constant-time comparison or a lookup by token hash. Worker and host
lookups are cached in memory (``TokenCache``) for at most ``TOKEN_TTL_S``, so a busy fleet's
requests cost no database read: a revoke, rotation or deregistration in this process clears
the cache at once (the next request is refused); one made through another coordinator of the
same database takes effect here within ``TOKEN_TTL_S``, and meanwhile fencing already keeps
a revoked worker's writes out (its jobs were requeued by the revoke). A database no other
coordinator serves (SQLite: one coordinator, one writer) keeps its entries for
``SOLE_TOKEN_TTL_S`` instead: every revoke comes through this process and clears the cache,
and a fleet beating every 20 s then finds its credentials cached (issue 9).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request

from trainfleet.capability.model import Capability
from trainfleet.coordinator.writer import run_on
from trainfleet.errors import ApiError, Conflict, Unauthorized
from trainfleet.queue.base import JobRecord, WorkerRecord
from trainfleet.verify.market import OPERATOR  # the producer of what the operator submits

if TYPE_CHECKING:
    from trainfleet.coordinator.state import Coordinator

Auth = Literal[
    "none", "join", "worker", "operator", "read", "reader", "submitter", "market", "attempt"
]

TOKEN_TTL_S = 1.0  # how long another coordinator's revoke may go unseen here
SOLE_TOKEN_TTL_S = 60.0  # the same on a database only this coordinator serves (SQLite)
MAX_CACHED_TOKENS = 100_000


class TokenCache:
    """Credential -> worker id (or host name), for ``ttl_s``; keyed by the token's hash."""

    def __init__(
        self, ttl_s: float = TOKEN_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[bytes, tuple[str, float]] = {}
        self.generation = 0  # bumped by clear(): a lookup begun before it is not cached

    @staticmethod
    def _key(kind: str, token: str) -> bytes:
        return hashlib.sha256(f"{kind}\0{token}".encode("utf-8", "surrogateescape")).digest()

    def get(self, kind: str, token: str) -> str | None:
        key = self._key(kind, token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() >= entry[1]:
            del self._entries[key]
            return None
        return entry[0]

    def put(
        self, kind: str, token: str, value: str, generation: int, ttl_s: float | None = None
    ) -> None:
        """Cache ``value`` for ``ttl_s`` (default: the cache's) unless the cache was cleared
        since ``generation`` was read (a revoke committed while the lookup ran)."""
        if generation != self.generation:
            return
        now = self.clock()
        if len(self._entries) >= MAX_CACHED_TOKENS:
            self._entries = {k: e for k, e in self._entries.items() if e[1] > now}
            if len(self._entries) >= MAX_CACHED_TOKENS:
                self._entries.clear()
        self._entries[self._key(kind, token)] = (value, now + (ttl_s or self.ttl_s))

    def clear(self) -> None:
        """Forget every credential: called on any revoke, rotation or deregistration."""
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing 'Authorization: Bearer <token>' header")
    return token.strip()


def _same(given: str, expected: str) -> bool:
    # Compared as bytes: compare_digest raises TypeError on non-ASCII str (headers are
    # latin-1), which would turn a wrong token into a 500.
    return hmac.compare_digest(given.encode("latin-1"), expected.encode())


async def authenticate(auth: Auth, request: Request, coord: Coordinator) -> str | None:
    """Check the caller; returns the worker id for ``worker`` (and a worker ``reader``),
    the producer (``OPERATOR`` or a host name) for ``submitter``. An ``attempt`` caller is
    put on ``request.state.attempt`` (``AttemptCaller``)."""
    if auth == "none" or (auth in ("read", "market") and coord.public_reads):
        return None
    if auth == "attempt":
        request.state.attempt = await authenticate_attempt(bearer_token(request), coord)
        return None
    token = bearer_token(request)
    if auth in ("submitter", "market"):  # market: who competes may read the terms and ledger
        if _same(token, coord.operator_token):
            return OPERATOR
        if _same(token, coord.join_token):
            raise Unauthorized(
                "the shared join token does not submit: use a host's own join token"
                " (`trainfleet hosts enroll NAME`) or the operator token"
            )
        host = await _cached(coord, "host", token, coord.queue.authenticate_host)
        if host == OPERATOR:  # its ledger account, and the producer its referees avoid
            raise Unauthorized(
                f"a host named {OPERATOR!r} does not submit: its payments would be the"
                " operator's; submit with the operator token, or from a host of another name"
            )
        return host
    if auth == "join":
        # Checked here, before the body is read, and again atomically by register_caller.
        if not _join_host(token, coord):
            await _cached(coord, "host", token, coord.queue.authenticate_host)
        return None
    if auth in ("operator", "read", "reader") and _same(token, coord.operator_token):
        return None
    if auth in ("operator", "read"):
        raise Unauthorized("wrong operator token")
    return await _cached(coord, "worker", token, coord.queue.authenticate_worker)


async def _cached(coord: Coordinator, kind: str, token: str, lookup: Callable[[str], str]) -> str:
    """``lookup(token)`` through the coordinator's token cache; refusals are not cached."""
    known = coord.tokens.get(kind, token)
    if known is not None:
        return known
    generation = coord.tokens.generation
    value = await run_on(coord.db_executor, lookup, token)
    coord.tokens.put(kind, token, value, generation, _ttl_s(coord))
    return value


def _ttl_s(coord: Coordinator) -> float | None:
    """``SOLE_TOKEN_TTL_S`` on a database no other coordinator writes (SQLite's single
    writer), else None: the cache's own, short enough for another coordinator's revoke."""
    sole = getattr(getattr(coord.queue, "db", None), "single_writer", False)
    return SOLE_TOKEN_TTL_S if sole is True else None


# -- pipeline attempts --------------------------------------------------------------------------
_ATTEMPT_TOKEN = re.compile(r"([0-9a-f]{64})\.([1-9][0-9]{0,17})\.([0-9a-f]{64})")


@dataclass(frozen=True)
class AttemptCaller:
    """A pipeline job's running attempt, authenticated by its attempt token."""

    job: JobRecord
    epoch: int
    pipeline: Any  # queue.pipelines_base.PipelineRecord
    secret: str  # the pipeline's secret (hex): never sent back on these routes

    @property
    def pipeline_id(self) -> str:
        return str(self.pipeline.id)

    @property
    def role(self) -> str:
        return self.job.spec.kind


def attempt_mac(key_hex: str, job_id: str, epoch: int) -> str:
    """HMAC-SHA256 of ``attempt:{job_id}:{epoch}`` keyed by the pipeline's attempt key (hex):
    not its secret, which every job of the pipeline holds and could mint others' tokens with."""
    message = f"attempt:{job_id}:{epoch}".encode()
    return hmac.new(bytes.fromhex(key_hex), message, hashlib.sha256).hexdigest()


def attempt_token(key_hex: str, job_id: str, epoch: int) -> str:
    """The token a pipeline job's process sends (``Authorization: Bearer ...``)."""
    return f"{job_id}.{epoch}.{attempt_mac(key_hex, job_id, epoch)}"


async def authenticate_attempt(token: str, coord: Coordinator) -> AttemptCaller:
    """The attempt ``token`` names, if its MAC verifies and the attempt is active:
    ``Unauthorized`` (401) for a malformed, wrong or unknown token, ``StaleEpoch``/
    ``Conflict`` (409) for a genuine token of an attempt that was written off or ended."""
    match = _ATTEMPT_TOKEN.fullmatch(token)
    if match is None:
        raise Unauthorized(
            "not a pipeline attempt token: send the attach reply's attempt_token"
            " (JOB_ID.EPOCH.MAC) as 'Authorization: Bearer ...'"
        )
    job_id, epoch, mac = match[1], int(match[2]), match[3]
    queue = coord.queue
    try:
        job, pipeline, secret, key = await run_on(
            coord.db_executor, _attempt_of, queue, job_id, epoch
        )
    except Conflict as fenced:  # StaleEpoch too: only a genuine token may hear it
        known = await run_on(coord.db_executor, _attempt_key_of, queue, job_id)
        if known is None or not _same(mac, attempt_mac(known, job_id, epoch)):
            raise _wrong_attempt() from None
        raise fenced
    except ApiError:  # no such job, or not a pipeline job: the token is not one we issued
        raise _wrong_attempt() from None
    if not _same(mac, attempt_mac(key, job_id, epoch)):
        raise _wrong_attempt()
    return AttemptCaller(job=job, epoch=epoch, pipeline=pipeline, secret=secret)


def _wrong_attempt() -> Unauthorized:
    return Unauthorized("wrong pipeline attempt token")


def _attempt_of(queue: Any, job_id: str, epoch: int) -> tuple[JobRecord, Any, str, str]:
    """The running attempt's job, pipeline, secret and attempt key (or the queue's refusal)."""
    job, pipeline, secret = queue.pipeline_attempt(job_id, epoch)
    return job, pipeline, secret, str(queue.pipeline_attempt_key(pipeline.id))


def _attempt_key_of(queue: Any, job_id: str) -> str | None:
    """The attempt key of the pipeline job ``job_id`` belongs to, or None (not a pipeline
    job)."""
    try:
        job = queue.get_job(job_id)
    except ApiError:
        return None
    task = job.spec.pipeline_task
    if task is None:
        return None
    try:
        return str(queue.pipeline_attempt_key(task.pipeline_id))
    except ApiError:
        return None


def _join_host(token: str, coord: Coordinator) -> bool:
    """Whether ``token`` is the shared join token (open mode); the shared token outside open
    mode, and the operator token, are refused clearly."""
    shared = _same(token, coord.join_token)
    if shared and not coord.open_join:
        raise Unauthorized(
            "the shared join token is refused: this coordinator admits enrolled hosts only"
            " (`trainfleet hosts enroll NAME` issues a host's token; `serve --open-join`"
            " admits anyone with the shared token as a new, policy-less host)"
        )
    if _same(token, coord.operator_token):
        raise Unauthorized(
            "the operator token does not register workers: enroll the host with"
            " `trainfleet hosts enroll NAME` and join with its token"
        )
    return shared


async def register_caller(
    request: Request, coord: Coordinator, capability: Capability
) -> tuple[WorkerRecord, str]:
    """Register the worker presenting this join token, as the host the token allows."""
    token = bearer_token(request)
    if _join_host(token, coord):
        return await run_on(coord.db_executor, coord.queue.register_open, capability)
    return await run_on(coord.db_executor, coord.queue.register_enrolled, capability, token)

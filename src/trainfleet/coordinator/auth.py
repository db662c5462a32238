"""Who is calling: bearer tokens checked against the coordinator's credentials.

Kinds of caller (``Auth``):

- ``none``: anyone (``/health``, ``/openapi.json``);
- ``join``: a host's join token from ``trainfleet hosts enroll NAME``, or, only in open mode
  (``serve --open-join``), the shared join token; ``register_caller`` decides which host
  the worker becomes;
- ``worker``: a worker credential from ``/v1/workers/register``;
- ``operator``: the operator token;
- ``read``: the operator token, or anyone when the coordinator serves ``--public-reads``;
- ``reader``: the operator token or a worker credential.

Every check is a constant-time comparison or one lookup by token hash, on every request:
there is no cache, so a revoke or a rotation takes effect on the very next request.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Literal

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from trainfleet.capability.model import Capability
from trainfleet.errors import Unauthorized
from trainfleet.queue.base import WorkerRecord

if TYPE_CHECKING:
    from trainfleet.coordinator.state import Coordinator

Auth = Literal["none", "join", "worker", "operator", "read", "reader"]


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
    """Check the caller; returns the worker id for ``worker`` (and a worker ``reader``)."""
    if auth == "none" or (auth == "read" and coord.public_reads):
        return None
    token = bearer_token(request)
    if auth == "join":
        # Checked here, before the body is read, and again atomically by register_caller.
        if not _join_host(token, coord):
            await run_in_threadpool(coord.queue.authenticate_host, token)
        return None
    if auth in ("operator", "read", "reader") and _same(token, coord.operator_token):
        return None
    if auth in ("operator", "read"):
        raise Unauthorized("wrong operator token")
    return await run_in_threadpool(coord.queue.authenticate_worker, token)


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
        return await run_in_threadpool(coord.queue.register_open, capability)
    return await run_in_threadpool(coord.queue.register_enrolled, capability, token)
